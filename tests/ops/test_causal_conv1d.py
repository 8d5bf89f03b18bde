"""causal_conv1d on every backend against the convolution written out tap by tap."""
import pytest
import torch
import torch.nn.functional as F

from bsmamba2.errors import BSMamba2Error
from bsmamba2.ops import causal_conv1d


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


@pytest.mark.parametrize("backend", ["torch", "reference", "cuda"])
@pytest.mark.parametrize("width,seqlen,with_bias,activation", [
    (4, 9, True, "silu"), (4, 1, True, "silu"), (3, 2, False, None), (2, 7, True, None), (4, 3, False, "silu"),
])
def test_causal_conv1d_matches_hand_computation(backend, width, seqlen, with_bias, activation, kernel_standins):
    g = torch.Generator().manual_seed(width * 10 + seqlen)
    x = torch.randn(2, 16, seqlen, generator=g)
    weight = torch.randn(16, width, generator=g)
    bias = torch.randn(16, generator=g) if with_bias else None
    out = causal_conv1d(x, weight, bias, activation=activation, backend=backend)
    torch.testing.assert_close(out.double(), conv_by_hand(x, weight, bias, activation), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_channel_last_view_and_gradients_match_reference(backend, kernel_standins):
    """The mixer passes a (batch, dim, L) view of a channel-last projection; values and gradients as reference."""
    g = torch.Generator().manual_seed(0)
    projection = torch.randn(2, 11, 40, generator=g)          # (batch, L, features), conv over 24 of them
    weight = torch.randn(24, 4, generator=g)
    bias = torch.randn(24, generator=g)
    results = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (projection, weight, bias)]
        x = leaves[0][..., 8:32].transpose(1, 2)              # strided, channel-last view
        out = causal_conv1d(x, leaves[1], leaves[2], activation="silu", backend=name)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum()
        results[name] = (out.detach(), torch.autograd.grad(loss, leaves))
    out, grads = results[backend]
    out_ref, grads_ref = results["reference"]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


def test_bad_activation_and_shapes_raise():
    x, weight = torch.randn(1, 4, 5), torch.randn(4, 3)
    with pytest.raises(BSMamba2Error, match="activation"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(BSMamba2Error, match="weight"):
        causal_conv1d(x, torch.randn(5, 3))
