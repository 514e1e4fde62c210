"""tools/evaluate.py end to end, offline: a tiny random OLMoE is converted to Megatron (with and without
compressed experts), exported back to HF, and evaluated with lm-eval on the two bundled local-JSONL
tasks (megatron_ce/eval/tasks: generation + exact match, multiple choice + acc).

The scores of a random model mean nothing; what is checked is that the run happens on *this* model: the
harness's per-sample log-likelihoods and greedy generations must equal those computed here directly
with transformers from the exported weights (CE modeling code via trust_remote_code), and the table
must report them. Plus the one-line errors of bad inputs.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from tests.models.families import make_hf_model, tiny_olmoe_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(REPO, "examples", "data", "tokenizer")
LIMIT = 8
MAX_GEN_TOKS = 8  # ce_tiny_addition.yaml's max_gen_toks (a change there fails the generation check)


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{"ia3", "hidden", "plain"} -> exported HF dirs of one tiny random OLMoE (vocab = the bundled
    tokenizer's 1024), none with tokenizer files."""
    root = tmp_path_factory.mktemp("evaluate")
    src = root / "hf"
    cfg = tiny_olmoe_config(vocab_size=1024, num_experts=8, num_experts_per_tok=4, max_position_embeddings=256)
    make_hf_model(cfg).save_pretrained(src)
    to_mc, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    out = {}
    for name, flags in (("ia3", ["--moe-ce-num-compressed", "2"]),
                        ("hidden", ["--moe-ce-num-compressed", "2", "--moe-ce-variant", "hidden"]),
                        ("plain", [])):
        mc, exp = root / f"mc_{name}", root / f"export_{name}"
        assert to_mc.main(["--load-dir", str(src), "--save-dir", str(mc), "--no-progress", *flags]) == 0
        assert to_hf.main(["--load-dir", str(mc), "--save-dir", str(exp), "--no-progress"]) == 0
        # exports of trainer checkpoints may lack a tokenizer: the tests cover that case whatever the
        # converter copies
        for f in os.listdir(exp):
            if f.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                os.remove(exp / f)
        out[name] = exp
    return out


def _evaluate(model_dir, tmp_path, *extra):
    """python tools/evaluate.py ... in a fresh process with the network switched off."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false",
               # a tiny model gains nothing from threads, and on a busy CPU torch's threaded index_add_
               # over a few rows (the MoE combine) costs ~100x its single-thread time
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--hf-model", str(model_dir),
           "--limit", str(LIMIT), "--device", "cpu", "--log-samples", *extra]
    if "--dtype" not in extra:
        cmd += ["--dtype", "float32"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _samples(out_dir, task, filter_name="none"):
    """The logged samples of one task under one lm-eval filter (each filter logs every document)."""
    with open(os.path.join(out_dir, f"results_samples_{task}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["filter"] == filter_name]


@pytest.fixture
def one_thread():
    """The reference forward passes run single-threaded, like the evaluated subprocess."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TOKENIZER)


@torch.no_grad()
def _loglikelihood(model, tok, context, continuation):
    """log p(continuation | context), the continuation's tokens being those that follow the context's
    in the tokenization of the whole string (lm-eval's definition)."""
    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


