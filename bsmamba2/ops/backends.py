"""Which implementation runs the scan and the conv: one choice per call site, made the same way everywhere.

Order of precedence: an explicit backend argument (the mixer passes `ModelConfig.scan_backend`), then the
environment variable BSMAMBA2_SCAN, then "auto" — `cuda` if mamba_ssm and causal-conv1d import and the tensors are
on CUDA, else `triton` if mamba_ssm's Triton scan imports there, else `torch`. An explicitly named backend that
cannot run raises BSMamba2Error with the reason; nothing falls back silently. Each choice is logged once.
"""
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import SCAN_BACKENDS
from ..errors import BSMamba2Error
from . import scan_kernels
from .scan_torch_compile import ssd_scan_compiled
from .scan_reference import causal_conv1d_reference, scan_reference
from .scan_torch import causal_conv1d_torch, ssd_scan

ENV_VAR = "BSMAMBA2_SCAN"
logger = logging.getLogger("bsmamba2")


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    scan: Callable
    conv: Callable
    kernels: tuple = ()          # fused kernels it needs (names in scan_kernels.KERNELS)
    needs: str = ""              # what to tell the user when they are missing


BACKENDS = {backend.name: backend for backend in (
    Backend("torch", "chunked SSD, pure PyTorch", ssd_scan, causal_conv1d_torch),
    Backend("torch+compile", "chunked SSD, pure PyTorch, torch.compile'd", ssd_scan_compiled, causal_conv1d_torch),
    Backend("cuda", "mamba_ssm selective_scan_fn + causal_conv1d_fn", scan_kernels.scan_selective,
            scan_kernels.conv_causal_conv1d, ("selective_scan_fn", "causal_conv1d_fn"),
            "mamba_ssm and causal_conv1d and CUDA tensors"),
    Backend("triton", "mamba_ssm Triton mamba_chunk_scan_combined, conv in PyTorch", scan_kernels.scan_triton,
            causal_conv1d_torch, ("mamba_chunk_scan_combined",), "mamba_ssm (with Triton) and CUDA tensors"),
    Backend("reference", "sequential loop over time, for tests", scan_reference, causal_conv1d_reference),
)}
BACKEND_NAMES = SCAN_BACKENDS  # the names the config accepts; tests check they are exactly BACKENDS' keys
_AUTO_ORDER = ("cuda", "triton", "torch")
_logged = set()


def resolve_backend(requested: Optional[str], device: torch.device) -> Backend:
    """The backend for tensors on `device`: `requested` (a name, "auto" or None), else $BSMAMBA2_SCAN, else auto."""
    source = "scan backend"
    name = requested
    if name in (None, "auto"):
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
        source = f"{ENV_VAR}={name}"
    if name == "auto":
        name = next(n for n in _AUTO_ORDER if unavailable_reason(n, device) is None)
        how = "auto"
    elif name not in BACKENDS:
        raise BSMamba2Error(f"{source}: unknown scan backend {name!r} (choose auto, {', '.join(BACKEND_NAMES)})")
    else:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BSMamba2Error(f"scan backend {name!r} needs {BACKENDS[name].needs}: {reason}")
        how = "requested" if source == "scan backend" else f"from {ENV_VAR}"
    backend = BACKENDS[name]
    message = f"scan backend: {backend.name} ({backend.description}) on {device.type}, {how}"
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
    return backend


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device` (None if it can)."""
    backend = BACKENDS[name]
    return scan_kernels.kernel_unavailable_reason(backend.kernels, device) if backend.kernels else None
