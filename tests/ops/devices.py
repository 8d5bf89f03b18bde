"""The devices the scan tests run on: the CPU (the kernels played by conftest's stand-ins), and CUDA with the real
kernels. The CUDA instances carry the `cuda` marker (`pytest -m cuda` selects them; scripts/gpu_check.sh runs them)
and skip, with the reason, where there is no CUDA device or a kernel does not import (the `backend_on` fixture)."""
import pytest
import torch

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=ON_CUDA)]
