#!/usr/bin/env bash
# The CUDA path checked on a real GPU (scripts/gpu_check.py says what it does; docs/scan.md#gpu-check, the recipe):
#   scripts/gpu_check.sh --stages build [--out DIR] [--wheels DIR]    # on a CUDA machine, offline: the kernels
#   scripts/gpu_check.sh --stages separate,kernel_tests,benchmark     # then the checks, with the kernels built
#   scripts/gpu_check.sh --dry-run                                     # the same pipeline on the CPU
# PYTHON (default python3) must be the Python that has torch: the check's venv reuses its packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
