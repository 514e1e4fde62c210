#!/usr/bin/env bash
# The test command (README "Tests"; .ci/run calls exactly this): both supported lines, one after the other.
#
#   lane 3.11: this Python with torch 2.13.0 (the local CPU build) and megatron-core 0.16.1, full suite
#   lane 3.12: Python 3.12 (pyenv or PATH) in a cached venv with torch 2.14.1 (a CUDA build from the
#              registry that runs on the CPU) and megatron-core 0.19.x: the suite except the two-node
#              loopback launches (tests/training/test_multinode.py: torchrun/rendezvous plumbing that
#              does not change with megatron-core, and the slowest file), to keep the lane short
#
# LANES="3.11 3.12" (default) picks lanes; arguments replace the default pytest arguments (`tests -q`),
# e.g. `LANES=3.12 bash tools/run_tests.sh -q -x tests/ce`. The 3.12 venv is kept in
# MEGATRON_CE_VENV312 (default ~/.cache/megatron-ce/venv-py312-torch2.14.1) and reused while its torch
# pin matches, so only the first run pays the download; each run re-installs this checkout into it
# (editable, no dependency changes unless setup.py's changed). Each lane prints its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
LANES="${LANES:-3.11 3.12}"
if [[ $# -eq 0 ]]; then set -- tests -q; fi
TORCH312="2.14.1"
VENV312="${MEGATRON_CE_VENV312:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-ce/venv-py312-torch${TORCH312}}"

find_python312() {
    # A pyenv shim answers `command -v` even when 3.12 is not the active version, so each candidate must
    # actually run and be 3.12; pyenv's own install folders come first.
    local p
    for p in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
        if [[ -n "$p" && -x "$p" ]] && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    echo "run_tests.sh: lane 3.12 needs a Python 3.12 interpreter (pyenv install 3.12, or LANES=3.11)" >&2
    return 1
}

lane_311() {
    pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest "$@"
}

lane_312() {
    local py
    py="$(find_python312)"
    if [[ ! -f "$VENV312/.torch-$TORCH312" ]]; then  # absent or half-built: start clean
        rm -rf "$VENV312"
        "$py" -m venv "$VENV312"
        "$VENV312/bin/pip" install -q --upgrade pip
        "$VENV312/bin/pip" install -q "torch==$TORCH312"
        touch "$VENV312/.torch-$TORCH312"
    fi
    "$VENV312/bin/pip" install -q -e ".[test]"
    "$VENV312/bin/python" -m pytest --ignore=tests/training/test_multinode.py "$@"
}

for lane in $LANES; do
    start=$SECONDS
    echo "=== lane Python $lane ==="
    case "$lane" in
        3.11) lane_311 "$@" ;;
        3.12) lane_312 "$@" ;;
        *) echo "run_tests.sh: LANES: unknown lane $lane (3.11 or 3.12)" >&2; exit 2 ;;
    esac
    echo "=== lane Python $lane passed in $((SECONDS - start)) s ==="
done