@torch.no_grad()
def _greedy(model, tok, prompt, stops=("\n", "Q:")):
    ids = torch.tensor([tok(prompt).input_ids])
    out = model.generate(ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for s in stops:
        text = text.split(s)[0]
    return text


def _check_choice(model, tok, samples, scores, tol=1e-4):
    """Each choice's log-likelihood equals ours (within `tol`); acc is the share of documents whose
    highest-likelihood choice is the label."""
    assert len(samples) == LIMIT
    hits = 0
    for s in samples:
        doc = s["doc"]
        ctx = f"{doc['question']}\nAnswer:"
        lls = [_loglikelihood(model, tok, ctx, " " + c) for c in doc["choices"]]
        got = [r[0][0] for r in s["resps"]]
        assert got == pytest.approx(lls, abs=tol), (doc, got, lls)
        # within a loose tolerance the order of near-equal choices may differ: score the harness's own
        best = lls if tol <= 1e-4 else got
        hits += int(max(range(len(best)), key=best.__getitem__) == doc["label"])
    assert scores["acc,none"] == pytest.approx(hits / LIMIT)


def _check_addition(model, tok, samples, scores):
    """Greedy generations equal ours; both extractions score as the YAML defines them (first integer
    anywhere / the whole answer is one integer) against the reference answer."""
    assert len(samples) == LIMIT
    flexible = strict = 0
    for s in samples:
        doc = s["doc"]
        text = _greedy(model, tok, f"Q: {doc['question']}\nA:")
        assert s["resps"][0][0].strip() == text.strip(), (doc, s["resps"], text)
        numbers = re.findall(r"-?[0-9]+", text)
        flexible += int(bool(numbers) and numbers[0] == doc["answer"])
        whole = re.fullmatch(r"\s*(-?[0-9]+)\s*", text)
        strict += int(bool(whole) and whole.group(1) == doc["answer"])
    assert scores["exact_match,flexible-extract"] == pytest.approx(flexible / LIMIT)
    assert scores["exact_match,strict-match"] == pytest.approx(strict / LIMIT)


def _check_outputs(out_dir, tasks):
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert set(results["results"]) == set(tasks)
    md = open(os.path.join(out_dir, "results.md"), encoding="utf-8").read()
    for t in tasks:
        assert f"|{t}" in md.replace(" ", "")
    return results


def test_ce_export_with_tokenizer_flag(exports, tmp_path, one_thread):
    """CE (ia3) export without tokenizer files: --tokenizer supplies one; default output dir."""
    model_dir = exports["ia3"]
    _evaluate(model_dir, tmp_path, "--tasks", "ce_tiny_addition,ce_tiny_choice", "--tokenizer", TOKENIZER)
    out_dir = os.path.join(model_dir, "eval")
    results = _check_outputs(out_dir, ["ce_tiny_addition", "ce_tiny_choice"])
    assert results["megatron_ce"]["compressed experts"] == "k_a=2 of top-4, variant ia3"
    model, tok = _reference_model(model_dir)
    assert type(model).__name__ == "OlmoeCEForCausalLM"
    _check_choice(model, tok, _samples(out_dir, "ce_tiny_choice"), results["results"]["ce_tiny_choice"])
    _check_addition(model, tok, _samples(out_dir, "ce_tiny_addition", "flexible-extract"),
                    results["results"]["ce_tiny_addition"])


def test_plain_export_with_its_own_tokenizer(exports, tmp_path, one_thread):
    """A plain export (stock OlmoeForCausalLM, no remote code) with the tokenizer copied in."""
    plain = tmp_path / "plain"
    shutil.copytree(exports["plain"], plain)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), plain)
    _evaluate(plain, tmp_path, "--tasks", "ce_tiny_choice,ce_tiny_addition", "--no-trust-remote-code")
    results = _check_outputs(plain / "eval", ["ce_tiny_addition", "ce_tiny_choice"])
    assert results["megatron_ce"]["compressed experts"] == "none (plain MoE)"
    model, tok = _reference_model(plain)
    assert type(model).__name__ == "OlmoeForCausalLM"
    _check_choice(model, tok, _samples(plain / "eval", "ce_tiny_choice"), results["results"]["ce_tiny_choice"])
    _check_addition(model, tok, _samples(plain / "eval", "ce_tiny_addition", "flexible-extract"),
                    results["results"]["ce_tiny_addition"])


def test_hidden_variant_bf16(exports, tmp_path, one_thread):
    """The `hidden` CE variant (the paper's equation) in bfloat16, multiple choice only, results in
    --output-path: log-likelihoods within bf16 rounding of the fp32 reference."""
    hidden, out_dir = exports["hidden"], tmp_path / "hidden_eval"
    _evaluate(hidden, tmp_path, "--tasks", "ce_tiny_choice", "--tokenizer", TOKENIZER, "--output-path", str(out_dir),
              "--dtype", "bfloat16")
    results = _check_outputs(out_dir, ["ce_tiny_choice"])
    assert results["megatron_ce"]["compressed experts"] == "k_a=2 of top-4, variant hidden"
    assert results["config"]["model_args"]["dtype"] == "bfloat16"
    model, tok = _reference_model(hidden)
    # bf16 moves these log-likelihoods (about -8) by up to 0.21; dropping CE (the stock model on the same
    # weights) moves them by about 0.9
    _check_choice(model, tok, _samples(out_dir, "ce_tiny_choice"), results["results"]["ce_tiny_choice"], tol=0.5)


# ------------------------------------------------------------------------------------- errors


def _error(capsys, argv):
    rc = _tool("evaluate").main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_one_line_errors(exports, tmp_path, capsys):
    ce = str(exports["ia3"])
    assert "no such directory" in _error(capsys, ["--hf-model", str(tmp_path / "nope"), "--tasks", "x"])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(capsys, ["--hf-model", str(tmp_path / "empty"), "--tasks", "x"])
    err = _error(capsys, ["--hf-model", ce, "--tasks", "ce_tiny_choice"])
    assert "the export has no tokenizer files" in err and "--tokenizer DIR" in err
    assert "drop --no-trust-remote-code" in _error(
        capsys, ["--hf-model", ce, "--tasks", "ce_tiny_choice", "--tokenizer", TOKENIZER, "--no-trust-remote-code"])
    assert "--tokenizer runs/x/tok: no such directory" in _error(
        capsys, ["--hf-model", ce, "--tasks", "ce_tiny_choice", "--tokenizer", "runs/x/tok"])
    assert "--confirm-run-unsafe-code" in _error(
        capsys, ["--hf-model", ce, "--preset", "paper-coding", "--tokenizer", TOKENIZER])
    assert "nothing to evaluate" in _error(capsys, ["--hf-model", ce, "--tokenizer", TOKENIZER])
    assert "--include-path nowhere: no such directory" in _error(
        capsys, ["--hf-model", ce, "--tasks", "ce_tiny_choice", "--tokenizer", TOKENIZER, "--include-path", "nowhere"])
    assert "--batch-size 0" in _error(capsys, ["--hf-model", ce, "--tasks", "ce_tiny_choice", "--tokenizer",
                                               TOKENIZER, "--device", "cpu", "--batch-size", "0"])


