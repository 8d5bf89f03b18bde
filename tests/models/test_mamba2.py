"""The Mamba2 mixer and the bidirectional block: checkpoint names and shapes, initialisation, and behaviour."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bsmamba2.models.mamba2 import BidirectionalMamba2, Mamba2, RMSNorm, RMSNormGated

# Every parameter name and shape of the published BSMamba2 vocals checkpoints (the authors' and Music-Source-
# Separation-Training's bs_mamba2_vocals.ckpt): {name: list(tensor.shape)}, 675 tensors, kept in the repository so
# that the tests need neither the 193 MB download nor anything outside the repository.
OFFICIAL_KEYS = Path(__file__).resolve().parents[1] / "data" / "official_vocals_keys.json"
TINY = dict(d_state=8, expand=2, headdim=8, ngroups=2, chunk_size=4)


def test_paper_mixer_shapes():
    mixer = Mamba2(256, expand=4)                            # mamba_ssm's defaults (d_state 128, headdim 64) but expand
    assert mixer.nheads == 16
    assert mixer.in_proj.weight.shape == (2320, 256) and mixer.in_proj.bias is None
    assert mixer.conv1d.weight.shape == (1280, 1, 4) and mixer.conv1d.bias.shape == (1280,)
    assert mixer.out_proj.weight.shape == (256, 1024) and mixer.out_proj.bias is None
    assert mixer.norm.weight.shape == (1024,) and mixer.norm.group_size == 1024


def test_block_names_and_shapes_match_the_published_checkpoint():
    block = BidirectionalMamba2(256, d_state=128, expand=4, headdim=64)
    keys = json.loads(OFFICIAL_KEYS.read_text())
    official = {name[len("layers.0.0."):]: shape for name, shape in keys.items() if name.startswith("layers.0.0.")}
    assert {name: list(t.shape) for name, t in block.state_dict().items()} == official


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    mixer = Mamba2(256, expand=4)
    A = torch.exp(mixer.A_log)
    assert ((A >= 1) & (A <= 16)).all() and A.std() > 1                       # U(1, 16)
    dt = F.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()                 # log-uniform in [1e-3, 0.1]
    assert dt.min() < 0.01 < dt.max()
    assert torch.equal(mixer.D, torch.ones(16))
    assert torch.equal(mixer.norm.weight, torch.ones(1024))


@pytest.mark.parametrize("group_size", [4, 8])
def test_rmsnorm_gated_inference_path_matches_the_autograd_one(group_size):
    """Without autograd the gated norm takes its in-place path: same values, inputs left as they were."""
    torch.manual_seed(0)
    norm = RMSNormGated(8, eps=1e-5, group_size=group_size)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    y, z = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    y_before, z_before = y.clone(), z.clone()
    expected = norm(y, z)
    assert expected.requires_grad
    with torch.inference_mode():
        got = norm(y, z)
    torch.testing.assert_close(got, expected.detach())
    assert torch.equal(y, y_before) and torch.equal(z, z_before)


def test_rmsnorm_gated_normalises_each_group_after_gating():
    torch.manual_seed(0)
    norm = RMSNormGated(8, eps=1e-5, group_size=4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    gated = (y * F.silu(z)).view(3, 2, 4)
    expected = (gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 8) * norm.weight
    torch.testing.assert_close(norm(y, z), expected)
    plain = RMSNorm(8)
    torch.testing.assert_close(plain(y), y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_mixer_is_causal_and_keeps_shape():
    torch.manual_seed(0)
    mixer = Mamba2(16, **TINY)
    u = torch.randn(2, 13, 16)
    out = mixer(u)
    assert out.shape == u.shape
    changed = u.clone()
    changed[:, 9] += 1.0
    delta = (mixer(changed) - out).abs().amax(dim=(0, 2))
    assert delta[:9].max() == 0 and delta[9:].min() > 0


def test_mixer_any_length_including_one_step():
    torch.manual_seed(0)
    mixer = Mamba2(16, **TINY)
    for length in (1, 2, 5, 63):
        u = torch.randn(1, length, 16)
        torch.testing.assert_close(mixer(u)[:, :1], mixer(u[:, :1]), rtol=1e-5, atol=1e-6)


def test_bidirectional_block_formula_and_reach():
    """out = x + ConvTranspose1d(cat(fwd(x), flip(bwd(flip(x))))), each branch x + mixer(norm(x)); the output at
    the first step sees the last step (through the backward branch)."""
    torch.manual_seed(0)
    block = BidirectionalMamba2(16, **TINY)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    x = torch.randn(2, 9, 16)

    def branch(blocks, seq):
        return seq + blocks[0].mixer(blocks[0].norm(seq))

    both = torch.cat([branch(block.forward_blocks, x), branch(block.backward_blocks, x.flip(1)).flip(1)], dim=-1)
    expected = x + block.linear(both.transpose(1, 2)).transpose(1, 2)
    out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert (block(changed)[:, 0] - out[:, 0]).abs().max() > 1e-4


def test_float32_parameters_under_bfloat16_autocast():
    """Under autocast the projections run in bf16 while A, D and dt_bias stay float32; the result stays close."""
    torch.manual_seed(0)
    mixer = Mamba2(16, **TINY)
    u = torch.randn(2, 10, 16)
    reference = mixer(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(u)
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_bad_head_layout_is_refused():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(16, expand=2, headdim=12)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(16, expand=2, headdim=8, ngroups=3)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = BidirectionalMamba2(16, **TINY)
    block(torch.randn(2, 7, 16)).square().sum().backward()
    missing = [name for name, p in block.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().max() == 0]
    assert not missing and math.isfinite(sum(p.grad.sum().item() for p in block.parameters()))
