"""tools/gpu_check.sh: the --cpu-dry-run end to end (every stage that can run on CPU passes, the loss
decreases, theta moves, the export loads with finite logits), and its parts against independent
references: the FLOPs formula against torch's FLOP counter on transformers' OLMoE, the log parser against
the trainer's own log_line and TensorBoard scalars, the failure / timeout handling."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _load_tool()


# ---- the dry run, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out" / "summary.json"
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out),
         "--work-dir", str(tmp / "work"), "--keep-work"],
        capture_output=True, text=True, cwd=tmp, timeout=900)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), tmp


def test_dry_run_passes_every_cpu_stage(dry_run):
    proc, s, _ = dry_run
    stages = s["stages"]
    assert list(stages) == [st.name for st in gc.STAGES]  # every stage present, in order
    failed = {n: r.get("error") or r.get("reason") for n, r in stages.items() if r["status"] != "passed"}
    assert failed == {"pytest_gpu": "needs CUDA (not run with --cpu-dry-run)"}, proc.stdout[-4000:]
    assert stages["pytest_gpu"]["status"] == "skipped"
    assert proc.returncode == 0 and s["ok"] is True and s["mode"] == "cpu-dry-run"
    for name, r in stages.items():  # each run stage left its full log next to the summary
        if r["status"] == "passed":
            assert Path(r["log"]).parent == Path(s["summary_path"]).parent and Path(r["log"]).stat().st_size > 0
    assert "PASSED" in proc.stdout and "[gpu_check " in proc.stdout  # table and timestamped progress


def test_dry_run_training_numbers(dry_run):
    _, s, tmp = dry_run
    tr = s["stages"]["train"]["numbers"]
    iters = s["config"]["iters"]
    # The parsed losses equal the trainer's TensorBoard scalars (an independent record of the same run).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp / "work" / "tb"))
    ea.Reload()
    tb = [e.value for e in ea.Scalars("train/loss")]
    assert len(tb) == iters and tr["losses"] == pytest.approx(tb, rel=1e-4)
    w = min(5, iters // 2)
    assert sum(tb[-w:]) / w < sum(tb[:w]) / w  # the loss decreased
    assert tr["theta_dev_max"] > 0
    theta_max = max(abs(v - 1) for tag in ea.Tags()["scalars"] if tag.startswith("theta/")
                    for v in (e.value for e in ea.Scalars(tag)))
    assert theta_max > 0  # theta moved, per the trainer's own statistics
    assert tr["tflops"] > 0 and tr["tokens_per_step"] == s["config"]["global_batch"] * s["config"]["seq"]
    rl = s["stages"]["reload"]["numbers"]
    assert math.isfinite(rl["loss"]) and rl["loss"] < tr["loss_first_mean"] and rl["resumed"]


def test_dry_run_export_and_bench(dry_run):
    _, s, _ = dry_run
    hf = s["stages"]["hf_forward"]["numbers"]
    assert hf["logits_finite"] and hf["logits_shape"][-1] == s["config"]["hf_config"]["vocab_size"]
    assert hf["ce_tensors"] == 3 * s["config"]["hf_config"]["num_hidden_layers"]  # ia3: gate, up, down
    assert hf["theta_dev_max"] > 0  # the exported theta tables are not their init (ones)
    for shape in ("olmoe", "phimoe"):
        b = s["stages"][f"bench_{shape}"]["numbers"]
        assert b["ce_ia3_over_half_fwd_bwd"] > 0 and b["half_ce_ia3_over_topk_fwd_bwd"] > 0
        assert s["headline"][f"bench_{shape}_ce_ia3_over_half_fwd_bwd"] == b["ce_ia3_over_half_fwd_bwd"]


# ---- parts against independent references -----------------------------------------------------


def test_forward_flops_match_torch_flop_counter():
    """Without CE and with full (non-causal) attention, the formula is exactly the matmul FLOPs torch's
    FlopCounterMode counts in transformers' eager OLMoE forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = dict(gc.CPU.hf_config, num_attention_heads=8, num_key_value_heads=2)  # GQA too
    model = OlmoeForCausalLM(OlmoeConfig(**cfg, attn_implementation="eager", experts_implementation="eager")).eval()
    batch, seq = 2, 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg["vocab_size"], (batch, seq)))
    expected = gc.forward_flops_per_token(cfg, seq, k_a=0, causal=False) * batch * seq
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)
    # causal attention computes half the score matrix; training is 3x the forward
    d = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    causal_saving = gc.forward_flops_per_token(cfg, seq, 0, causal=False) - gc.forward_flops_per_token(cfg, seq, 0)
    assert causal_saving == 2 * d * seq * L
    assert gc.train_flops_per_token(cfg, seq, 0) == 3 * gc.forward_flops_per_token(cfg, seq, 0)


def test_ce_flops_run_k_m_experts():
    """With k_a compressed experts only k_m = k - k_a experts' matmuls remain (plus the small CE term)."""
    cfg, s = gc.GPU.hf_config, 2048
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    full = gc.forward_flops_per_token(cfg, s, 0)
    ce = gc.forward_flops_per_token(cfg, s, 4)
    assert full - ce == 2 * (4 * 6 * d * f - (2 * 4 + 4) * (2 * d + f))


