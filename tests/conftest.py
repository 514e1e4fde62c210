"""Shared pytest set-up: markers, slow/gpu gating, import path.

Markers:
  slow  multi-process configurations beyond the core ones; skipped unless ``--runslow`` is given,
        ``RUN_SLOW=1`` is set, or ``-m`` selects them (e.g. ``-m slow``).
  gpu   needs CUDA; skipped automatically when ``torch.cuda.is_available()`` is False.
"""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `import megatron_ce` / `tests.*` without an install
    sys.path.insert(0, str(REPO_ROOT))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run @pytest.mark.slow tests")


# Backstop for every test (pytest-timeout): a hang fails the test instead of stalling CI. Multi-process
# tests also carry their own, shorter limits (marks, or the harness's per-launch timeouts).
DEFAULT_TIMEOUT_S = 900


def pytest_configure(config):
    if getattr(config.option, "timeout", "absent") is None:  # plugin present, no --timeout given
        config.option.timeout = DEFAULT_TIMEOUT_S
    config.addinivalue_line("markers", "slow: multi-process configurations beyond the core ones (--runslow)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped when torch.cuda.is_available() is False")


def _run_slow(config) -> bool:
    return (
        config.getoption("--runslow")
        or os.environ.get("RUN_SLOW", "") not in ("", "0")
        or "slow" in (config.getoption("-m") or "")
    )


def pytest_collection_modifyitems(config, items):
    run_slow = _run_slow(config)
    has_cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: use --runslow (or RUN_SLOW=1, -m slow)"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="gpu: CUDA is not available"))
