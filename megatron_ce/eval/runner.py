"""Run lm-eval (lm-evaluation-harness) on an exported HF model directory and write the results beside it.

`run_evaluation(EvalOptions(...))` checks the model directory, tokenizer and task names first (one-line
`EvalError`s, before any model is loaded), then calls `lm_eval.simple_evaluate` with the `hf` model
(`trust_remote_code` for CE exports, whose modeling code ships in the directory) and writes
`results*.json` and a markdown table `results*.md` into `MODEL_DIR/eval/` (or `output_path`).
lm-eval is imported only here, lazily: it is the `[eval]` extra.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from megatron_ce.eval.presets import PresetTask, known_row, needs_unsafe_code, preset_tasks

BUNDLED_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")

# Files of which at least one makes a directory loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class EvalError(Exception):
    """A bad input, reported as one line (the CLI exits 2)."""


@dataclass
class EvalOptions:
    hf_model: str
    tasks: List[str] = field(default_factory=list)
    preset: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    batch_size: Optional[str] = None  # "auto" | "auto:N" | an int; default: auto on CUDA, 1 on CPU
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: Optional[str] = None  # default: cuda if available, else cpu
    include_path: List[str] = field(default_factory=list)
    output_path: Optional[str] = None  # default: HF_MODEL/eval
    trust_remote_code: bool = True
    tokenizer: Optional[str] = None
    max_length: Optional[int] = None
    gen_kwargs: Optional[str] = None
    apply_chat_template: bool = False
    confirm_run_unsafe_code: bool = False
    log_samples: bool = False


# ---------------------------------------------------------------------------------------- checks


def read_model_config(model_dir: str) -> Dict[str, Any]:
    """config.json of an HF model directory, after checking the directory holds a loadable model."""
    if not os.path.isdir(model_dir):
        raise EvalError(f"--hf-model {model_dir}: no such directory")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise EvalError(f"--hf-model {model_dir}: no config.json (not an HF model directory; "
                        "export a Megatron checkpoint with tools/convert_megatron_to_hf.py)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{cfg_path}: unreadable config ({e})") from None
    if not isinstance(config, dict):
        raise EvalError(f"{cfg_path}: not a JSON object")
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in os.listdir(model_dir)):
        raise EvalError(f"--hf-model {model_dir}: no weight files (*.safetensors / *.bin)")
    return config


def check_remote_code(model_dir: str, config: Dict[str, Any], trust_remote_code: bool) -> None:
    """A CE export registers its modeling code via `auto_map`: it must be present and trusted, or
    transformers would refuse the model (or, for a stock model_type, silently drop CE)."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        return
    if not trust_remote_code:
        raise EvalError(f"--hf-model {model_dir} ships its own modeling code (model_type "
                        f"{config.get('model_type')!r}, e.g. a CE export): drop --no-trust-remote-code")
    for ref in auto_map.values():
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        if not isinstance(ref, str) or "--" in ref:  # "repo--module.Class" points at the Hub
            continue
        module_file = ref.rsplit(".", 1)[0] + ".py"
        if not os.path.isfile(os.path.join(model_dir, module_file)):
            raise EvalError(f"--hf-model {model_dir}: config.json auto_map needs {module_file}, which is "
                            "missing (re-export with tools/convert_megatron_to_hf.py)")


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)


