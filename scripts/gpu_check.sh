#!/usr/bin/env bash
# The CUDA path checked on a real GPU in one run (scripts/gpu_check.py says what it does):
#   scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--time-limit S]    # on a CUDA machine; offline
#   scripts/gpu_check.sh --dry-run                                       # the same pipeline on the CPU
# PYTHON (default python3) must be the Python that has torch: the check's venv reuses its packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
