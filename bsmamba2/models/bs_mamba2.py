"""BSMamba2 ("Mamba2 Meets Silence"): band-split STFT front end, dual-path bidirectional Mamba2, complex masks.

    wave (b, c, s) ─STFT→ (b, t, f·c·2) ─band split→ (b, t, bands, dim)
        ─depth × [BiMamba2 over time, BiMamba2 over bands]→ RMSNorm
        ─per stem: per band MLP → GLU → complex mask → × mixture STFT ─iSTFT→ (b, stems, c, s)

Everything between the STFT and the iSTFT is `separate_spectrogram`, on real tensors: what `bsmamba2 export`
writes as ONNX.

Module and parameter names equal those of the published checkpoints (layers.i.0 = time block, layers.i.1 = band
block, band_split.to_features.k, mask_estimators.s.to_freqs.k, final_norm), so those load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import AudioConfig, ModelConfig
from .mamba2 import BidirectionalMamba2


class RMSNorm(nn.Module):
    """BS-RoFormer's RMSNorm: unit L2 norm times sqrt(dim) times a learned gain (`gamma`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class BandSplit(nn.Module):
    """Per band: RMSNorm then Linear(band values → dim). (b, t, Σ sizes) → (b, t, bands, dim)."""

    def __init__(self, dim: int, band_sizes: list[int]):
        super().__init__()
        self.band_sizes = band_sizes
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(size), nn.Linear(size, dim)) for size in band_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.split(self.band_sizes, dim=-1)
        return torch.stack([to_feature(band) for to_feature, band in zip(self.to_features, bands)], dim=-2)


class MaskEstimator(nn.Module):
    """Per band: Linear(dim → hidden) → Tanh → Linear(hidden → 2·size) → GLU. (b, t, bands, dim) → (b, t, Σ sizes)."""

    def __init__(self, dim: int, band_sizes: list[int], hidden_factor: int):
        super().__init__()
        hidden = dim * hidden_factor
        self.to_freqs = nn.ModuleList(
            nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * size)), nn.GLU(dim=-1))
            for size in band_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([to_freq(band) for to_freq, band in zip(self.to_freqs, x.unbind(dim=-2))], dim=-1)


class DualPathLayer(nn.ModuleList):
    """[0]: bidirectional Mamba2 along time (one sequence per band), [1]: along bands (one per frame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time_block, band_block = self
        b, t, k, d = x.shape
        x = x.transpose(1, 2).reshape(b * k, t, d)
        x = time_block(x)
        x = x.reshape(b, k, t, d).transpose(1, 2).reshape(b * t, k, d)
        x = band_block(x)
        return x.reshape(b, t, k, d)


class BSMamba2(nn.Module):
    """The network for the `model` and `audio` config sections, which hold every hyper-parameter (their
    defaults are the paper's); impossible values raise the config's error, naming the key."""

    def __init__(self, model: ModelConfig, audio: AudioConfig):
        super().__init__()
        model.validate(audio)
        self.stems = list(model.stems)
        self.sample_rate = audio.sample_rate
        self.audio_channels = audio.channels
        self.n_fft = audio.n_fft
        self.hop_length = audio.hop_length
        self.gradient_checkpointing = model.gradient_checkpointing
        self.register_buffer("window", torch.hann_window(audio.n_fft), persistent=False)

        # a band's values: its bins × stereo channels × (real, imaginary), channel fastest ("b (f c) t")
        band_sizes = [2 * audio.channels * width for width in model.band_widths]
        mixer = dict(d_state=model.d_state, d_conv=model.d_conv, expand=model.expand, headdim=model.headdim,
                     ngroups=model.ngroups, chunk_size=model.scan_chunk_size, scan_backend=model.scan_backend)
        self.band_split = BandSplit(model.dim, band_sizes)
        self.layers = nn.ModuleList(
            DualPathLayer([BidirectionalMamba2(model.dim, **mixer), BidirectionalMamba2(model.dim, **mixer)])
            for _ in range(model.depth))
        self.final_norm = RMSNorm(model.dim)
        self.mask_estimators = nn.ModuleList(
            MaskEstimator(model.dim, band_sizes, model.mask_hidden_factor) for _ in self.stems)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, channels, samples) → (batch, stems, channels, samples), any number of samples."""
        if wave.shape[1] != self.audio_channels:
            raise ValueError(f"expected {self.audio_channels} audio channels, got {wave.shape[1]}")
        return through_spectrogram(wave, self.separate_spectrogram, self.n_fft, self.hop_length, self.window)

    def separate_spectrogram(self, spec: torch.Tensor) -> torch.Tensor:
        """The network between STFT and iSTFT, on real tensors (what `bsmamba2 export` writes as ONNX):
        the mixture's STFT (batch, channels, freqs, frames, 2: real, imaginary) → the stems' STFTs
        (batch, stems, channels, freqs, frames, 2), each the mixture's times a complex mask."""
        batch, channels, freqs, frames, _ = spec.shape
        features = spec.permute(0, 3, 2, 1, 4).reshape(batch, frames, -1)         # (b, t, f·c·2), channel fastest

        x = self.band_split(features)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        x = self.final_norm(x)

        masks = torch.stack([estimator(x) for estimator in self.mask_estimators], dim=1)  # (b, n, t, f·c·2)
        masks = masks.float().reshape(batch, len(self.stems), frames, freqs, channels, 2).permute(0, 1, 4, 3, 2, 5)
        (mask_re, mask_im), (mix_re, mix_im) = masks.unbind(-1), spec.unsqueeze(1).unbind(-1)
        return torch.stack([mask_re * mix_re - mask_im * mix_im, mask_re * mix_im + mask_im * mix_re], dim=-1)


def through_spectrogram(wave: torch.Tensor, separate_spectrogram, n_fft: int, hop_length: int,
                        window: torch.Tensor) -> torch.Tensor:
    """STFT of (batch, channels, samples) → `separate_spectrogram` → iSTFT of each stem: (batch, stems, channels,
    samples). The one STFT code for the network and for its ONNX export (`bsmamba2.onnx`)."""
    samples = wave.shape[-1]
    # centered STFT reflects n_fft/2 samples at each edge: give very short inputs room (zeros) to do so
    padded = max(samples, n_fft)
    stems_spec = separate_spectrogram(stft(F.pad(wave.float(), (0, padded - samples)), n_fft, hop_length, window))
    stems_wave = torch.istft(torch.view_as_complex(stems_spec.flatten(0, 2).contiguous()), n_fft, hop_length,
                             window=window, length=padded)
    return stems_wave.unflatten(0, stems_spec.shape[:3])[..., :samples]


def stft(wave: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor) -> torch.Tensor:
    """(batch, channels, samples) → (batch, channels, freqs, frames, 2: real, imaginary), centred."""
    spec = torch.stft(wave.flatten(0, 1), n_fft, hop_length, window=window, return_complex=True)
    return torch.view_as_real(spec).unflatten(0, wave.shape[:2])