def resolve_tokenizer(model_dir: str, tokenizer: Optional[str]) -> Optional[str]:
    """The `tokenizer=` model argument: None (use the model directory's) or the --tokenizer value."""
    if tokenizer is None:
        if not has_tokenizer_files(model_dir):
            raise EvalError(f"the export has no tokenizer files ({model_dir}): pass --tokenizer DIR "
                            "(the tokenizer the model was trained with)")
        return None
    if os.path.isdir(tokenizer):
        if not has_tokenizer_files(tokenizer):
            raise EvalError(f"--tokenizer {tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        return os.path.abspath(tokenizer)
    # a Hub id is "org/name"; anything else that does not exist is a mistyped local path
    if os.path.isabs(tokenizer) or tokenizer.startswith((".", "~")) or tokenizer.count("/") != 1:
        raise EvalError(f"--tokenizer {tokenizer}: no such directory")
    return tokenizer


def resolve_tasks(tasks: Sequence[str], preset: Optional[str]) -> List[str]:
    """Preset rows first, then --tasks, without duplicates."""
    names: List[str] = []
    if preset:
        try:
            names += [row.task for row in preset_tasks(preset)]
        except KeyError as e:
            raise EvalError(f"--preset: {e.args[0]}") from None
    names += [t.strip() for t in tasks if t.strip()]
    if not names:
        raise EvalError("nothing to evaluate: pass --tasks NAME[,NAME...] and/or --preset")
    return list(dict.fromkeys(names))


def check_unsafe(tasks: Sequence[str], confirmed: bool) -> None:
    unsafe = needs_unsafe_code(list(tasks))
    if unsafe and not confirmed:
        raise EvalError(f"{', '.join(unsafe)} execute(s) model-generated code: pass "
                        "--confirm-run-unsafe-code (run it in a sandbox or container)")


def resolve_device_dtype(device: Optional[str], dtype: str):
    import torch

    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: CUDA is not available (use --device cpu)")
    if dtype == "auto":  # the paper evaluates in bf16; CPUs run fp32 much faster than bf16
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


def parse_batch_size(value: Optional[str], device: str) -> str:
    if value is None:  # lm-eval's auto search probes GPU memory; on CPU it only costs time
        return "1" if device == "cpu" else "auto"
    v = str(value)
    if v == "auto" or (v.startswith("auto:") and v[5:].isdigit()) or (v.isdigit() and int(v) > 0):
        return v
    raise EvalError(f"--batch-size {value}: use a positive integer, auto or auto:N")


# ---------------------------------------------------------------------------------------- lm-eval


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator  # noqa: F401
    except ImportError as e:
        raise EvalError(f"lm-eval is not installed ({e}): pip install -e '.[eval]'") from None
    return lm_eval


def include_paths(opts: EvalOptions) -> List[str]:
    paths = [BUNDLED_TASKS_DIR]
    for p in opts.include_path:
        if not os.path.isdir(p):
            raise EvalError(f"--include-path {p}: no such directory")
        paths.append(os.path.abspath(p))
    return paths


def build_task_manager(task_names: Sequence[str], paths: Sequence[str], metadata: Dict[str, Any]):
    """A TaskManager that knows every name in task_names. Indexing lm-eval's ~15k built-in task configs
    takes seconds to tens of seconds, so when the local YAMLs alone cover the request they are used
    without the built-ins."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=list(paths), include_defaults=False, metadata=metadata)
    if all(t in local.all_tasks for t in task_names):
        return local
    full = TaskManager(include_path=list(paths), include_defaults=True, metadata=metadata)
    unknown = [t for t in task_names if t not in full.all_tasks]
    if unknown:
        raise EvalError(f"--tasks: unknown task(s) {', '.join(unknown)} (list them with `lm-eval ls tasks`; "
                        "local YAMLs go in --include-path)")
    return full


def model_args(model_dir: str, dtype: str, trust_remote_code: bool, tokenizer: Optional[str],
               max_length: Optional[int]) -> Dict[str, Any]:
    args: Dict[str, Any] = {"pretrained": os.path.abspath(model_dir), "dtype": dtype,
                            "trust_remote_code": trust_remote_code,
                            # CE model types are not in transformers' causal-LM mapping: say so
                            "backend": "causal"}
    if tokenizer is not None:
        args["tokenizer"] = tokenizer
    if max_length is not None:
        args["max_length"] = max_length
    return args


def load_model(args: Dict[str, Any], batch_size: str, device: str):
    """lm-eval's HFLM, with load failures (bad weights, mismatched config) as one line."""
    import lm_eval.api.registry

    try:
        return lm_eval.api.registry.get_model("hf").create_from_arg_obj(
            args, {"batch_size": batch_size, "max_batch_size": 64, "device": device})
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"--hf-model {args['pretrained']}: cannot load the model ({first})") from None


def check_vocab(lm, model_dir: str) -> None:
    """A tokenizer with more ids than the embedding rows would index past it: the wrong tokenizer."""
    n_tok = len(lm.tokenizer)
    n_vocab = getattr(lm.model.config, "vocab_size", None)
    if n_vocab is not None and n_tok > n_vocab:
        raise EvalError(f"the tokenizer has {n_tok} tokens but {model_dir} has vocab_size {n_vocab}: "
                        "pass the tokenizer the model was trained with (--tokenizer DIR)")


