"""examples/reproduce_tradeoff.py runs end to end in --quick mode and writes its tables, JSON and plot;
the selections are made on validation problems disjoint from the test problems."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "reproduce_tradeoff.py")
sys.path.insert(0, os.path.join(REPO, "examples"))


def _calibration_available():
    try:
        from megatron_ce.calibrate import calibrate_ce_model  # noqa: F401
    except ImportError:
        return False
    return True


def test_splits_are_disjoint_and_never_sampled():
    import random

    from reproduce.tasks import make_splits

    test, val, sample = make_splits(500, 200, 2)
    assert len(set(test)) == 500 and len(set(val)) == 200 and not set(test) & set(val)
    rng = random.Random(0)
    drawn = {sample(rng) for _ in range(5000)}
    assert not drawn & (set(test) | set(val))


def test_smoke_is_an_alias_of_quick():
    import reproduce_tradeoff

    assert reproduce_tradeoff.parse(["--smoke"]).quick and reproduce_tradeoff.parse(["--quick"]).quick


def test_reproduce_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    cal = _calibration_available()
    rows = ["top-4", "top-2", "top-1", "top-2+CE", "top-2+CE hidden", "top-1+CE", "top-2+CE lr-mult (val)",
            "top-2+tied θ lr-mult (val)"]
    rows += ["top-2+calCE (val)", "top-2+calCE lr-mult (val)"] if cal else []
    for name in rows:
        assert f"| {name} |" in table, table
    for section in ("## Recovery", "## Is there a gap?", "## Choices made on the validation", "## CPU sensitivity"):
        assert section in table, table
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete"
    n_test, seeds = res["settings"]["n_test"], res["seeds"]
    assert [s["seed"] for s in seeds] == list(range(res["settings"]["seeds"]))
    for s in seeds:
        assert all(len(r["correct"]) == len(r["nll_items"]) == n_test for r in s["variants"].values())
        pre = s["pretrain"]  # the gate's record: steps taken, the check after each piece, passed or not
        assert pre["steps"] == pre["gate_history"][-1][0] >= res["settings"]["pretrain_steps"]
        assert isinstance(pre["passed"], bool)
        for group, chosen in s["selected"].items():
            assert s["variants"][chosen]["spec"]["group"] == group
            assert s["variants"][group]["acc"] == s["variants"][chosen]["acc"]
        if cal:
            assert s["variants"]["top-2+calCE (val)"]["calibration"]["summary"]
    assert {r["ce"] for r in res["recovery"]} == set(rows) - {"top-4", "top-2", "top-1"}
    assert all(len(r["per_seed"]) == len(r["nll"]["per_seed"]) == len(seeds) for r in res["recovery"])
    assert all(p["gap_ci"] is not None for r in res["recovery"] for p in r["nll"]["per_seed"])
    assert res["settings"]["workers"] == 2 and len(res["machine"]["load_end"]) == 3
    sens = res["sensitivity"]
    assert sens["threads"] == [1, 2] and {"top-4", "top-2", "top-2+CE"} <= set(sens["variants"])
    assert res["aggregate"]["top-2"]["active_params"] < res["aggregate"]["top-2+CE"]["active_params"] \
        < res["aggregate"]["top-4"]["active_params"]