def _log(step, total, loss, tok_s, theta):
    """A log line as the trainer writes it (megatron_ce.training.metrics.log_line)."""
    import torch

    from megatron_ce.training.metrics import log_line

    m = dict(loss=loss, lr=1e-3, grad_norm=1.5, tokens_per_s=tok_s)
    routing = {"layer": [1, 2], "aux_loss": [0.0, 0.0], "lb_loss": [1.0, 1.1], "load_cv": [0.3, 0.4],
               "aux_mass": [0.4, 0.5]}
    th = {"gate": torch.tensor([[1.0, 0.0, 1.0 - theta, 1.0 + theta]] * 2, dtype=torch.float64)}
    return log_line(step, total, m, routing, th)


def test_parse_train_log_reads_the_trainers_line():
    text = "\n".join(["noise iter", _log(1, 2, 6.5, 1234.0, 0.0), "loaded", _log(2, 2, 6.25, 2000.0, 3e-3)])
    rows = gc.parse_train_log(text)
    assert rows == {1: {"loss": 6.5, "tokens_per_s": 1234.0, "theta_dev": 0.0},
                    2: {"loss": 6.25, "tokens_per_s": 2000.0, "theta_dev": 3e-3}}


def _ctx(tmp_path, iters=4):
    import argparse

    prof = gc.Profile(name="cpu-dry-run", hf_config=gc.CPU.hf_config, k_a=2, hf_dtype="float32", train_flags=[],
                      iters=iters, seq=8, micro_batch=1, global_batch=2, lr=1e-3, save_optim=True,
                      bench_flags=[], budget_s=60, timeouts={"slow": 2})
    return gc.Ctx(argparse.Namespace(), prof, tmp_path, tmp_path)


def test_train_checks_fail_when_loss_rises_or_theta_is_still(tmp_path):
    ctx = _ctx(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("4")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_text("x")
    good = "\n".join(_log(i, 4, 7.0 - i / 10, 100.0, 1e-3 * i) for i in range(1, 5))
    nums = gc.train_parse(ctx, good)
    assert nums["loss_first_mean"] == pytest.approx(6.85) and nums["loss_last_mean"] == pytest.approx(6.65)
    # tokens/s: the median from iteration 3 on; TFLOPS = train FLOPs per token x tokens/s
    assert nums["tflops"] == pytest.approx(gc.train_flops_per_token(gc.CPU.hf_config, 8, 2) * 100.0 / 1e12)
    rising = "\n".join(_log(i, 4, 6.0 + i / 10, 100.0, 0.0) for i in range(1, 5))
    with pytest.raises(gc.CheckFailed, match="loss did not decrease.*theta did not move"):
        gc.train_parse(ctx, rising)
    with pytest.raises(gc.CheckFailed, match=r"no log line for iterations \[4\]"):
        gc.train_parse(ctx, "\n".join(_log(i, 4, 6.0, 100.0, 1e-3) for i in range(1, 4)))


def test_parse_pytest_counts_and_bench_ratios():
    assert gc.parse_pytest_counts("..s\n3 passed, 1 failed, 2 skipped, 466 deselected in 9.10s\n") == \
        {"passed": 3, "failed": 1, "skipped": 2, "deselected": 466}
    res = {"meta": {"baseline": "top4"}, "top8": {"fwd_ms": 10.0, "fwd_bwd_ms": 30.0},
           "top4": {"fwd_ms": 5.0, "fwd_bwd_ms": 16.0}, "top4+ce_ia3": {"fwd_ms": 6.0, "fwd_bwd_ms": 20.0},
           "top4+ce_hidden": {"fwd_ms": 5.5, "fwd_bwd_ms": 18.0}}
    r = gc.bench_ratios(res)
    assert r["ce_ia3_over_half_fwd_bwd"] == 20 / 16 and r["half_ce_ia3_over_topk_fwd_bwd"] == 20 / 30
    assert r["ce_hidden_over_half_fwd"] == 5.5 / 5 and r["half_ce_hidden_over_topk_fwd"] == 5.5 / 10


def test_failed_stage_is_recorded_and_dependents_skipped(tmp_path):
    ctx = _ctx(tmp_path)
    clock = gc.Clock(60)
    # the message, its indented detail, then a launcher's banner (torchrun prints one after a failed rank)
    script = "import sys; print('loading'); print('error: --x=1 is wrong'); print('  it must be 2'); " \
             "print('=' * 20); print('  exitcode: 3'); sys.exit(3)"
    bad = gc.Stage("bad", lambda c: [sys.executable, "-c", script], lambda c, t: {})
    slow = gc.Stage("slow", lambda c: [sys.executable, "-c", "import time; time.sleep(60)"], lambda c, t: {})
    after = gc.Stage("after", lambda c: ["true"], lambda c, t: {}, needs=("bad",))
    for st in (bad, slow, after):
        ctx.results[st.name] = gc.run_stage(st, ctx, clock)
    assert ctx.results["bad"]["status"] == "failed"
    assert ctx.results["bad"]["error"] == "exit code 3: error: --x=1 is wrong / it must be 2"
    assert ctx.results["slow"]["status"] == "failed" and "timed out" in ctx.results["slow"]["error"]
    assert ctx.results["slow"]["wall_s"] < 30  # killed at its own timeout (2 s)
    assert ctx.results["after"] == {"status": "skipped", "reason": "needs bad", "failure": True}
    summary = {"stages": ctx.results}
    gc._write(summary, tmp_path / "summary.json", clock, ctx)
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is False


def test_bad_flag_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--stages", "train,nope"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and "--stages: unknown nope" in proc.stderr
