"""The whole network under each scan backend, on the CPU (the kernels played by conftest's stand-ins) and on CUDA
(the real kernels): separated stems against the `torch` backend's in float32, and one bf16-autocast training step.

The network is a small test config unless BSMAMBA2_TEST_MODEL_CONFIG names a config (scripts/gpu_check.sh runs the
paper's, `bsmamba2_vocals`, on CUDA), on BSMAMBA2_TEST_AUDIO_SECONDS of audio (default: 1500 samples). The measured
agreements are recorded as JUnit properties (`record_property`), which gpu_check.sh copies into its JSON.
"""
from __future__ import annotations

import os

import pytest
import torch

from bsmamba2.checkpoint import build_model
from bsmamba2.config import Config, load_config
from bsmamba2.losses import MultiResolutionLoss
from bsmamba2.metrics import usdr
from bsmamba2.models.mamba2 import Mamba2
from bsmamba2.ops import backends
from bsmamba2.ops.scan_torch import causal_conv1d_torch, ssd_scan

from devices import DEVICES

MIN_SDR_DB = 50.0          # stems under one backend against the `torch` backend's, float32
MAX_GRAD_ERROR = 5e-2      # ‖g − g_torch‖ / ‖g_torch‖ over all parameters, one bf16-autocast step
MAX_LOSS_ERROR = 1e-2      # |loss − loss_torch| / loss_torch, same step


def model_config() -> Config:
    name = os.environ.get("BSMAMBA2_TEST_MODEL_CONFIG")
    if name:
        return load_config(name)
    return Config.from_dict({"audio": {"n_fft": 64, "hop_length": 16},
                             "model": {"stems": ["vocals", "other"], "dim": 32, "depth": 2, "band_widths": [8, 8, 17],
                                       "mask_hidden_factor": 2, "d_state": 16, "expand": 2, "headdim": 16,
                                       "ngroups": 1, "scan_chunk_size": 32},
                             "training": {"loss": {"stft_windows": [256, 128], "stft_min_n_fft": 256}}})


def mixture(config: Config, batch: int, seed: int) -> torch.Tensor:
    seconds = os.environ.get("BSMAMBA2_TEST_AUDIO_SECONDS")
    samples = round(float(seconds) * config.audio.sample_rate) if seconds else 1500
    return torch.randn(batch, config.audio.channels, samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def use_backend(model: torch.nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Mamba2):
            module.scan_backend = backend


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Untrained models start close to the identity, where even a broken scan changes the stems little; random
    weights make the scan count (the `control` test shows it does)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def stems_sdr(backend: str, device: str) -> float:
    """The lowest SDR, over stems, of the stems under `backend` against the `torch` backend's, both on `device`."""
    config = model_config()
    torch.manual_seed(0)
    model = randomized(build_model(config)).eval().to(device)
    wave = mixture(config, 1, seed=2).to(device)
    stems = {}
    for name in ("torch", backend):
        use_backend(model, name)
        with torch.no_grad():
            stems[name] = model(wave)[0].double().cpu().numpy()
    return min(usdr(expected, got) for expected, got in zip(stems["torch"], stems[backend]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_stems_agree_with_the_torch_backend(backend, device, backend_on, record_property):
    backend_on(device, backend)
    sdr = stems_sdr(backend, device)
    record_property("sdr_db", round(sdr, 2))
    assert sdr >= MIN_SDR_DB, f"{backend} on {device}: stems at {sdr:.1f} dB SDR from the torch backend's"


def time_reversed_scan(x, dt, A, B, C, chunk_size, z=None, **options):
    """The `torch` scan run backwards in time: what one wrong stride in an adapter would give."""
    flipped = [None if t is None else t.flip(1) for t in (x, dt, B, C, z)]
    y = ssd_scan(*flipped[:2], A, *flipped[2:4], chunk_size, z=flipped[4], **options)
    return (y[0].flip(1), y[1]) if isinstance(y, tuple) else y.flip(1)


@pytest.mark.parametrize("device", DEVICES)
def test_a_broken_scan_fails_the_agreement(device, monkeypatch, fresh_backend_log, record_property):
    """The control for the test above: a scan that runs backwards in time must score below MIN_SDR_DB."""
    monkeypatch.setitem(backends.BACKENDS, "control", backends.Backend(
        "control", "the torch scan backwards in time", time_reversed_scan, causal_conv1d_torch))
    sdr = stems_sdr("control", device)
    record_property("sdr_db", round(sdr, 2))
    assert sdr < MIN_SDR_DB - 10


def training_step(model, wave, target, loss_function, backend: str, device: str):
    """Loss and all parameter gradients of one forward + backward under bf16 autocast."""
    use_backend(model, backend)
    model.zero_grad()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = loss_function(model(wave), target)
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_bf16_training_step_agrees_with_the_torch_backend(backend, device, backend_on, record_property):
    """The training loss, forward and backward under bf16 autocast, as `bsmamba2 train` runs on CUDA: finite, and
    within MAX_LOSS_ERROR / MAX_GRAD_ERROR of the `torch` backend (which computes its scan in float32 inside)."""
    backend_on(device, backend)
    config = model_config()
    torch.manual_seed(0)
    model = build_model(config).train().to(device)
    wave = mixture(config, 2, seed=3).to(device)
    target = torch.stack([mixture(config, 2, seed=4 + stem) for stem in range(len(config.model.stems))], 1)
    loss_function = MultiResolutionLoss(config.training.loss).to(device)
    loss, grads = training_step(model, wave, target.to(device), loss_function, backend, device)
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(grads).all() and grads.abs().max() > 0
    loss_torch, grads_torch = training_step(model, wave, target.to(device), loss_function, "torch", device)
    loss_error = abs(loss - loss_torch) / loss_torch
    grad_error = ((grads - grads_torch).norm() / grads_torch.norm()).item()
    record_property("loss", loss)
    record_property("loss_error", loss_error)
    record_property("grad_error", grad_error)
    assert loss_error <= MAX_LOSS_ERROR and grad_error <= MAX_GRAD_ERROR, \
        f"{backend} on {device}: loss off by {loss_error:.1e}, gradients by {grad_error:.1e} (relative)"
