#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, what the GPU machine lacks for scripts/gpu_check.sh, into gpu_wheels/
# (ignored by git; carried to the GPU machine, which has no network):
#   - binary wheels of the runtime packages its image does not have, for its Python and platform;
#   - the source distributions of mamba-ssm and causal-conv1d, which gpu_check.sh builds there for the GPU present.
#
#   scripts/gpu_wheels.sh [DEST]          # DEST defaults to gpu_wheels/ in the repository root
#
# GPU_PYTHON_VERSION (default 3.12) is the GPU machine's Python. The image already has torch, numpy, pyyaml, tqdm,
# safetensors, einops, triton, transformers, ninja, setuptools, wheel and packaging; it lacks soundfile (which needs
# cffi, which needs pycparser) and soxr. Preparing the two sdists' metadata runs their setup.py, which imports torch:
# run this with a Python that has torch (any build; nothing is compiled here).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-gpu_wheels}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
PYTHON=${PYTHON:-python3}

RUNTIME=(soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12)
KERNELS=(mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0)

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    "${RUNTIME[@]}"
# *_SKIP_CUDA_BUILD: their setup.py then only describes the package (no nvcc, no CUDA torch needed here).
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: --no-build-isolation --dest "$DEST" \
    "${KERNELS[@]}"

ls -l "$DEST"
du -sh "$DEST"
