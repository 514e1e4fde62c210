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
    for name in ("| top-4 |", "| top-2 |", "| top-2+CE |"):
        assert name in table, table
    assert "recovery" in table
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["aggregate"]) == {"top-4", "top-2", "top-2+CE"}
    assert len(res["seeds"]) == 1
