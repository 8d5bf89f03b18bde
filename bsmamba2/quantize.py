"""int8 inference on the CPU: the Mamba2 blocks' projections as dynamically quantized int8 matmuls.

    model = bsmamba2.load_model("model.ckpt", quantize="int8")     # = --quantize int8, Separator(quantize="int8")

Each quantized layer keeps its weight as int8 with one scale per output channel; every call quantizes its input
to 8 bits (7 on some x86 CPUs: `_reduce_range`) with one scale for the whole tensor (dynamic quantization) and
multiplies in torch's int8 CPU kernels (fbgemm on x86, qnnpack on ARM), accumulating in int32 and returning
float32. These are the kernels behind `torch.ao.quantization.quantize_dynamic`, called directly. That API is
deprecated (torch 2.13 warns that it will be removed, pointing to torchao), and so are the quantized tensors the
kernels' weight packing takes; but torchao's `quantize_`, the replacement, runs int8 eagerly on the CPU slower
than float32: it is built for torch.compile (docs/performance.md has the measurements). So we use the kernels
while torch has them, check on first use that they run, and refuse --quantize int8 in one line without them.

Which layers: in every bidirectional Mamba2 block, the mixers' in_proj (dt projection included) and out_proj
and the merge of the two directions: most of the network's matmul work. The band split and the mask estimators
stay float32: together about one percent of the time, and they touch the spectrum directly.
"""
from __future__ import annotations

import functools
import platform
import warnings
from typing import Optional

import torch
from torch import nn

from .config import QUANTIZE_MODES
from .errors import BSMamba2Error
from .models.mamba2 import BidirectionalMamba2



class Int8Linear(nn.Module):
    """A linear layer x·weightᵀ + bias with an int8 weight (one scale per output channel) and inputs quantized per
    call; float32 in and out, any leading dimensions. Inference only: it has no parameters to train or save."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        # torch's per-channel quantization wants float64 scales and int64 zero points
        scales = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # the deprecation of quantized tensors (module docstring): nothing to do
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
            quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        bias = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, _reduce_range())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@functools.lru_cache(maxsize=None)
def _reduce_range() -> bool:
    """7-bit activations (torch's default for x86) on x86 CPUs without VNNI, whose int8 kernels sum pairs of
    products in 16 bits that full-range inputs could saturate; 8 bits (a closer match to float32) elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False                                  # ARM (qnnpack): no 16-bit intermediate sums
    try:
        with open("/proc/cpuinfo") as file:
            flags = file.read()
    except OSError:                                   # no way to tell: the safe choice
        return True
    return not any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni"))


def quantize_model(model: nn.Module, mode: Optional[str], device: torch.device) -> nn.Module:
    """`model` (on the CPU, in eval mode) with its projections replaced by `Int8Linear`, in place; mode None
    leaves it as it is. Raises BSMamba2Error where int8 cannot run."""
    if mode is None:
        return model
    check_quantize(mode, device)
    for block in [module for module in model.modules() if isinstance(module, BidirectionalMamba2)]:
        for mixer in (branch.mixer for branch in (*block.forward_blocks, *block.backward_blocks)):
            mixer.in_proj = Int8Linear(mixer.in_proj.weight, mixer.in_proj.bias)
            mixer.out_proj = Int8Linear(mixer.out_proj.weight, mixer.out_proj.bias)
        # the merge is a kernel-1 ConvTranspose1d, weight (in, out, 1): a linear layer with weight (out, in)
        block.linear = Int8Linear(block.linear.weight[:, :, 0].t(), block.linear.bias)
    return model


def check_quantize(mode: Optional[str], device) -> None:
    """Fail fast, on one line, where `mode` cannot run: an unknown mode, a device other than the CPU, a torch
    without int8 CPU kernels."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise BSMamba2Error(f"quantize {mode}: expected {', '.join(QUANTIZE_MODES)}")
    device = torch.device(device)
    if device.type != "cpu":
        raise BSMamba2Error(f"quantize {mode}: runs on the CPU only, not on {device} (choose device cpu)")
    if unavailable := int8_unavailable_reason():
        raise BSMamba2Error(f"quantize {mode}: {unavailable}")


@functools.lru_cache(maxsize=None)
def int8_unavailable_reason() -> Optional[str]:
    """Why torch's int8 CPU kernels cannot run in this torch build (None if they can): one tiny layer is tried."""
    if torch.backends.quantized.engine == "none":
        return f"torch {torch.__version__} has no quantized CPU engine"
    try:
        Int8Linear(torch.ones(4, 4))(torch.ones(1, 4))
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        return f"torch {torch.__version__} has no int8 CPU kernels ({str(error).splitlines()[0]})"
    return None
