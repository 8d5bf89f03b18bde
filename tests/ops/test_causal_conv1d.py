"""causal_conv1d on every backend against the convolution written out tap by tap."""
import pytest
import torch
import torch.nn.functional as F

from bsmamba2.errors import BSMamba2Error
from bsmamba2.ops import causal_conv1d

from devices import DEVICES


def conv_by_hand(x, weight, bias, activation):
    """out[c, t] = bias[c] + Σ_k weight[c, k] · x[c, t − (width − 1) + k]  (zero before t = 0), silu once."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    for t in range(seqlen):
        for k in range(width):
            source = t - (width - 1) + k
            if source >= 0:
                out[:, :, t] += weight[:, k].double() * x[:, :, source].double()
    if bias is not None:
        out += bias.double()[:, None]
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "reference", "cuda"])
@pytest.mark.parametrize("width,seqlen,with_bias,activation", [
    (4, 9, True, "silu"), (4, 1, True, "silu"), (3, 2, False, None), (2, 7, True, None), (4, 3, False, "silu"),
])
def test_causal_conv1d_matches_hand_computation(backend, device, width, seqlen, with_bias, activation, backend_on):
    backend_on(device, backend)
    g = torch.Generator().manual_seed(width * 10 + seqlen)
    x = torch.randn(2, 16, seqlen, generator=g)
    weight = torch.randn(16, width, generator=g)
    bias = torch.randn(16, generator=g) if with_bias else None
    out = causal_conv1d(x.to(device), weight.to(device), None if bias is None else bias.to(device),
                        activation=activation, backend=backend)
    torch.testing.assert_close(out.cpu().double(), conv_by_hand(x, weight, bias, activation), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_channel_last_view_and_gradients_match_reference(backend, dtype, device, backend_on):
    """The mixer passes a (batch, dim, L) view of a channel-last projection; values and gradients as reference on
    the CPU in float32 (on the same, bf16-rounded values for bf16: a tolerance of bf16's 8-bit mantissa)."""
    backend_on(device, backend)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 11, 40, generator=g),           # (batch, L, features), conv over 24 of them
               torch.randn(24, 4, generator=g), torch.randn(24, generator=g)]
    tensors = [t.to(dtype) for t in tensors]
    results = {}
    for name, where, as_type in ((backend, device, dtype), ("reference", "cpu", torch.float32)):
        leaves = [t.to(where, as_type).clone().requires_grad_() for t in tensors]
        x = leaves[0][..., 8:32].transpose(1, 2)              # strided, channel-last view
        out = causal_conv1d(x, leaves[1], leaves[2], activation="silu", backend=name)
        projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(where)
        loss = (out.float() * projection).sum()
        results[name] = [t.cpu().float() for t in (out.detach(), *torch.autograd.grad(loss, leaves))]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, expected in zip(results[backend], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_bad_activation_and_shapes_raise():
    x, weight = torch.randn(1, 4, 5), torch.randn(4, 3)
    with pytest.raises(BSMamba2Error, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(BSMamba2Error, match="weight"):
        causal_conv1d(x, torch.randn(5, 3))
