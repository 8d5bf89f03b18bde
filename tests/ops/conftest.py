"""Stand-ins for the fused CUDA kernels, written from their documented contracts (the docstrings and sources of
mamba_ssm's `selective_scan_fn` and `mamba_chunk_scan_combined` and causal-conv1d's `causal_conv1d_fn`), and
fixtures that plug them in so the `cuda` and `triton` adapters run unchanged on CPU.

The stand-ins check the layouts and dtypes the real kernels require, and compute per channel exactly as the kernels
define it — so an adapter that lays out, repeats or casts its arguments wrongly fails against `reference`.
"""
import pytest
import torch
import torch.nn.functional as F

from bsmamba2.ops import backends, scan_kernels


def selective_scan_standin(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """mamba_ssm's selective_scan_fn: u, delta (batch, dim, L); A (dim, dstate) float32; B, C (batch, G, dstate, L);
    D, delta_bias (dim,) float32; z (batch, dim, L). Channel c reads group c // (dim / G)."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    assert delta.shape == u.shape and delta.dtype == u.dtype, "u and delta: same shape and dtype"
    assert seqlen == 1 or (u.stride(-1) == 1 and delta.stride(-1) == 1), "u, delta: contiguous in the last dim"
    assert A.dtype == torch.float32 and A.shape == (dim, dstate) and dstate <= 256
    assert B.dim() == 4 and B.shape[0] == batch and B.shape[2:] == (dstate, seqlen) and dim % B.shape[1] == 0
    assert C.shape == B.shape and B.dtype == u.dtype and C.dtype == u.dtype
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        assert vector is None or (vector.dtype == torch.float32 and vector.shape == (dim,)), name
    assert z is None or z.shape == u.shape

    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels_per_group = dim // B.shape[1]
    B = B.float().repeat_interleave(channels_per_group, dim=1)          # (batch, dim, dstate, L)
    C = C.float().repeat_interleave(channels_per_group, dim=1)
    x = u.float()
    state = u.new_zeros(batch, dim, dstate, dtype=torch.float32)
    outputs = []
    for t in range(seqlen):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * x[:, :, t])[..., None] * B[..., t]
        outputs.append((state * C[..., t]).sum(-1))
    out = torch.stack(outputs, dim=-1)
    if D is not None:
        out = out + D[:, None] * x
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(u.dtype)
    return (out, state.detach()) if return_last_state else out    # the kernel's last state has no gradient


def chunk_scan_standin(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                       seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                       return_final_states=False):
    """mamba_ssm's Triton mamba_chunk_scan_combined: dt in float32, softplus(dt + dt_bias), then per head
    h_t = exp(dt·A) h + dt·x ⊗ B_g(h), y = C·h + D·x, times silu(z)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    assert dt.shape == (batch, seqlen, nheads) and A.shape == (nheads,) and nheads % ngroups == 0
    assert C.shape == B.shape == (batch, seqlen, ngroups, dstate) and isinstance(chunk_size, int)
    assert seq_idx is None and cu_seqlens is None and dt_limit == (0.0, float("inf"))
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    heads_per_group = nheads // ngroups
    state = torch.zeros(batch, nheads, headdim, dstate) if initial_states is None else initial_states.float()
    outputs = []
    for t in range(seqlen):
        B_t = B[:, t].float().repeat_interleave(heads_per_group, dim=1)    # (batch, nheads, dstate)
        C_t = C[:, t].float().repeat_interleave(heads_per_group, dim=1)
        decay = torch.exp(dt[:, t] * A.float())[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t].float())[..., None] * B_t[:, :, None, :]
        outputs.append((state * C_t[:, :, None, :]).sum(-1))
    y = torch.stack(outputs, dim=1)
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def causal_conv1d_standin(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                          final_states_out=None, activation=None):
    """causal-conv1d's causal_conv1d_fn: x (batch, dim, L) contiguous in L, or channel-last with dim and strides
    multiples of 8; weight (dim, width), width 2..4; bias in weight's dtype; silu once."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    assert activation in (None, "silu", "swish") and weight.shape == (dim, width) and 2 <= width <= 4
    assert x.stride(2) == 1 or (x.stride(1) == 1 and dim % 8 == 0 and x.stride(0) % 8 == 0
                                and x.stride(2) % 8 == 0), "layout the kernel rejects"
    assert bias is None or (bias.dtype == weight.dtype and bias.shape == (dim,))
    assert seq_idx is None and initial_states is None and not return_final_states
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float32) + (0 if bias is None else bias.float()[:, None])
    for tap in range(width):                       # tap k reads x[t − (width − 1 − k)]
        shift = width - 1 - tap
        if shift < seqlen:
            out[..., shift:] += weight[:, tap, None].float() * x[..., :seqlen - shift].float()
    out = F.silu(out) if activation in ("silu", "swish") else out
    return out.to(x.dtype)


STANDINS = {"selective_scan_fn": selective_scan_standin, "mamba_chunk_scan_combined": chunk_scan_standin,
            "causal_conv1d_fn": causal_conv1d_standin}


@pytest.fixture
def fresh_backend_log(monkeypatch):
    """Forget which backend choices were already logged, so each test sees its own log lines."""
    monkeypatch.setattr(backends, "_logged", set())
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def _use_standins(monkeypatch):
    monkeypatch.setattr(scan_kernels, "load_kernel", STANDINS.__getitem__)
    monkeypatch.setattr(scan_kernels, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))


@pytest.fixture
def kernel_standins(monkeypatch, fresh_backend_log):
    """Make the `cuda` and `triton` backends run on CPU tensors with the stand-in kernels."""
    _use_standins(monkeypatch)
    return STANDINS


@pytest.fixture
def backend_on(monkeypatch, fresh_backend_log):
    """backend_on(device): make every backend runnable on `device` — on the CPU with the stand-in kernels, on CUDA
    with the real ones; a test asking there for a backend whose kernels do not import is skipped with the reason."""
    def prepare(device: str, *names: str):
        if device == "cpu":
            _use_standins(monkeypatch)
            return
        for name in names:
            reason = backends.unavailable_reason(name, torch.device(device))
            if reason is not None:
                pytest.skip(f"scan backend {name} on {device}: {reason}")
    return prepare