def equivalent_command(opts: EvalOptions, tasks: Sequence[str], args: Dict[str, Any], device: str,
                       batch_size: str, paths: Sequence[str], out_dir: str) -> str:
    """The plain `lm-eval run` line of this run (recorded beside the results for reproducibility)."""
    margs = ",".join(f"{k}={v}" for k, v in args.items())
    cmd = ["lm-eval", "run", "--model", "hf", "--model_args", margs, "--tasks", ",".join(tasks),
           "--device", device, "--batch_size", batch_size, "--include_path", *paths,
           "--output_path", out_dir]
    if opts.num_fewshot is not None:
        cmd += ["--num_fewshot", str(opts.num_fewshot)]
    if opts.limit is not None:
        cmd += ["--limit", str(opts.limit)]
    if opts.gen_kwargs:
        cmd += ["--gen_kwargs", opts.gen_kwargs]
    if opts.apply_chat_template:
        cmd += ["--apply_chat_template"]
    if opts.confirm_run_unsafe_code:
        cmd += ["--confirm_run_unsafe_code"]
    return " ".join(shlex.quote(c) for c in cmd)


# ---------------------------------------------------------------------------------------- results


def _leaf_tasks(results: Dict[str, Any], name: str) -> List[str]:
    subs = results.get("group_subtasks", {}).get(name)
    if not subs:
        return [name]
    out: List[str] = []
    for s in subs:
        out += _leaf_tasks(results, s)
    return out


def shot_mismatches(results: Dict[str, Any], tasks: Sequence[str], override: Optional[int]) -> List[str]:
    """Tasks we describe whose run used another shot count than the paper's (presets.py)."""
    if override is not None:
        return []
    bad = []
    for t in tasks:
        row = known_row(t)
        if row is None:
            continue
        for leaf in _leaf_tasks(results, t):
            used = results.get("n-shot", {}).get(leaf)
            if used is not None and int(used) != row.num_fewshot:
                bad.append(f"{leaf}: {used}-shot (paper: {row.num_fewshot})")
    return bad


def headline_rows(results: Dict[str, Any], tasks: Sequence[str]) -> List[List[str]]:
    """[task, metric, filter, value] for the tasks presets.py describes (the paper's numbers)."""
    rows = []
    for t in tasks:
        row: Optional[PresetTask] = known_row(t)
        if row is None:
            continue
        scores = results.get("groups", {}).get(t) or results.get("results", {}).get(t, {})
        for flt in row.filters:
            v = scores.get(f"{row.metric},{flt}")
            rows.append([t, row.metric, flt, f"{v:.4f}" if isinstance(v, float) else str(v)])
    return rows


def ce_summary(config: Dict[str, Any]) -> str:
    k_a = int(config.get("moe_ce_num_compressed") or 0)
    if not k_a:
        return "none (plain MoE)"
    top_k = config.get("num_experts_per_tok")
    return f"k_a={k_a} of top-{top_k}, variant {config.get('moe_ce_variant', 'ia3')}"


