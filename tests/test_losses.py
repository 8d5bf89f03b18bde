import numpy as np
import pytest
import torch

from bsmamba2.config import LossConfig, load_config
from bsmamba2.errors import BSMamba2Error
from bsmamba2.losses import MultiResolutionLoss
from bsmamba2.metrics import usdr


def numpy_stft(signal, n_fft, hop, window_length):
    """Centered, reflect-padded STFT written out by hand: Hann window zero-padded to n_fft in the middle."""
    window = np.zeros(n_fft)
    start = (n_fft - window_length) // 2
    window[start:start + window_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window_length) / window_length)
    padded = np.pad(signal, n_fft // 2, mode="reflect")
    frames = [padded[i * hop: i * hop + n_fft] * window for i in range(1 + len(signal) // hop)]
    return np.fft.rfft(np.stack(frames), axis=-1)


def hand_loss(estimate, target, windows, hop, waveform_weight, stft_weight):
    total = waveform_weight * np.abs(estimate - target).mean()
    for window_length in windows:
        n_fft = max(window_length, 2048)
        terms = []
        for e, t in zip(estimate.reshape(-1, estimate.shape[-1]), target.reshape(-1, target.shape[-1])):
            difference = numpy_stft(e, n_fft, hop, window_length) - numpy_stft(t, n_fft, hop, window_length)
            terms.append(np.stack([difference.real, difference.imag]))
        total += stft_weight * np.abs(np.stack(terms)).mean()
    return total


def test_loss_matches_hand_computation():
    generator = torch.Generator().manual_seed(0)
    estimate = torch.randn(2, 1, 2, 5000, generator=generator, dtype=torch.float64)
    target = torch.randn(2, 1, 2, 5000, generator=generator, dtype=torch.float64)
    config = LossConfig()
    loss = MultiResolutionLoss(config)(estimate, target).item()
    expected = hand_loss(estimate.numpy(), target.numpy(), config.stft_windows, config.stft_hop,
                         config.waveform_weight, config.stft_weight)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_weights_and_windows_are_configurable():
    estimate, target = torch.randn(1, 1, 2, 4096), torch.zeros(1, 1, 2, 4096)
    waveform_only = MultiResolutionLoss(LossConfig(waveform_weight=1.0, stft_weight=0.0))(estimate, target)
    assert torch.isclose(waveform_only, estimate.abs().mean())
    one = MultiResolutionLoss(LossConfig(waveform_weight=0.0, stft_windows=[512]))(estimate, target)
    two = MultiResolutionLoss(LossConfig(waveform_weight=0.0, stft_windows=[512, 256]))(estimate, target)
    assert two > one > 0


def test_loss_is_zero_for_a_perfect_estimate_and_has_gradients():
    target = torch.randn(1, 2, 2, 3000)
    estimate = target.clone().requires_grad_(True)
    loss = MultiResolutionLoss(LossConfig())(estimate, target)
    assert loss.item() == 0.0
    (MultiResolutionLoss(LossConfig())(estimate * 1.1, target)).backward()
    assert estimate.grad.abs().sum() > 0


def test_sdr_term_is_minus_usdr_of_the_batch_as_one_track_per_stem():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(3, 2, 2, 4000, generator=generator, dtype=torch.float64)
    target[0, 0] = 0  # a silent example counts by its (zero) energy, not by a ratio of its own
    estimate = target + 0.3 * torch.randn(3, 2, 2, 4000, generator=generator, dtype=torch.float64)
    loss = MultiResolutionLoss(LossConfig(waveform_weight=0.0, stft_weight=0.0, sdr_weight=2.0))(estimate, target)
    per_stem = [usdr(target[:, stem].numpy(), estimate[:, stem].numpy()) for stem in range(2)]
    np.testing.assert_allclose(loss.item(), -2.0 * np.mean(per_stem), rtol=1e-6)
    combined = MultiResolutionLoss(LossConfig(sdr_weight=2.0))(estimate, target).item()
    paper = MultiResolutionLoss(LossConfig())(estimate, target).item()
    np.testing.assert_allclose(combined, paper + loss.item(), rtol=1e-5)  # the loss computes in float32


def test_stem_weights_weigh_each_stems_terms_and_name_only_model_stems():
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(2, 2, 2, 4000, generator=generator, dtype=torch.float64)
    estimate = target + 0.5 * torch.randn(2, 2, 2, 4000, generator=generator, dtype=torch.float64)
    config = LossConfig(sdr_weight=1.0, stem_weights={"vocals": 3.0})
    per_stem = [MultiResolutionLoss(config)(estimate[:, [s]], target[:, [s]]).item() for s in range(2)]
    weighted = MultiResolutionLoss(config, ["vocals", "drums"])(estimate, target).item()
    np.testing.assert_allclose(weighted, (1.5 * per_stem[0] + 0.5 * per_stem[1]) / 2, rtol=1e-5)  # weights 3:1
    with pytest.raises(BSMamba2Error, match="training.loss.stem_weights: 'voice' is not one of model.stems"):
        load_config(overrides=["training.loss.stem_weights={voice: 2}"])
