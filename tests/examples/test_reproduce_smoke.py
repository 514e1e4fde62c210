"""examples/reproduce_tradeoff.py runs end to end in --smoke mode and writes its table and plot."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "reproduce_tradeoff.py")


def test_reproduce_smoke(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    for name in ("| top-4 |", "| top-2 |", "| top-2+CE |", "| mass tau=0.5 |", "| mass tau=0.9 |"):
        assert name in table, table
    assert "recovery" in table
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    res = json.loads((out / "results.json").read_text())
    agg = res["aggregate"]
    assert set(agg) == {"top-4", "top-2", "top-2+CE", "mass tau=0.5", "mass tau=0.9"}
    assert len(res["seeds"]) == 1
    # the tau sweep: measured main experts per token in [1, 4], non-decreasing in tau, and a latency
    for n, tau in (("mass tau=0.5", 0.5), ("mass tau=0.9", 0.9)):
        g = agg[n]
        assert g["topk"] == 4 and g["tau"] == tau
        assert 1.0 <= g["main_mean"] <= 4.0 and len(g["main_per_layer"]) == res["settings"]["layers"]
        assert g["lat_mean"] > 0 and 0.0 <= g["acc_mean"] <= 1.0
        assert len(res["per_seed"][0][n]["lat_times"]) == res["settings"]["lat_iters"]
    assert agg["mass tau=0.5"]["main_mean"] <= agg["mass tau=0.9"]["main_mean"]
    active = {n: g["active_params"] for n, g in agg.items()}
    assert active["top-2"] < active["top-2+CE"] < active["top-4"]
    assert active["mass tau=0.5"] <= active["mass tau=0.9"] <= active["top-4"]
    assert "main / token" in table