def render_markdown(results: Dict[str, Any], header: Dict[str, Any], tasks: Sequence[str],
                    warnings: Sequence[str]) -> str:
    from lm_eval.utils import make_table

    lines = ["# Evaluation results", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if k != "command"]
    lines += ["", "Equivalent lm-eval command:", "", "```bash", header["command"], "```", ""]
    lines += [f"> **warning**: {w}" for w in warnings]
    head = headline_rows(results, tasks)
    if head:
        lines += ["", "## Paper metrics", "", "| Task | Metric | Filter | Value |", "|---|---|---|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in head]
    lines += ["", "## All metrics", "", make_table(results)]
    if results.get("groups"):
        lines += ["", make_table(results, "groups")]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(results: Dict[str, Any], out_dir: str, stem: str, markdown: str,
                  log_samples: bool) -> Dict[str, str]:
    from lm_eval.utils import handle_non_serializable

    os.makedirs(out_dir, exist_ok=True)
    samples = results.pop("samples", None)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown)
    if log_samples and samples:
        for task, rows in samples.items():
            p = os.path.join(out_dir, f"{stem}_samples_{task}.jsonl")
            with open(p, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return paths


# ---------------------------------------------------------------------------------------- entry


@dataclass
class Plan:
    """What a run will do, settled (and checked) before lm-eval or the model is loaded."""
    config: Dict[str, Any]
    tokenizer: Optional[str]
    tasks: List[str]
    device: str
    dtype: str
    batch_size: str
    include_paths: List[str]
    out_dir: str
    stem: str


def plan_run(opts: EvalOptions) -> Plan:
    """Every check that needs neither lm-eval nor the model: bad inputs fail here in one line."""
    config = read_model_config(opts.hf_model)
    check_remote_code(opts.hf_model, config, opts.trust_remote_code)
    tokenizer = resolve_tokenizer(opts.hf_model, opts.tokenizer)
    tasks = resolve_tasks(opts.tasks, opts.preset)
    check_unsafe(tasks, opts.confirm_run_unsafe_code)
    device, dtype = resolve_device_dtype(opts.device, opts.dtype)
    batch_size = parse_batch_size(opts.batch_size, device)
    if opts.limit is not None and opts.limit <= 0:
        raise EvalError(f"--limit {opts.limit}: must be > 0")
    if opts.num_fewshot is not None and opts.num_fewshot < 0:
        raise EvalError(f"--num-fewshot {opts.num_fewshot}: must be >= 0")
    return Plan(config=config, tokenizer=tokenizer, tasks=tasks, device=device, dtype=dtype,
                batch_size=batch_size, include_paths=include_paths(opts),
                out_dir=opts.output_path or os.path.join(opts.hf_model, "eval"),
                stem="results" if not opts.preset else f"results_{opts.preset}")


def run_header(opts: EvalOptions, plan: Plan, args: Dict[str, Any], lm_eval_version: str) -> Dict[str, Any]:
    """The run's description at the top of results.md (and under "megatron_ce" in results.json)."""
    return {
        "model": os.path.abspath(opts.hf_model),
        "model_type": plan.config.get("model_type"),
        "compressed experts": ce_summary(plan.config),
        "tokenizer": plan.tokenizer or "(from the model directory)",
        "dtype / device / batch size": f"{plan.dtype} / {plan.device} / {plan.batch_size}",
        "preset": opts.preset or "-",
        "tasks": ", ".join(plan.tasks),
        "limit": opts.limit if opts.limit is not None else "none (full tasks)",
        "lm-eval": lm_eval_version,
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": equivalent_command(opts, plan.tasks, args, plan.device, plan.batch_size,
                                      plan.include_paths, plan.out_dir),
    }


def run_evaluation(opts: EvalOptions) -> Dict[str, Any]:
    """Evaluate; returns {"results": lm-eval's dict, "paths": {"json", "md"}, "markdown": str}."""
    plan = plan_run(opts)
    lm_eval = import_lm_eval()
    from lm_eval import evaluator

    args = model_args(opts.hf_model, plan.dtype, opts.trust_remote_code, plan.tokenizer, opts.max_length)
    task_manager = build_task_manager(plan.tasks, plan.include_paths, metadata=dict(args))
    if opts.confirm_run_unsafe_code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # HF `evaluate`'s code_eval asks for it too
    lm = load_model(args, plan.batch_size, plan.device)
    check_vocab(lm, opts.hf_model)
    results = evaluator.simple_evaluate(
        model=lm, tasks=list(plan.tasks), num_fewshot=opts.num_fewshot, limit=opts.limit,
        task_manager=task_manager, gen_kwargs=opts.gen_kwargs, apply_chat_template=opts.apply_chat_template,
        confirm_run_unsafe_code=opts.confirm_run_unsafe_code, log_samples=opts.log_samples,
        batch_size=plan.batch_size, device=plan.device)
    if results is None:  # a non-zero rank of a multi-process launch: rank 0 writes the results
        return {"results": None, "paths": {}, "markdown": ""}
    results["config"]["model_args"] = args

    warnings = shot_mismatches(results, plan.tasks, opts.num_fewshot)
    if opts.limit is not None:
        warnings.append(f"--limit {opts.limit}: scores on a subset of each task, not comparable to the paper")
    header = run_header(opts, plan, args, getattr(lm_eval, "__version__", "?"))
    results["megatron_ce"] = {k: str(v) for k, v in header.items()} | {"warnings": warnings}
    markdown = render_markdown(results, header, plan.tasks, warnings)
    written = write_outputs(results, plan.out_dir, plan.stem, markdown, opts.log_samples)
    return {"results": results, "paths": written, "markdown": markdown}
