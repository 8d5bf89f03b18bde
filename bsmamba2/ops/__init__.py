"""Mamba2's scan and causal conv with mamba_ssm's and causal-conv1d's contracts, on interchangeable backends.

    y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True)
    xBC = causal_conv1d(xBC, weight, bias, activation="silu")

Backends (see `backends.py` for how one is chosen): `torch` (chunked SSD in plain PyTorch, any device, the default
off CUDA), `torch+compile` (the same under torch.compile), `cuda` (mamba_ssm's selective_scan_fn and causal-conv1d),
`triton` (mamba_ssm's Triton chunk scan), `reference` (a sequential loop, the oracle for tests).
"""
from typing import Optional

import torch

from ..errors import BSMamba2Error
from .backends import BACKEND_NAMES, ENV_VAR, resolve_backend

__all__ = ["mamba_chunk_scan_combined", "causal_conv1d", "resolve_backend", "BACKEND_NAMES", "ENV_VAR"]


def mamba_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                              chunk_size: int, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                              dt_bias: Optional[torch.Tensor] = None, initial_states: Optional[torch.Tensor] = None,
                              dt_softplus: bool = False, return_final_states: bool = False,
                              backend: Optional[str] = None):
    """Mamba2's selective state-space scan, per head h and time t (state h_t of size headdim × dstate):

        dt_t ← softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias
        h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t,    y_t = (C_t·h_t + D·x_t) · silu(z_t)

    x (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads); A (nheads,); B, C (batch, seqlen, ngroups,
    dstate) with nheads % ngroups == 0; D (nheads,) or (nheads, headdim); z like x; dt_bias (nheads,);
    initial_states (batch, nheads, headdim, dstate). Returns y like x, and the final states if asked (float32).
    `chunk_size` is the SSD chunk length (any seqlen works; nothing needs to be a multiple of it).
    """
    _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states)
    scan = resolve_backend(backend, x.device).scan
    return scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                dt_softplus=dt_softplus, return_final_states=return_final_states)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise causal conv: x (batch, dim, seqlen) (contiguous, or a channel-last view), weight (dim, width),
    bias (dim,); out_t = bias + Σ_k weight[:, k]·x_{t-width+1+k}, then silu once if activation is "silu"/"swish"."""
    if activation not in (None, "silu", "swish"):
        raise BSMamba2Error(f"causal_conv1d: activation must be None, 'silu' or 'swish', not {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise BSMamba2Error(f"causal_conv1d: expected x (batch, dim, seqlen) and weight (dim, width), "
                            f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    return resolve_backend(backend, x.device).conv(x, weight, bias, activation=activation)


def _check_scan_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states):
    if x.dim() != 4:
        raise BSMamba2Error(f"mamba_chunk_scan_combined: x must be (batch, seqlen, nheads, headdim), "
                            f"got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or nheads % B.shape[2] != 0:
        raise BSMamba2Error(f"mamba_chunk_scan_combined: B must be (batch, seqlen, ngroups, dstate) with ngroups "
                            f"dividing nheads={nheads}, got {tuple(B.shape)} for x {tuple(x.shape)}")
    expected = {"dt": (dt, (batch, seqlen, nheads)), "A": (A, (nheads,)), "C": (C, tuple(B.shape)),
                "z": (z, tuple(x.shape)), "dt_bias": (dt_bias, (nheads,)),
                "initial_states": (initial_states, (batch, nheads, headdim, B.shape[3]))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise BSMamba2Error(f"mamba_chunk_scan_combined: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise BSMamba2Error(f"mamba_chunk_scan_combined: D must be ({nheads},) or ({nheads}, {headdim}), "
                            f"got {tuple(D.shape)}")
