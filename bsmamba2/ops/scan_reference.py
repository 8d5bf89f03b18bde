"""The `reference` backend: the Mamba2 recurrence as a plain loop over time, and the causal conv by F.conv1d.

Slow on purpose and easy to check by eye; it is the oracle the tests compare every other backend with.
The state per step is (batch, nheads, headdim, dstate): nothing of size (batch, seqlen, dim, dstate) is built.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def discretize_dt(dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool) -> torch.Tensor:
    """The step size per (batch, time, head) in float32 (or float64): dt + dt_bias, then softplus if asked."""
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def add_skip(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """D·x + y with D per head (nheads,) or per head and channel (nheads, headdim); x: (..., nheads, headdim).
    The result has x's memory layout."""
    D = D.to(x.dtype)
    return (x * (D[:, None] if D.dim() == 1 else D)).add_(y)


def gate(y: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
    """y · silu(z), the output gate (no gate when z is None)."""
    return y if z is None else y * F.silu(z.to(y.dtype))


def scan_reference(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
                   dt_softplus=False, return_final_states=False):
    """h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t ⊗ B_t,  y_t = C_t·h_t + D·x_t, gated by silu(z) (`chunk_size` unused)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    dtype = torch.promote_types(x.dtype, torch.float32)
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    A = A.to(dt.dtype)
    head_group = torch.arange(nheads, device=x.device) // (nheads // ngroups)
    B = B.to(dtype)[:, :, head_group]                                   # (batch, seqlen, nheads, dstate)
    C = C.to(dtype)[:, :, head_group]
    xs = x.to(dtype)

    if initial_states is None:
        state = xs.new_zeros(batch, nheads, headdim, dstate)
    else:
        state = initial_states.to(dtype)
    outputs = []
    for x_t, dt_t, B_t, C_t in zip(xs.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t * A).to(dtype)                           # (batch, nheads)
        state = state * decay[:, :, None, None] + (dt_t.to(dtype)[:, :, None] * x_t)[..., None] * B_t[:, :, None]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C_t))
    y = torch.stack(outputs, dim=1) if outputs else xs.new_zeros(batch, 0, nheads, headdim)
    if D is not None:
        y = add_skip(y, xs, D)
    y = gate(y, z).to(x.dtype)
    return (y, state) if return_final_states else y


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            activation: Optional[str] = None) -> torch.Tensor:
    """Depthwise causal conv of (batch, dim, seqlen) with weight (dim, width): left context only, then silu."""
    dim, width = weight.shape
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :x.shape[-1]]
    return F.silu(y) if activation in ("silu", "swish") else y
