#!/usr/bin/env python
"""One-command GPU check (issue 12): everything a GPU run should prove, in one go, in at most 8 minutes.

    bash tools/gpu_check.sh [--out runs/gpu_check/summary.json] [--budget-s 480] [--keep-work]
    bash tools/gpu_check.sh --cpu-dry-run --out /tmp/gc/summary.json      # the same stages, tiny, on CPU

Stages (each a subprocess with its own timeout; a failed stage does not stop the others, only the
stages that need its output are skipped):
  env           versions, CUDA device, transformer-engine / grouped_gemm, the trainer's flags
  pytest_gpu    `pytest -m gpu -q tests` (counts of passed / failed / skipped); not run with --cpu-dry-run
  hf_checkpoint a random OLMoE-shape HF checkpoint (transformers OlmoeConfig; 2 layers, full width:
                d 2048, 64 experts top-8, ffn 1024, vocab 50304, 16 heads; bf16 safetensors)
  convert       tools/convert_hf_to_megatron.py --moe-ce-num-compressed 4 (k_a = k/2)
  train         20 iterations of `torchrun -m megatron_ce.train` from it: TE spec, bf16, grouped GEMM,
                distributed optimizer, alltoall, CE; checks the loss decreases and theta moves, and
                reports the achieved TFLOPS of the training step (formula: `train_flops_per_token`)
  reload        one more iteration with --load from that checkpoint (it loads; the loss is the trained one)
  export        tools/convert_megatron_to_hf.py of the trained checkpoint
  hf_forward    AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True), one forward: finite
                logits, the exported theta tables differ from their init (ones)
  bench_olmoe,  tools/bench_moe_layer.py --shape olmoe|phimoe --bf16 --json: CE overhead over top-k/2 and
  bench_phimoe  top-k/2+CE over top-k (forward and forward+backward)

Writes one JSON summary (--out) and each stage's full output to <stage>.log next to it; prints
timestamped progress lines and a table; exits 1 if any stage failed (2: bad flags). Large files
(checkpoints, ~2 GB each on GPU) go to --work-dir (default: a temporary folder, deleted at the end
unless --keep-work), so the summary folder stays small enough to copy back from a GPU machine.

--cpu-dry-run runs the same stages on CPU at a tiny shape (d 64, 8 experts top-4, vocab 1024; local
spec, fp32, the CPU grouped-GEMM path, gloo), 6 iterations: what the default test-suite checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "sft_tiny.jsonl"
TOKENIZER = REPO / "examples" / "data" / "tokenizer"
TOKENIZER_VOCAB = 1024  # the bundled tokenizer's size (random ids for the HF forward stay below it)
RESULT = "GPU_CHECK_RESULT "  # prefix of the one JSON line the internal helper commands print


class CheckFailed(Exception):
    """A stage ran but one of its checks does not hold (message: what and the numbers)."""


# ----------------------------------------------------------------------------------------------
# the two profiles: full shape on one GPU, tiny on CPU
# ----------------------------------------------------------------------------------------------


def olmoe_hf_config(d: int, ffn: int, n: int, k: int, heads: int, vocab: int) -> Dict:
    """A 2-layer OLMoE config (transformers OlmoeConfig fields; OLMoE's own values otherwise)."""
    return dict(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=heads, num_experts=n, num_experts_per_tok=k,
                max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
                tie_word_embeddings=False, initializer_range=0.02, pad_token_id=1, eos_token_id=0)


@dataclass
class Profile:
    name: str
    hf_config: Dict
    k_a: int
    hf_dtype: str            # dtype of the random HF checkpoint
    train_flags: List[str]   # precision / implementation flags of both trainer runs
    iters: int
    seq: int
    micro_batch: int
    global_batch: int
    lr: float
    save_optim: bool         # optimizer state in the trained checkpoint (12 GB at full shape: off on GPU)
    bench_flags: List[str]
    budget_s: float
    timeouts: Dict[str, float] = field(default_factory=dict)


GPU = Profile(
    name="gpu",
    hf_config=olmoe_hf_config(d=2048, ffn=1024, n=64, k=8, heads=16, vocab=50304),
    k_a=4, hf_dtype="bfloat16",
    train_flags=["--transformer-impl", "transformer_engine", "--bf16", "--moe-grouped-gemm",
                 "--use-distributed-optimizer", "--moe-token-dispatcher-type", "alltoall"],
    iters=20, seq=2048, micro_batch=8, global_batch=32, lr=1e-3, save_optim=False,  # 64k tokens, 77 TFLOP a step
    bench_flags=["--bf16", "--tokens", "8192", "--repeats", "10"],
    budget_s=480,
    timeouts=dict(env=60, pytest_gpu=120, hf_checkpoint=60, convert=60, train=120, reload=90, export=60,
                  hf_forward=60, bench_olmoe=60, bench_phimoe=75),
)

CPU = Profile(
    name="cpu-dry-run",
    hf_config=olmoe_hf_config(d=64, ffn=32, n=8, k=4, heads=4, vocab=TOKENIZER_VOCAB),
    k_a=2, hf_dtype="float32",
    # gloo: the distributed optimizer works; grouped GEMM takes the CPU split-and-matmul path.
    train_flags=["--transformer-impl", "local", "--moe-grouped-gemm", "--use-distributed-optimizer",
                 "--moe-token-dispatcher-type", "alltoall"],
    iters=6, seq=128, micro_batch=2, global_batch=4, lr=3e-3, save_optim=True,
    bench_flags=["--tokens", "16", "--repeats", "1"],
    budget_s=600,  # a cap for loaded CI machines; about 70 s of CPU time
    timeouts={},  # every stage: DRY_RUN_STAGE_TIMEOUT_S
)
DRY_RUN_STAGE_TIMEOUT_S = 150


# ----------------------------------------------------------------------------------------------
# model FLOPs of one training step
# ----------------------------------------------------------------------------------------------


def forward_flops_per_token(cfg: Dict, seq: int, k_a: int, causal: bool = True) -> float:
    """Matmul FLOPs (2 per multiply-add) of one token's forward through the OLMoE-shape CE model.

    Per layer, with d hidden, h_kv = kv heads x head dim, n experts, top-k = k_m main + k_a compressed,
    f expert ffn, s sequence length:
      attention projections  2 d (d + 2 h_kv) + 2 d d                      (QKV, output)
      attention core         4 d s  (QK^T and AV against s keys); causal: 2 d s (s/2 keys on average,
                             what flash attention computes)
      router                 2 d n
      main experts           k_m * 3 * 2 d f                                (gate, up, down)
      CE (ia3)               2 k_a (2d + f) + k_m (2d + f)                  (c = sum w_j theta_j; scaling)
    plus the output layer 2 d V once. Norms, softmax, rotary and the loss are left out (< 1%).
    """
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"]
    k, L, V = cfg["num_experts_per_tok"], cfg["num_hidden_layers"], cfg["vocab_size"]
    h_kv = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    k_m = k - k_a
    attn = 2 * d * (d + 2 * h_kv) + 2 * d * d + (2 if causal else 4) * d * seq
    moe = 2 * d * n + k_m * 6 * d * f
    ce = (2 * k_a + k_m) * (2 * d + f) if k_a else 0
    return float(L * (attn + moe + ce) + 2 * d * V)


def train_flops_per_token(cfg: Dict, seq: int, k_a: int) -> float:
    """Forward + backward (twice the forward: input and weight gradients), no activation recompute."""
    return 3 * forward_flops_per_token(cfg, seq, k_a)


# ----------------------------------------------------------------------------------------------
# log parsing
# ----------------------------------------------------------------------------------------------

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"


def parse_train_log(text: str) -> Dict[int, Dict[str, float]]:
    """{iteration: {loss, tokens_per_s, theta_dev}} from the trainer's log lines (megatron_ce.training
    .metrics.log_line); fields missing from a line are absent."""
    out = {}
    for line in text.splitlines():
        m = re.search(r"\biter\s+(\d+)/(\d+)\s*\|\s*loss " + _NUM, line)
        if not m:
            continue
        row = {"loss": float(m.group(3))}
        tok = re.search(_NUM + r" tok/s", line)
        if tok:
            row["tokens_per_s"] = float(tok.group(1))
        th = re.search(r"\|theta-1\| max " + _NUM, line)
        if th:
            row["theta_dev"] = float(th.group(1))
        out[int(m.group(1))] = row
    return out


def parse_pytest_counts(text: str) -> Dict[str, int]:
    """Counts from pytest's final summary line ("3 passed, 2 skipped, 466 deselected in 9.1s")."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    counts: Dict[str, int] = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                              lines[-1] if lines else ""):
        counts["errors" if what.startswith("error") else what] = int(n)
    return counts


def last_json_line(text: str, prefix: str = "") -> Dict:
    """The last line of `text` that is a JSON object (after `prefix`)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix):]
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise CheckFailed(f"no JSON result line{' ' + prefix.strip() if prefix else ''} in the output")


