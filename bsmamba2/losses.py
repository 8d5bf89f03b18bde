"""The training loss of "Mamba2 Meets Silence": waveform L1 plus multi-resolution complex-STFT L1; optionally a
negative SDR term, the quantity the evaluation (uSDR) measures."""
from typing import Sequence

import torch
from torch import nn

from .config import LossConfig
from .metrics import USDR_DELTA


class MultiResolutionLoss(nn.Module):
    """`waveform_weight·L1(wave) + stft_weight·Σ_w L1(STFT_w) + sdr_weight·(−SDR in dB)`, estimate and target of
    the same shape (batch, stems, channels, samples).

    The STFT of each resolution uses a Hann window of length w, n_fft = max(w, stft_min_n_fft), the shared hop,
    and compares real and imaginary parts. The STFT is linear, so STFT(estimate) − STFT(target) is computed as
    STFT(estimate − target): one transform per resolution instead of two. The SDR term is uSDR with the batch as
    one track, averaged over stems: sums over examples, channels and samples, so that, as in the evaluation, a
    silent or quiet segment counts by its energy rather than dominating its own ratio. Each stem's terms count by
    its weight in `stem_weights` (1 for a stem not named; the weights are normalised to average 1).
    """

    def __init__(self, config: LossConfig, stems: Sequence[str] = ()):
        super().__init__()
        # without the stems' names every stem weighs 1
        weights = torch.tensor([config.stem_weights.get(stem, 1.0) for stem in stems] or [1.0])
        self.register_buffer("stem_weights", weights / weights.mean(), persistent=False)
        self.waveform_weight = config.waveform_weight
        self.stft_weight = config.stft_weight
        self.sdr_weight = config.sdr_weight
        self.windows = list(config.stft_windows)
        self.hop = config.stft_hop
        self.min_n_fft = config.stft_min_n_fft

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = (estimate - target).float()
        if self.sdr_weight:
            signal = target.float().square().transpose(0, 1).flatten(1).sum(-1) + USDR_DELTA
            distortion = error.square().transpose(0, 1).flatten(1).sum(-1) + USDR_DELTA
            sdr = 10 * torch.log10(signal / distortion)
        # the L1 terms are linear in |error|, so weighting a stem's error weights its terms
        error = error * self.stem_weights.view(1, -1, 1, 1)
        loss = self.waveform_weight * error.abs().mean()
        if self.sdr_weight:
            loss = loss - self.sdr_weight * (self.stem_weights * sdr).mean()
        if self.stft_weight == 0:
            return loss
        error = error.reshape(-1, estimate.shape[-1])
        for window_length in self.windows:
            n_fft = max(window_length, self.min_n_fft)
            spec = torch.stft(error, n_fft, self.hop, window_length,
                              torch.hann_window(window_length, device=error.device), return_complex=True)
            loss = loss + self.stft_weight * torch.view_as_real(spec).abs().mean()
        return loss
