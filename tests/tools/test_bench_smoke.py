"""The bench scripts run end to end in --smoke mode (no timing assertions)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *flags):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", script), "--smoke", "--json", *flags],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("\n{") + 1:] if not out.stdout.startswith("{") else out.stdout)


@pytest.mark.parametrize("model", ["olmoe", "phimoe"])
def test_bench_latency_smoke(model):
    res = _run("bench_latency.py", "--model", model, "--batch", "2")
    names = [r["name"] for r in res["rows"]]
    k = res["config"]["num_experts_per_tok"]
    assert names == [f"top-{k}", f"top-{k // 2}", f"top-{k // 2}+CE(ia3)", f"top-{k // 2}+CE(hidden)"]
    assert all(r["mean_s"] > 0 and r["iters"] == 2 for r in res["rows"])
    assert res["rows"][0]["ratio_vs_topk"] == 1.0


def test_bench_train_throughput_smoke():
    res = _run("bench_train_throughput.py")
    for name in ("mcore", "hf"):
        assert res[name]["tokens_per_s"] > 0
    # same config: the same parameter count (CE tables included) in both implementations
    assert res["mcore"]["params"] == res["hf"]["params"]
    assert res["ratio_mcore_over_hf"] > 0 and "meets_target" in res
