"""The `cuda` and `triton` backends: adapters from our contract to the fused kernels of mamba_ssm and causal-conv1d.

The kernels are obtained only through `load_kernel` — the one place those packages are imported, lazily and only
when a CUDA tensor asks for them (neither package imports on a machine without its CUDA extension). Tests replace
`load_kernel` with pure-PyTorch stand-ins that follow the kernels' documented signatures, so the adapter code below
runs unchanged on CPU.
"""
import functools
import importlib

import torch

from ..errors import BSMamba2Error

KERNELS = {
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
}

# Device types the fused kernels run on.
KERNEL_DEVICE_TYPES = ("cuda",)


def load_kernel(name: str):
    """Return the kernel function `name` (a key of KERNELS), or raise ImportError saying why it cannot load."""
    kernel, problem = _import_kernel(name)
    if kernel is None:
        raise ImportError(problem)
    return kernel


@functools.lru_cache(maxsize=None)
def _import_kernel(name: str):
    """Import once per process; a failure is remembered too, so 'auto' does not retry the import on every call."""
    module, attribute = KERNELS[name]
    try:
        return getattr(importlib.import_module(module), attribute), None
    except Exception as error:  # ImportError, or whatever a half-installed CUDA package raises on import
        return None, f"{type(error).__name__}: {error}".splitlines()[0]


def scan_selective(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   dt_softplus=False, return_final_states=False):
    """Mamba2's scan on mamba_ssm's `selective_scan_fn`: each head's scalar A and dt repeated over its headdim
    channels (the kernel is per channel), B and C given as ngroups groups, A/D/dt_bias in float32."""
    if initial_states is not None:
        raise BSMamba2Error("scan backend 'cuda' (selective_scan_fn) cannot start from initial_states; "
                            "use scan backend 'triton' or 'torch'")
    selective_scan_fn = load_kernel("selective_scan_fn")
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]

    def per_channel(t):                                 # (b, l, h, p) → (b, h·p, l), contiguous along l
        return t.permute(0, 2, 3, 1).reshape(batch, nheads * headdim, seqlen).contiguous()

    u = per_channel(x)
    delta = dt.transpose(1, 2).repeat_interleave(headdim, dim=1).to(u.dtype).contiguous()  # (b, h·p, l)
    A_channels = A.float().repeat_interleave(headdim)[:, None].repeat(1, dstate)   # (h·p, dstate)
    D_channels = None if D is None else (D.float().repeat_interleave(headdim) if D.dim() == 1 else D.float().flatten())
    bias_channels = None if dt_bias is None else dt_bias.float().repeat_interleave(headdim)
    out = selective_scan_fn(u, delta, A_channels, B.permute(0, 2, 3, 1).to(u.dtype), C.permute(0, 2, 3, 1).to(u.dtype),
                            D=D_channels, z=None if z is None else per_channel(z), delta_bias=bias_channels,
                            delta_softplus=dt_softplus, return_last_state=return_final_states)
    out, last_state = out if return_final_states else (out, None)
    y = out.view(batch, nheads, headdim, seqlen).permute(0, 3, 1, 2)
    if return_final_states:
        return y, last_state.view(batch, nheads, headdim, dstate)
    return y


def scan_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                dt_softplus=False, return_final_states=False):
    """mamba_ssm's own Triton `mamba_chunk_scan_combined` (same contract as ours)."""
    return load_kernel("mamba_chunk_scan_combined")(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=dt_softplus, return_final_states=return_final_states)


def conv_causal_conv1d(x, weight, bias=None, activation=None):
    """causal-conv1d's `causal_conv1d_fn`; x must be contiguous along time, or channel-last with 8-aligned strides."""
    dim = x.shape[1]
    channel_last_ok = x.stride(1) == 1 and dim % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0
    if x.stride(2) != 1 and not channel_last_ok:
        x = x.contiguous()
    if bias is not None:
        bias = bias.to(weight.dtype)                                      # the kernel wants bias in weight's dtype
    return load_kernel("causal_conv1d_fn")(x, weight, bias, activation=activation)


def kernel_unavailable_reason(names, device: torch.device):
    """Why the kernels `names` cannot run on `device`, or None if they can. Imports only for a kernel device."""
    if device.type not in KERNEL_DEVICE_TYPES:
        return f"the tensors are on {device.type}"
    for name in names:
        try:
            load_kernel(name)
        except ImportError as error:
            return str(error)
    return None
