"""The devices the scan tests run on: the CPU (the kernels played by conftest's stand-ins), and CUDA with the real
kernels. The CUDA instances carry the `cuda` marker (`pytest -m cuda` selects them; scripts/gpu_check.sh runs them)
and ids ending in `gpu` (so that `-k "triton or cuda-"` selects the kernel backends' cases), and skip, with the
reason, where there is no CUDA device or a kernel does not import (the `backend_on` fixture).

On CUDA, mamba_ssm's Triton kernels autotune and compile about a hundred kernels for each new chunk size, headdim
and d_state (minutes), so the `triton` backend runs there only at the paper's (TRITON_SHAPE), in float32 and bf16.
"""
import pytest
import torch

ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="gpu", marks=ON_CUDA)]
TRITON_SHAPE = {"chunk_size": 128, "headdim": 64, "dstate": 128}


def on_devices(*values, id: str, skip_on_cuda: bool = False):
    """pytest.params of `values` (a tuple) with each device appended: on the CPU, and on CUDA unless skip_on_cuda."""
    params = [pytest.param(*values, "cpu", id=f"{id}-cpu")]
    if not skip_on_cuda:
        params.append(pytest.param(*values, "cuda", id=f"{id}-gpu", marks=ON_CUDA))
    return params