def bench_ratios(res: Dict) -> Dict[str, float]:
    """CE overhead over top-k/2 and top-k/2+CE over top-k, forward and forward+backward, both variants,
    from bench_moe_layer.py's JSON (keys top{k}, top{k/2}, top{k/2}+ce_ia3, top{k/2}+ce_hidden)."""
    half = res["meta"]["baseline"]
    (full,) = [name for name in res if re.fullmatch(r"top\d+", name) and name != half]
    out = {"top_k": full, "top_k_half": half}
    for variant in ("ia3", "hidden"):
        ce = res[f"{half}+ce_{variant}"]
        for t in ("fwd", "fwd_bwd"):
            out[f"ce_{variant}_over_half_{t}"] = ce[f"{t}_ms"] / res[half][f"{t}_ms"]
            out[f"half_ce_{variant}_over_topk_{t}"] = ce[f"{t}_ms"] / res[full][f"{t}_ms"]
    for name in (full, half):
        out[f"{name}_fwd_bwd_ms"] = res[name]["fwd_bwd_ms"]
    out["half_ce_ia3_fwd_bwd_ms"] = res[f"{half}+ce_ia3"]["fwd_bwd_ms"]
    return out


def loss_windows(losses: List[float]) -> Tuple[float, float, int]:
    """(mean of the first w losses, mean of the last w, w): w = 5, or half the run when shorter."""
    w = max(1, min(5, len(losses) // 2))
    return statistics.fmean(losses[:w]), statistics.fmean(losses[-w:]), w


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    prof: Profile
    out_dir: Path
    work: Path
    results: Dict[str, Dict] = field(default_factory=dict)

    def numbers(self, stage: str) -> Dict:
        return self.results.get(stage, {}).get("numbers", {})

    @property
    def dry(self) -> bool:
        return self.prof.name != "gpu"


@dataclass
class Stage:
    name: str
    command: Callable[[Ctx], Optional[List[str]]]   # None: not run in this mode (skipped, not failed)
    parse: Callable[[Ctx, str], Dict]               # numbers; raises CheckFailed
    needs: Tuple[str, ...] = ()
    skip_reason: str = ""
    error_from_tail: bool = False  # on failure quote the output's last line (pytest: its counts)


def _py(*a) -> List[str]:
    return [sys.executable, *map(str, a)]


def _self(*a) -> List[str]:
    return _py(Path(__file__).resolve(), *a)


# env ------------------------------------------------------------------------------------------


def env_cmd(ctx):
    return _self("_env")


def env_parse(ctx, text):
    info = last_json_line(text, RESULT)
    if not ctx.dry and not info.get("cuda"):
        raise CheckFailed("no CUDA device: the GPU check needs one (use --cpu-dry-run without a GPU)")
    return info


def _env() -> Dict:
    import importlib.metadata
    import importlib.util

    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for dist in ("transformers", "megatron-core"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    for mod in ("transformer_engine", "grouped_gemm"):
        if not torch.cuda.is_available():  # unusable without CUDA anyway; an import costs seconds
            info[mod] = "present" if importlib.util.find_spec(mod) else None
            continue
        try:  # on a GPU really import: a CUDA / torch mismatch shows here, not in the middle of training
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - record why it is unusable, whatever it is
            info[mod] = None
            info[f"{mod}_error"] = f"{type(e).__name__}: {e}"[:300]
    from megatron_ce.training.args import build_parser

    info["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
    info["train_flags"] = sorted(s for a in build_parser()._actions for s in a.option_strings)
    return info


# pytest ---------------------------------------------------------------------------------------


def pytest_cmd(ctx):
    if ctx.dry:
        return None
    # pytest-timeout (the [test] extra) turns a hung test into a failure instead of the stage's timeout
    per_test = ["--timeout", "90"] if ctx.numbers("env").get("pytest_timeout") else []
    return _py("-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *per_test, REPO / "tests")


def pytest_parse(ctx, text):
    counts = parse_pytest_counts(text)
    if not counts.get("passed"):
        raise CheckFailed(f"pytest -m gpu ran no passing test: {counts}")
    return counts


# HF checkpoint + conversion -------------------------------------------------------------------


def hf_checkpoint_cmd(ctx):
    cfg = ctx.work / "hf_config.json"
    cfg.write_text(json.dumps(ctx.prof.hf_config))
    return _self("_build_hf", cfg, ctx.work / "hf", ctx.prof.hf_dtype)


def hf_checkpoint_parse(ctx, text):
    res = last_json_line(text, RESULT)
    if not list((ctx.work / "hf").glob("*.safetensors")):
        raise CheckFailed(f"no safetensors in {ctx.work / 'hf'}")
    return res


def _build_hf(config_json: str, out: str, dtype: str) -> Dict:
    """Random-init OlmoeForCausalLM from the config, saved with save_pretrained (safetensors)."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**json.loads(Path(config_json).read_text()))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # init on the GPU: seconds, not minutes
        model = OlmoeForCausalLM(cfg)  # fp32 init (4 GB at full shape), then cast: no bf16 init kernels
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), "dtype": dtype}


def convert_cmd(ctx):
    return _py(REPO / "tools" / "convert_hf_to_megatron.py", "--load-dir", ctx.work / "hf",
               "--save-dir", ctx.work / "megatron", "--moe-ce-num-compressed", ctx.prof.k_a, "--no-progress")


def convert_parse(ctx, text):
    if not (ctx.work / "megatron" / "latest_checkpointed_iteration.txt").is_file():
        raise CheckFailed("the converter wrote no latest_checkpointed_iteration.txt")
    return {"k_a": ctx.prof.k_a}


# training -------------------------------------------------------------------------------------


def _train_common(ctx, iters: int) -> List[str]:
    p = ctx.prof
    flags = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
             "-m", "megatron_ce.train", *p.train_flags, *overlap_flags(ctx),
             "--allow-vocab-padding",  # the bundled tokenizer (1024) is far smaller than vocab 50304
             "--data-path", DATA, "--tokenizer-model", TOKENIZER, "--seq-length", p.seq,
             "--micro-batch-size", p.micro_batch, "--global-batch-size", p.global_batch, "--train-iters", iters,
             "--lr", f"{p.lr:g}", "--min-lr", f"{p.lr / 10:g}", "--lr-decay-style", "cosine",
             "--lr-decay-iters", p.iters,
             "--clip-grad", "1.0", "--log-interval", "1"]
    return [str(f) for f in flags]


def overlap_flags(ctx) -> List[str]:
    """--overlap-grad-reduce / --overlap-param-gather on GPU when this trainer has them (env stage)."""
    have = set(ctx.numbers("env").get("train_flags", []))
    want = ["--overlap-grad-reduce", "--overlap-param-gather"]
    return want if not ctx.dry and all(f in have for f in want) else []


def train_cmd(ctx):
    cmd = _train_common(ctx, ctx.prof.iters) + [
        "--pretrained-checkpoint", str(ctx.work / "megatron"), "--save", str(ctx.work / "ckpt"),
        "--tensorboard-dir", str(ctx.work / "tb")]
    return cmd if ctx.prof.save_optim else cmd + ["--no-save-optim"]


def train_parse(ctx, text):
    p = ctx.prof
    rows = parse_train_log(text)
    missing = [i for i in range(1, p.iters + 1) if i not in rows]
    if missing:  # a crash or a changed log format: keep what was logged for the diagnosis
        raise CheckFailed(f"no log line for iterations {missing}", {"losses": {i: r["loss"] for i, r in rows.items()}})
    losses = [rows[i]["loss"] for i in range(1, p.iters + 1)]
    if not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"non-finite loss: {losses}")
    first, last, w = loss_windows(losses)
    theta_dev = rows[p.iters].get("theta_dev")
    # Iterations 1-2 include CUDA/NCCL warm-up and allocator growth: not a steady-state step.
    tok_s = statistics.median(rows[i]["tokens_per_s"] for i in range(min(3, p.iters), p.iters + 1))
    per_token = train_flops_per_token(p.hf_config, p.seq, p.k_a)
    tokens_per_step = p.global_batch * p.seq
    nums = dict(losses=losses, loss_first_mean=first, loss_last_mean=last, loss_window=w,
                theta_dev_max=theta_dev, tokens_per_step=tokens_per_step, tokens_per_s=tok_s,
                step_time_s=tokens_per_step / tok_s, train_flops_per_token=per_token,
                tflops=per_token * tok_s / 1e12, extra_flags=overlap_flags(ctx))
    problems = []
    if not last < first:
        problems.append(f"loss did not decrease: mean of the last {w} {last:.4f} >= first {w} {first:.4f}")
    if theta_dev is None or not theta_dev > 0:
        problems.append(f"theta did not move (|theta-1| max = {theta_dev})")
    if not (ctx.work / "ckpt" / "latest_checkpointed_iteration.txt").is_file():
        problems.append("no checkpoint saved")
    if not list((ctx.work / "tb").glob("events.out.tfevents.*")):
        problems.append("no TensorBoard events written")
    if problems:
        raise CheckFailed("; ".join(problems), nums)
    return nums


def reload_cmd(ctx):
    # One more iteration from the saved training checkpoint, nothing saved: it must load (here, under
    # the same spec it was saved with) and continue from the trained weights.
    return _train_common(ctx, ctx.prof.iters + 1) + ["--load", str(ctx.work / "ckpt")]


def reload_parse(ctx, text):
    rows = parse_train_log(text)
    it = ctx.prof.iters + 1
    if "loaded model weights from" not in text or it not in rows:
        raise CheckFailed(f"no 'loaded model weights' line or no log line for iteration {it}")
    loss = rows[it]["loss"]
    first = ctx.numbers("train").get("loss_first_mean", math.inf)
    nums = dict(loss=loss, resumed="resumed from" in text,
                optimizer_restored="optimizer state not restored" not in text)
    # A checkpoint that silently did not load would start again near the first losses.
    if not (math.isfinite(loss) and loss < first):
        raise CheckFailed(f"reloaded loss {loss} is not below the first losses' mean {first}", nums)
    return nums


# export ---------------------------------------------------------------------------------------


def export_cmd(ctx):
    return _py(REPO / "tools" / "convert_megatron_to_hf.py", "--load-dir", ctx.work / "ckpt",
               "--save-dir", ctx.work / "hf_export", "--no-progress")


def export_parse(ctx, text):
    d = ctx.work / "hf_export"
    shards = list(d.glob("*.safetensors"))
    if not (d / "config.json").is_file() or not shards:
        raise CheckFailed(f"{d} has no config.json or no safetensors")
    return {"shards": len(shards), "bytes": sum(s.stat().st_size for s in shards)}


def hf_forward_cmd(ctx):
    return _self("_hf_forward", ctx.work / "hf_export")


def hf_forward_parse(ctx, text):
    res = last_json_line(text, RESULT)
    problems = []
    if not res["logits_finite"]:
        problems.append("non-finite logits")
    if res["logits_shape"][-1] != ctx.prof.hf_config["vocab_size"]:
        problems.append(f"logits shape {res['logits_shape']}")
    if not res["ce_tensors"] or not res["theta_dev_max"] > 0:
        problems.append(f"exported theta tables did not move from ones ({res['ce_tensors']} CE tensors, "
                        f"max |theta-1| {res['theta_dev_max']})")
    if problems:
        raise CheckFailed("; ".join(problems), res)
    return res


def _hf_forward(path: str) -> Dict:
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).to(dev).eval()
    ids = torch.randint(0, TOKENIZER_VOCAB, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        logits = model(ids).logits.float()
    ce = [p for n, p in model.named_parameters() if ".mlp.ce." in n]
    dev_max = max((float((p.float() - 1).abs().max()) for p in ce), default=0.0)
    return {"model_class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
            "logits_shape": list(logits.shape), "logits_finite": bool(torch.isfinite(logits).all()),
            "logits_std": float(logits.std()), "ce_tensors": len(ce), "theta_dev_max": dev_max}


# bench ----------------------------------------------------------------------------------------


def bench_cmd(shape: str):
    def cmd(ctx):
        flags = ["--shape", shape, "--json", *ctx.prof.bench_flags]
        env = ctx.numbers("env")
        if not ctx.dry and not env.get("grouped_gemm"):
            flags += ["--experts", "sequential"]  # the legacy grouped experts need grouped_gemm on a GPU
        return _py(REPO / "tools" / "bench_moe_layer.py", *flags, *(["--smoke"] if ctx.dry else []))
    return cmd


def bench_parse(ctx, text):
    res = last_json_line(text)
    nums = bench_ratios(res)
    nums["meta"] = res["meta"]
    if not ctx.dry and res["meta"].get("device") != "cuda":
        raise CheckFailed(f"the bench ran on {res['meta'].get('device')}, not cuda", nums)
    return nums


WORK_SUBDIRS = ("hf", "megatron", "ckpt", "tb", "hf_export")

STAGES = [
    Stage("env", env_cmd, env_parse),
    Stage("pytest_gpu", pytest_cmd, pytest_parse, needs=("env",),
          skip_reason="needs CUDA (not run with --cpu-dry-run)", error_from_tail=True),
    Stage("hf_checkpoint", hf_checkpoint_cmd, hf_checkpoint_parse, needs=("env",)),
    Stage("convert", convert_cmd, convert_parse, needs=("hf_checkpoint",)),
    Stage("train", train_cmd, train_parse, needs=("convert",)),
    Stage("reload", reload_cmd, reload_parse, needs=("train",)),
    Stage("export", export_cmd, export_parse, needs=("train",)),
    Stage("hf_forward", hf_forward_cmd, hf_forward_parse, needs=("export",)),
    Stage("bench_olmoe", bench_cmd("olmoe"), bench_parse, needs=("env",)),
    Stage("bench_phimoe", bench_cmd("phimoe"), bench_parse, needs=("env",)),
]


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, msg: str):
        print(f"[gpu_check {time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", flush=True)


def run_logged(cmd: List[str], log: Path, timeout_s: float) -> Tuple[Optional[int], str]:
    """Run `cmd` in its own process group with stdout+stderr to `log`; on timeout kill the group (torchrun
    and its ranks). Returns (exit code or None on timeout, output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a stage starts its own world
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # everything is local: never wait on a hub
        env.setdefault(var, "1")
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, log.read_text(encoding="utf-8", errors="replace")


_ERROR_LINE = re.compile(r"^(?:[\w.]+: (?:\w+ )?error: |error: |[\w.]*(?:Error|Exception): )")


def error_lines(text: str, limit: int = 400) -> str:
    """The first error message of a failed stage (our tools' one-line errors, an exception) with its
    indented continuation lines; else its last line. torchrun's failure banner is not the message."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if _ERROR_LINE.match(ln.strip()) and "ChildFailedError" not in ln:
            more = []
            for nxt in lines[i + 1:i + 4]:
                if not nxt[:1].isspace():
                    break
                more.append(nxt.strip())
            return " / ".join([ln.strip(), *more])[:limit]
    return (lines[-1] if lines else "")[:limit]


def _numbers_anyway(stage: Stage, ctx: Ctx, text: str) -> Dict:
    """What a failed stage's output still tells (pytest's counts, the losses before a crash)."""
    try:
        return stage.parse(ctx, text)
    except CheckFailed as e:
        return e.args[1] if len(e.args) > 1 else {}
    except Exception:  # noqa: BLE001 - partial output; nothing to report
        return {}


def run_stage(stage: Stage, ctx: Ctx, clock: Clock) -> Dict:
    failed_deps = [d for d in stage.needs if ctx.results.get(d, {}).get("status") != "passed"]
    if failed_deps:
        return {"status": "skipped", "reason": f"needs {', '.join(failed_deps)}", "failure": True}
    cmd = stage.command(ctx)
    if cmd is None:
        return {"status": "skipped", "reason": stage.skip_reason, "failure": False}
    if clock.left() < 5:
        return {"status": "skipped", "reason": f"time budget ({clock.budget_s:.0f} s) used up", "failure": True}
    timeout = min(ctx.prof.timeouts.get(stage.name, DRY_RUN_STAGE_TIMEOUT_S), clock.left())
    log = ctx.out_dir / f"{stage.name}.log"
    clock.say(f"{stage.name}: start (timeout {timeout:.0f} s, log {log})")
    t0 = time.monotonic()
    rc, text = run_logged([str(c) for c in cmd], log, timeout)
    res = {"cmd": " ".join(map(str, cmd)), "log": str(log), "rc": rc, "wall_s": round(time.monotonic() - t0, 2)}
    if rc is None:
        res.update(status="failed", error=f"timed out after {timeout:.0f} s")
    elif rc != 0:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
        msg = lines[-1][:400] if stage.error_from_tail else error_lines(text)
        res.update(status="failed", error=f"exit code {rc}: {msg}", numbers=_numbers_anyway(stage, ctx, text))
    else:
        try:
            res.update(status="passed", numbers=stage.parse(ctx, text))
        except CheckFailed as e:
            res.update(status="failed", error=str(e.args[0]), numbers=e.args[1] if len(e.args) > 1 else {})
        except Exception as e:  # noqa: BLE001 - a parse error must not lose the other stages
            res.update(status="failed", error=f"could not read the output: {type(e).__name__}: {e}")
    return res


def headline(ctx: Ctx) -> Dict:
    """The numbers worth quoting, flat."""
    out = {}
    tr, rl = ctx.numbers("train"), ctx.numbers("reload")
    for k in ("loss_first_mean", "loss_last_mean", "theta_dev_max", "tokens_per_s", "step_time_s", "tflops"):
        if k in tr:
            out[f"train_{k}"] = tr[k]
    if "loss" in rl:
        out["reload_loss"] = rl["loss"]
    for shape in ("olmoe", "phimoe"):
        b = ctx.numbers(f"bench_{shape}")
        for k in ("ce_ia3_over_half_fwd_bwd", "half_ce_ia3_over_topk_fwd_bwd", "ce_ia3_over_half_fwd",
                  "half_ce_ia3_over_topk_fwd"):
            if k in b:
                out[f"bench_{shape}_{k}"] = b[k]
    pt = ctx.numbers("pytest_gpu")
    if pt:
        out["pytest_gpu"] = pt
    return out


def _short(res: Dict) -> str:
    if res["status"] == "passed":
        n = res.get("numbers", {})
        keys = [k for k in ("passed", "failed", "skipped", "params", "loss_first_mean", "loss_last_mean", "tflops",
                            "theta_dev_max", "loss", "ce_ia3_over_half_fwd_bwd", "half_ce_ia3_over_topk_fwd_bwd",
                            "logits_std", "device")
                if k in n]
        return ", ".join(f"{k}={n[k]:.4g}" if isinstance(n[k], float) else f"{k}={n[k]}" for k in keys)
    return res.get("error") or res.get("reason", "")


def print_table(summary: Dict):
    print(f"\n{'stage':<15}{'status':<9}{'wall s':>8}  details")
    for name, res in summary["stages"].items():
        wall = f"{res['wall_s']:.1f}" if "wall_s" in res else "-"
        print(f"{name:<15}{res['status']:<9}{wall:>8}  {_short(res)[:150]}")
    verdict = "PASSED" if summary["ok"] else "FAILED"
    print(f"\n{verdict} in {summary['wall_s']:.0f} s; summary: {summary['summary_path']}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check/summary.json", help="JSON summary (stage logs go next to it)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same stages, tiny shapes, on CPU")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock limit of the whole check (default 480 on GPU, 600 dry run)")
    ap.add_argument("--work-dir", default=None, help="checkpoints and exports (default: a temporary folder)")
    ap.add_argument("--keep-work", action="store_true", help="keep --work-dir (default: deleted at the end)")
    ap.add_argument("--stages", default=None, help="comma-separated subset of: " + ",".join(s.name for s in STAGES))
    args = ap.parse_args(argv)
    if args.stages:
        unknown = set(args.stages.split(",")) - {s.name for s in STAGES}
        if unknown:
            ap.error(f"--stages: unknown {', '.join(sorted(unknown))}")
    if args.budget_s is not None and args.budget_s <= 0:
        ap.error(f"--budget-s={args.budget_s} must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prof = CPU if args.cpu_dry_run else GPU
    clock = Clock(args.budget_s or prof.budget_s)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in WORK_SUBDIRS:  # a reused --work-dir: the trainer would resume from an old --save
        shutil.rmtree(work / sub, ignore_errors=True)
    ctx = Ctx(args, prof, out.parent, work)
    clock.say(f"mode {prof.name}, budget {clock.budget_s:.0f} s, work dir {work}")
    selected = set(args.stages.split(",")) if args.stages else None
    summary = {"mode": prof.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary_path": str(out),
               "config": {"hf_config": prof.hf_config, "k_a": prof.k_a, "iters": prof.iters, "seq": prof.seq,
                          "micro_batch": prof.micro_batch, "global_batch": prof.global_batch, "lr": prof.lr,
                          "train_flags": prof.train_flags, "bench_flags": prof.bench_flags},
               "stages": ctx.results}
    try:
        for stage in STAGES:
            if selected is not None and stage.name not in selected and stage.name != "env":
                continue
            res = run_stage(stage, ctx, clock)
            ctx.results[stage.name] = res
            clock.say(f"{stage.name}: {res['status']} {_short(res)[:200]}")
            _write(summary, out, clock, ctx)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    _write(summary, out, clock, ctx)
    print_table(summary)
    return 0 if summary["ok"] else 1


def _write(summary: Dict, out: Path, clock: Clock, ctx: Ctx):
    """Rewritten after every stage: a run killed from outside still leaves what it finished."""
    res = summary["stages"].values()
    summary["ok"] = all(r["status"] == "passed" or (r["status"] == "skipped" and not r.get("failure"))
                        for r in res)
    summary["wall_s"] = round(clock.elapsed(), 1)
    summary["headline"] = headline(ctx)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out)


def internal(argv: List[str]) -> int:
    """The helper commands the stages run (`python tools/gpu_check.py _name args...`)."""
    name, rest = argv[0], argv[1:]
    fn = {"_env": _env, "_build_hf": _build_hf, "_hf_forward": _hf_forward}[name]
    print(RESULT + json.dumps(fn(*rest)), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        sys.exit(internal(sys.argv[1:]))
    sys.exit(main())
