import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bsmamba2 import build_model, load_model
from bsmamba2.checkpoint import atomic_save, save_model
from bsmamba2.config import AudioConfig, Config, ModelConfig, load_config
from bsmamba2.errors import BSMamba2Error
from bsmamba2.models.bs_mamba2 import BSMamba2

REPO = Path(__file__).resolve().parents[2]
# The published checkpoints' parameter names and shapes: see OFFICIAL_KEYS in test_mamba2.py.
OFFICIAL_KEYS = REPO / "tests" / "data" / "official_vocals_keys.json"


def tiny_config(**model) -> Config:
    values = {"audio": {"n_fft": 32, "hop_length": 8},
              "model": {"stems": ["vocals", "other"], "dim": 16, "depth": 2, "band_widths": [4, 4, 9],
                        "mask_hidden_factor": 2, "d_state": 8, "expand": 2, "headdim": 8, "ngroups": 2,
                        "scan_chunk_size": 16, **model}}
    return Config.from_dict(values)


def randomized(model):
    """Untrained models start with near-identity pieces; random weights make comparisons meaningful."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def test_the_network_checks_its_band_widths():
    with pytest.raises(ValueError, match=r"model.band_widths: must be positive and sum to n_fft/2\+1 = 17 "
                                         r"\(they sum to 16\)"):
        BSMamba2(ModelConfig(band_widths=[4, 4, 8]), AudioConfig(n_fft=32, hop_length=8))
    model = BSMamba2(ModelConfig(band_widths=[4, 4, 9], dim=16, depth=1, d_state=8, expand=2, headdim=8),
                     AudioConfig(n_fft=32, hop_length=8))
    assert [len(band[0].gamma) for band in model.band_split.to_features] == [16, 16, 36]


def test_paper_config_parameter_count_and_names():
    with torch.device("meta"):
        model = build_model(load_config(REPO / "configs" / "bsmamba2_vocals.yaml"))
    assert sum(p.numel() for p in model.parameters()) == 48_098_188
    official = json.loads(OFFICIAL_KEYS.read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official


@pytest.mark.parametrize("samples", [1, 100, 333, 1000])
def test_output_shape_equals_input_for_any_length(samples):
    model = build_model(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 2, samples))
    assert out.shape == (3, 2, 2, samples)
    assert torch.isfinite(out).all()


def test_silent_input_gives_silent_output():
    model = randomized(build_model(tiny_config())).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 2, 500)).abs().max() == 0


def test_mono_model():
    config = tiny_config()
    config.audio.channels = 1
    model = build_model(config.validate()).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 300)).shape == (2, 2, 1, 300)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    wave = torch.randn(1, 2, 400)
    grads = []
    for enabled in (False, True):
        model = randomized(build_model(tiny_config(gradient_checkpointing=enabled))).train()
        model(wave).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("band_widths", [[4, 4, 9], [2, 3, 3, 3, 2, 4]], ids=["runs", "interleaved"])
def test_batched_band_layers_equal_the_per_band_modules(band_widths):
    """Band split and mask estimators run runs of equal-sized bands as batched matmuls over stacked parameters:
    the same outputs and gradients as their modules one band at a time (fp32, to rounding)."""
    model = randomized(build_model(tiny_config(band_widths=band_widths)))
    generator = torch.Generator().manual_seed(2)
    inputs = {model.band_split: torch.randn(2, 7, sum(model.band_split.band_sizes), generator=generator),
              model.mask_estimators: torch.randn(2, 7, len(band_widths), 16, generator=generator)}
    for module, x in inputs.items():
        results = []
        for forward in (module.forward, module.forward_per_band):
            x = x.detach().requires_grad_()
            out = forward(x)
            projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
            results.append([out, *torch.autograd.grad((out * projection).sum(), [x, *module.parameters()])])
        for batched, per_band in zip(*results):
            torch.testing.assert_close(batched, per_band, rtol=1e-5, atol=1e-6)


# ---- an independent, step-by-step formulation of the network, read from the state dict by name ----

def rms_gamma(x, gamma):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[-1]) * gamma


def mamba2_step_by_step(u, p, d_state, headdim, ngroups):
    """One Mamba2 mixer, one time step at a time, for one sequence u (L, d_model)."""
    d_inner = p["out_proj.weight"].shape[1]
    heads = d_inner // headdim
    projected = u @ p["in_proj.weight"].T
    z, xbc, dt = projected.split([d_inner, d_inner + 2 * ngroups * d_state, heads], dim=-1)
    weight, bias = p["conv1d.weight"][:, 0], p["conv1d.bias"]
    width = weight.shape[1]
    history = torch.cat([torch.zeros(width - 1, xbc.shape[1]), xbc])
    conv = torch.stack([(history[t:t + width].T * weight).sum(-1) + bias for t in range(len(u))])
    conv = conv * torch.sigmoid(conv)
    x, b, c = conv.split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    dt = F.softplus(dt + p["dt_bias"])
    a = -torch.exp(p["A_log"])
    state = torch.zeros(heads, headdim, d_state)
    outputs = []
    for t in range(len(u)):
        ys = []
        for h in range(heads):
            g = h // (heads // ngroups)
            x_h = x[t, h * headdim:(h + 1) * headdim]
            b_g, c_g = b[t, g * d_state:(g + 1) * d_state], c[t, g * d_state:(g + 1) * d_state]
            state[h] = torch.exp(dt[t, h] * a[h]) * state[h] + dt[t, h] * torch.outer(x_h, b_g)
            ys.append(state[h] @ c_g + p["D"][h] * x_h)
        outputs.append(torch.cat(ys))
    y = torch.stack(outputs) * F.silu(z)
    groups = y.unflatten(-1, (ngroups, -1))  # mamba_ssm normalises each group's d_inner/ngroups channels
    y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + 1e-5)).flatten(-2) * p["norm.weight"]
    return y @ p["out_proj.weight"].T


def bidirectional_step_by_step(x, params, prefix, cfg):
    """x (sequences, L, dim) through the block at `prefix` (forward branch, flipped backward branch, merge)."""
    def branch(name, seq):
        p = {k[len(prefix + name):]: v for k, v in params.items() if k.startswith(prefix + name)}
        normed = seq * torch.rsqrt(seq.square().mean(-1, keepdim=True) + 1e-5) * p["norm.weight"]
        mixer = {k[len("mixer."):]: v for k, v in p.items() if k.startswith("mixer.")}
        return seq + mamba2_step_by_step(normed, mixer, cfg.d_state, cfg.headdim, cfg.ngroups)

    out = []
    for seq in x:
        forward = branch("forward_blocks.0.", seq)
        backward = branch("backward_blocks.0.", seq.flip(0)).flip(0)
        merged = torch.cat([forward, backward], -1) @ params[prefix + "linear.weight"][:, :, 0] \
            + params[prefix + "linear.bias"]
        out.append(seq + merged)
    return torch.stack(out)


def network_step_by_step(wave, params, config):
    cfg, audio = config.model, config.audio
    batch, channels, samples = wave.shape
    window = torch.hann_window(audio.n_fft)
    spec = torch.stack([torch.stack([torch.stft(wave[b, c], audio.n_fft, audio.hop_length, window=window,
                                                return_complex=True) for c in range(channels)], 1)
                        for b in range(batch)])                                   # (b, f, c, t)
    frames = spec.shape[-1]
    edges = [0]
    for width in cfg.band_widths:
        edges.append(edges[-1] + width)
    features = []
    for k in range(len(cfg.band_widths)):
        band = spec[:, edges[k]:edges[k + 1]]                                         # (b, w, c, t)
        values = torch.stack([band.real, band.imag], -1).permute(0, 3, 1, 2, 4).reshape(batch, frames, -1)
        values = rms_gamma(values, params[f"band_split.to_features.{k}.0.gamma"])
        features.append(values @ params[f"band_split.to_features.{k}.1.weight"].T
                        + params[f"band_split.to_features.{k}.1.bias"])
    x = torch.stack(features, 2)                                                      # (b, t, k, d)
    bands, dim = x.shape[2], x.shape[3]
    for i in range(cfg.depth):
        x = bidirectional_step_by_step(x.permute(0, 2, 1, 3).reshape(-1, frames, dim), params, f"layers.{i}.0.", cfg)
        x = x.reshape(batch, bands, frames, dim).permute(0, 2, 1, 3)
        x = bidirectional_step_by_step(x.reshape(-1, bands, dim), params, f"layers.{i}.1.", cfg)
        x = x.reshape(batch, frames, bands, dim)
    x = rms_gamma(x, params["final_norm.gamma"])
    stems = []
    for s in range(len(cfg.stems)):
        masked = torch.zeros_like(spec)
        for k in range(bands):
            prefix = f"mask_estimators.{s}.to_freqs.{k}.0."
            hidden = torch.tanh(x[:, :, k] @ params[prefix + "0.weight"].T + params[prefix + "0.bias"])
            out = hidden @ params[prefix + "2.weight"].T + params[prefix + "2.bias"]
            value, gate = out.chunk(2, -1)
            mask = (value * torch.sigmoid(gate)).reshape(batch, frames, -1, channels, 2)  # (b, t, w, c, 2)
            mask = torch.complex(mask[..., 0], mask[..., 1]).permute(0, 2, 3, 1)          # (b, w, c, t)
            masked[:, edges[k]:edges[k + 1]] = mask * spec[:, edges[k]:edges[k + 1]]
        stems.append(torch.stack([torch.stack([
            torch.istft(masked[b, :, c], audio.n_fft, audio.hop_length, window=window, length=samples)
            for c in range(channels)]) for b in range(batch)]))
    return torch.stack(stems, 1)


def test_matches_an_independent_step_by_step_formulation():
    config = tiny_config()
    model = randomized(build_model(config)).eval()
    with torch.no_grad():
        for block in model.modules():  # keep the recurrence stable with random weights
            if hasattr(block, "A_log"):
                block.A_log.copy_(torch.linspace(-1, 1, block.A_log.numel()))
        params = {k: v.clone() for k, v in model.state_dict().items()}
        wave = torch.randn(2, 2, 100, generator=torch.Generator().manual_seed(3))
        expected = network_step_by_step(wave, params, config)
        actual = model(wave)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# ---- checkpoints: ours and the published layouts ----

def official_state_dict():
    generator = torch.Generator().manual_seed(0)
    shapes = json.loads(OFFICIAL_KEYS.read_text())
    return {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["msst_raw", "lightning", "module_prefix_under_model"])
def test_published_checkpoint_layouts_load_and_separate(tmp_path, layout):
    weights = official_state_dict()
    payload = {
        "msst_raw": weights,
        "lightning": {"epoch": 3, "global_step": 1000,
                      "state_dict": {f"model.{k}": v for k, v in weights.items()}},
        "module_prefix_under_model": {"model": {f"module.{k}": v for k, v in weights.items()}},
    }[layout]
    path = tmp_path / "published.ckpt"
    torch.save(payload, path)
    model = load_model(path)
    assert model.config.model.stems == ["vocals"] and not model.training
    torch.testing.assert_close(model.state_dict()["final_norm.gamma"], weights["final_norm.gamma"])
    with torch.no_grad():
        out = model(torch.randn(1, 2, 4410))
    assert out.shape == (1, 1, 2, 4410) and torch.isfinite(out).all()


@pytest.mark.slow
def test_lightning_checkpoint_prefers_ema_weights(tmp_path):
    weights = official_state_dict()
    ema = {k: v + 1 for k, v in weights.items()}
    state = {**{f"model.{k}": v for k, v in weights.items()}, **{f"ema_model.{k}": v for k, v in ema.items()}}
    torch.save({"state_dict": state}, tmp_path / "both.ckpt")
    model = load_model(tmp_path / "both.ckpt")
    torch.testing.assert_close(model.state_dict()["final_norm.gamma"], ema["final_norm.gamma"])


def test_our_checkpoint_round_trip(tmp_path):
    model = randomized(build_model(tiny_config()))
    save_model(model, tmp_path / "m.ckpt")
    loaded = load_model(tmp_path / "m.ckpt")
    assert loaded.config == model.config
    wave = torch.randn(1, 2, 300)
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave), model.eval()(wave))


@pytest.mark.slow
def test_mismatched_checkpoint_lists_offenders(tmp_path):
    weights = official_state_dict()
    del weights["final_norm.gamma"]  # no anchor: nothing recognisable
    torch.save(weights, tmp_path / "none.ckpt")
    with pytest.raises(BSMamba2Error, match="no BSMamba2 weights"):
        load_model(tmp_path / "none.ckpt")

    weights = official_state_dict()
    weights.pop("layers.0.0.linear.bias")
    weights["extra.weight"] = torch.zeros(1)
    weights["layers.1.1.linear.bias"] = torch.zeros(7)
    torch.save(weights, tmp_path / "bad.ckpt")
    with pytest.raises(BSMamba2Error) as error:
        load_model(tmp_path / "bad.ckpt")
    message = str(error.value)
    assert "missing layers.0.0.linear.bias" in message and "unexpected extra.weight" in message
    assert "layers.1.1.linear.bias has shape (7,)" in message and "\n" not in message


def test_checkpoint_that_does_not_match_the_given_config(tmp_path):
    save_model(build_model(tiny_config()), tmp_path / "m.ckpt")
    with pytest.raises(BSMamba2Error, match="does not match the model config"):
        load_model(tmp_path / "m.ckpt", config=tiny_config(dim=32))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(BSMamba2Error, match="no such file"):
        load_model(tmp_path / "absent.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(BSMamba2Error, match="not a PyTorch, Lightning or safetensors checkpoint"):
        load_model(tmp_path / "junk.ckpt")
    save_model(build_model(tiny_config()), tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BSMamba2Error, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "cut.ckpt")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    target = tmp_path / "x.ckpt"
    atomic_save({"a": 1}, target)
    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, target)
    assert torch.load(target) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]