def test_tokenizer_larger_than_vocab_is_rejected():
    from types import SimpleNamespace

    from megatron_ce.eval.runner import EvalError, check_vocab

    lm = SimpleNamespace(tokenizer=[0] * 1025, model=SimpleNamespace(config=SimpleNamespace(vocab_size=1024)))
    with pytest.raises(EvalError, match="the tokenizer has 1025 tokens but M has vocab_size 1024"):
        check_vocab(lm, "M")
    check_vocab(SimpleNamespace(tokenizer=[0] * 1000, model=lm.model), "M")  # padding rows are fine


@pytest.mark.slow  # indexes all of lm-eval's ~15k task configs (10-20 s) to be sure the name is unknown
def test_unknown_task_is_one_line_before_loading(exports, capsys):
    err = _error(capsys, ["--hf-model", str(exports["ia3"]), "--tasks", "ce_tiny_choice,no_such_task",
                          "--tokenizer", TOKENIZER, "--device", "cpu"])
    assert "unknown task(s) no_such_task" in err


# lm-eval's folders holding the preset tasks: indexing only these keeps the test at a second, where
# indexing all of lm-eval's ~15k task configs takes 10-20 s
PRESET_TASK_DIRS = ("gsm8k", "humaneval", "mbpp", "ifeval", "bbh", "truthfulqa")


def _yaml_config(index, name):
    from lm_eval.tasks._yaml_loader import load_yaml

    # resolve_func=False: humaneval's utils would load HF `evaluate`'s code_eval from the Hub on import
    return load_yaml(index[name].yaml_path, resolve_func=False)


def test_presets_name_lm_eval_tasks():
    """Every preset task exists in the installed lm-eval and its YAML has the shot count, metric and
    filters that presets.py claims (what the paper used); a group is checked through its first task."""
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks._index import TaskIndex

    from megatron_ce.eval.presets import OPTIONAL_TASKS, PRESETS

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    index = TaskIndex.build([tasks_dir / d for d in PRESET_TASK_DIRS])
    rows = [r for rows in PRESETS.values() for r in rows] + list(OPTIONAL_TASKS.values())
    missing = [r.task for r in rows if r.task not in index]
    assert not missing, missing
    for r in rows:
        cfg = _yaml_config(index, r.task)
        if isinstance(cfg.get("task"), list):  # a group: its member tasks carry the settings
            cfg = _yaml_config(index, cfg["task"][0])
        assert cfg.get("num_fewshot", 0) == r.num_fewshot, (r.task, cfg.get("num_fewshot"))
        filters = [f["name"] for f in cfg.get("filter_list", [])] or ["none"]
        assert set(r.filters) <= set(filters), (r.task, filters)
        metrics = [m["metric"] for m in cfg["metric_list"]]
        if all(isinstance(m, str) and "/" not in m for m in metrics):  # not a `!function` metric
            assert r.metric in metrics, (r.task, metrics)
        for k, v in r.gen_kwargs.items():
            assert cfg["generation_kwargs"].get(k) == v, (r.task, k, cfg["generation_kwargs"])
        assert bool(cfg.get("unsafe_code", False)) == r.unsafe_code, r.task


def test_paper_metric_rows_and_shot_warnings():
    """The results.md headline picks the preset's metric under each of its filters, and a task run with
    other shots than the paper's is flagged (unless --num-fewshot asked for it)."""
    from megatron_ce.eval.runner import headline_rows, shot_mismatches

    results = {
        "results": {"gsm8k_cot_zeroshot": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5,
                                           "exact_match_stderr,strict-match": 0.1},
                    "bbh_cot_fewshot_navigate": {"exact_match,get-answer": 0.75}},
        "groups": {"bbh_cot_fewshot": {"exact_match,get-answer": 0.625}},
        "group_subtasks": {"bbh_cot_fewshot": ["bbh_cot_fewshot_navigate"]},
        "n-shot": {"gsm8k_cot_zeroshot": 0, "bbh_cot_fewshot_navigate": 1},
    }
    tasks = ["gsm8k_cot_zeroshot", "bbh_cot_fewshot", "ce_tiny_choice"]
    assert headline_rows(results, tasks) == [
        ["gsm8k_cot_zeroshot", "exact_match", "strict-match", "0.2500"],
        ["gsm8k_cot_zeroshot", "exact_match", "flexible-extract", "0.5000"],
        ["bbh_cot_fewshot", "exact_match", "get-answer", "0.6250"],
    ]
    assert shot_mismatches(results, tasks, None) == ["bbh_cot_fewshot_navigate: 1-shot (paper: 3)"]
    assert shot_mismatches(results, tasks, 1) == []
