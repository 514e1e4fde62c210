"""launch/plan.py runs on login nodes without torch: it reads the family presets through
megatron_ce.models.registry, whose import path (package __init__s, presets, CE export metadata) must
stay standard-library only. torch is made unimportable with a sys.modules shim."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_TORCH = "import sys, runpy; sys.modules['torch'] = None; "


def _run(code: str):
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_shim_blocks_torch():
    r = _run("import torch")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_plan_help_without_torch():
    r = _run("sys.argv = ['plan.py', '--help']; runpy.run_path('launch/plan.py', run_name='__main__')")
    assert r.returncode == 0, r.stderr
    assert "{olmoe,phimoe}" in r.stdout


def test_plan_estimate_without_torch():
    args = ["--model", "phimoe", "--world", "32", "--gpus-per-node", "8", "--tp", "1", "--pp", "4", "--ep", "8",
            "--seq", "4096", "--micro-batch", "1", "--global-batch", "128", "--k-a", "1"]
    r = _run(f"sys.argv = ['plan.py'] + {args!r}; runpy.run_path('launch/plan.py', run_name='__main__')")
    assert r.returncode == 0, r.stderr
    assert "layout: world 32" in r.stdout and "memory per GPU" in r.stdout


def test_presets_and_ce_exports_without_torch():
    r = _run("from megatron_ce.models import registry; import megatron_ce.models.olmoe, megatron_ce.models.phimoe; "
             "print(sorted(registry.ce_exports()), [registry.presets(m).bench_shape['k'] for m in "
             "registry.builtin_model_types()]); import megatron_ce.paper.configs")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['olmoe', 'phimoe'] [8, 2]"
