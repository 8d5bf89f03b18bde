"""The Mamba2 mixer and BSMamba2's bidirectional Mamba2 block.

Parameter names and shapes follow mamba_ssm's `Mamba2` (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj) and the
published BSMamba2 checkpoints (forward_blocks.0.norm, forward_blocks.0.mixer.*, backward_blocks.0.*, linear), so
their state dicts load as they are. The scan and the conv run on the backend chosen by `bsmamba2.ops`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import causal_conv1d, mamba_chunk_scan_combined


def _rms_normalize(x: torch.Tensor, eps: float, weight: torch.Tensor = None) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim (times weight), with the statistics in float32."""
    if hasattr(F, "rms_norm"):                      # torch ≥ 2.4: one fused pass
        return F.rms_norm(x, x.shape[-1:], None if weight is None else weight.to(x.dtype), eps)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps).to(x.dtype)
    return x if weight is None else x * weight.to(x.dtype)


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm: x / rms(x) · weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_normalize(x, self.eps, self.weight)


class RMSNormGated(nn.Module):
    """mamba_ssm's gated RMSNorm as Mamba2 uses it: norm(y · silu(z)) · weight, gate before the norm, statistics
    taken separately over each group of `group_size` channels (Mamba2: d_inner // ngroups)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int = None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or self.weight.requires_grad)):
            return self._normalize_in_place(F.silu(z).mul_(y))
        return self._normalize(y * F.silu(z))

    def _normalize(self, gated: torch.Tensor) -> torch.Tensor:
        """The norm as composed operations, which autograd differentiates."""
        if self.group_size == gated.shape[-1]:
            return _rms_normalize(gated, self.eps, self.weight)
        gated = _rms_normalize(gated.unflatten(-1, (-1, self.group_size)), self.eps).flatten(-2)
        return gated * self.weight.to(gated.dtype)

    def _normalize_in_place(self, gated: torch.Tensor) -> torch.Tensor:
        """The same norm, for inference: in three passes over `gated`, overwriting it (a composed RMSNorm writes
        the squares, the normalised values and their product with the weight, each to a new tensor)."""
        groups = gated.unflatten(-1, (-1, self.group_size))
        mean_square = torch.linalg.vector_norm(groups, dim=-1, keepdim=True, dtype=torch.float32).square_()
        groups.mul_(mean_square.div_(self.group_size).add_(self.eps).rsqrt_().to(gated.dtype))
        return gated.mul_(self.weight.to(gated.dtype))


class Mamba2(nn.Module):
    """Mamba2 mixer, mamba_ssm's `Mamba2` with its defaults (BSMamba2 passes its own values from the config):
    (batch, L, d_model) → same.

    in_proj gives z (d_inner), xBC (d_inner + 2·ngroups·d_state) and dt (nheads); xBC goes through a causal
    depthwise conv and silu and splits into x, B, C; the SSM scan runs per head; the output is gated by z inside
    the norm and projected back.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, scan_backend: str = "auto",
                 A_init_range=(1.0, 16.0), dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % headdim != 0 or (d_inner // headdim) % ngroups != 0:
            raise ValueError(f"Mamba2: headdim {headdim} must divide d_inner {d_inner} into a number of heads "
                             f"divisible by ngroups {ngroups}")
        self.d_state, self.d_inner = d_state, d_inner
        self.headdim, self.ngroups, self.nheads = headdim, ngroups, d_inner // headdim
        self.chunk_size = chunk_size
        self.scan_backend = scan_backend
        conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)

        # dt log-uniform in [dt_min, dt_max] (floored), stored as its inverse softplus: softplus(dt_bias) = dt.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))

        self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        g, n = self.ngroups, self.d_state
        zxbcdt = self.in_proj(u)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * g * n, self.nheads], dim=-1)
        # The conv runs on a (batch, channels, L) view of the channel-last projection: no transposed copy.
        xBC = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                            backend=self.scan_backend).transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        # The kernels want A, D and dt_bias in float32, also under autocast or in a half-precision model.
        y = mamba_chunk_scan_combined(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(self.A_log.float()),
            B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)), self.chunk_size, D=self.D.float(),
            dt_bias=self.dt_bias.float(), dt_softplus=True, backend=self.scan_backend)
        return self.out_proj(self.norm(y.flatten(2), z))


class PreNormResidual(nn.Module):
    """x + mixer(RMSNorm(x)): one branch of the bidirectional block (mamba_ssm's Block without an MLP)."""

    def __init__(self, dim: int, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim, eps=1e-5)
        self.mixer = Mamba2(dim, **mixer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class BidirectionalMamba2(nn.Module):
    """BSMamba2's bidirectional block: (batch, L, dim) → (batch, L, dim).

    A forward branch and a backward branch (own weights; the backward one reads the sequence reversed), their
    outputs concatenated and projected back to dim by a kernel-1 ConvTranspose1d, plus the block input.
    """

    def __init__(self, dim: int, **mixer_kwargs):
        super().__init__()
        self.forward_blocks = nn.ModuleList([PreNormResidual(dim, **mixer_kwargs)])
        self.backward_blocks = nn.ModuleList([PreNormResidual(dim, **mixer_kwargs)])
        self.linear = nn.ConvTranspose1d(2 * dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forward = x
        for block in self.forward_blocks:
            forward = block(forward)
        backward = x.flip(1)
        for block in self.backward_blocks:
            backward = block(backward)
        both = torch.cat([forward, backward.flip(1)], dim=-1)
        if not isinstance(self.linear, nn.ConvTranspose1d):   # bsmamba2.quantize's int8 stand-in for it
            return x + self.linear(both)
        # A kernel-1 ConvTranspose1d is a linear map with weight (in, out, 1): apply it channel-last as a matmul.
        return x + F.linear(both, self.linear.weight[:, :, 0].t(), self.linear.bias)
