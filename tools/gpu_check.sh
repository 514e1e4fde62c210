#!/usr/bin/env bash
# One-command GPU check (issue 12): pytest -m gpu, convert -> train 20 iterations (TE, bf16, grouped GEMM,
# distributed optimizer, CE) -> reload -> HF export, and the MoE-layer benchmark at both full shapes, in
# at most 8 minutes on one GPU; one JSON summary (--out) with each stage's log next to it.
#   bash tools/gpu_check.sh [--out runs/gpu_check/summary.json]
#   bash tools/gpu_check.sh --cpu-dry-run --out /tmp/gpu_check/summary.json   # tiny shapes, on CPU
# All flags: python tools/gpu_check.py --help. Exit code 0 only if every stage passed.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
