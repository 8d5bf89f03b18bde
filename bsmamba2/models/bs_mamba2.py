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

import itertools

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
    """Per band: RMSNorm then Linear(band values → dim). (b, t, Σ sizes) → (b, t, bands, dim).

    `forward` runs each run of neighbouring equal-sized bands as one batched matmul over the bands' parameters,
    stacked at every call (cheap next to the product; the per-band modules keep the published names);
    `forward_per_band` is the same computation one module at a time, the reference the tests compare it with."""

    def __init__(self, dim: int, band_sizes: list[int]):
        super().__init__()
        self.band_sizes = band_sizes
        self.to_features = nn.ModuleList(nn.Sequential(RMSNorm(size), nn.Linear(size, dim)) for size in band_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = _equal_runs(self.band_sizes)
        features = []
        for (size, bands), values in zip(runs, x.split([size * len(bands) for size, bands in runs], dim=-1)):
            norms, linears = zip(*(self.to_features[band] for band in bands))
            values = values.unflatten(-1, (len(bands), size))                                # (b, t, k, size)
            normed = F.normalize(values, dim=-1) * norms[0].scale * torch.stack([norm.gamma for norm in norms])
            weight = torch.stack([linear.weight for linear in linears])                         # (k, dim, size)
            features.append(torch.einsum("btks,kds->btkd", normed, weight)
                            + torch.stack([linear.bias for linear in linears]))
        return torch.cat(features, dim=-2)

    def forward_per_band(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.split(self.band_sizes, dim=-1)
        return torch.stack([to_feature(band) for to_feature, band in zip(self.to_features, bands)], dim=-2)


class MaskEstimator(nn.Module):
    """Per band: Linear(dim → hidden) → Tanh → Linear(hidden → 2·size) → GLU. (b, t, bands, dim) → (b, t, Σ sizes)."""

    def __init__(self, dim: int, band_sizes: list[int], hidden_factor: int):
        super().__init__()
        hidden = dim * hidden_factor
        self.band_sizes = band_sizes
        self.to_freqs = nn.ModuleList(
            nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * size)), nn.GLU(dim=-1))
            for size in band_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([to_freq(band) for to_freq, band in zip(self.to_freqs, x.unbind(dim=-2))], dim=-1)


class MaskEstimators(nn.ModuleList):
    """A `MaskEstimator` per stem, run together: (b, t, bands, dim) → complex masks (b, stems, channels, t, freqs,
    2). A band's values are its bins × channels × (real, imaginary), channel fastest, as the band split reads them.

    `forward` runs the first layers of every band and stem as one batched matmul and the second layers of each run
    of equal-sized bands (all stems) as another, over parameters stacked at every call, and writes the masks in the
    (channel, frame, bin) order the iSTFT reads; `forward_per_band` is the same computation one module at a time,
    the reference the tests compare it with."""

    def __init__(self, estimators: list[MaskEstimator], channels: int):
        super().__init__(estimators)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        n, c = len(self), self.channels
        mlps = [estimator.to_freqs[band][0] for band in range(k) for estimator in self]   # band-major, then stem
        # one matrix per (band, stem): each band's input repeated for every stem
        x = x.permute(2, 0, 1, 3).reshape(k, 1, b * t, d).expand(k, n, b * t, d).reshape(k * n, b * t, d)
        hidden = torch.tanh(_batched_linear(x, [mlp[0] for mlp in mlps]))                     # (k·n, b·t, hidden)
        masks = []
        for size, bands in _equal_runs(self[0].band_sizes):
            rows = slice(bands.start * n, bands.stop * n)
            out = F.glu(_batched_linear(hidden[rows], [mlp[2] for mlp in mlps[rows]]), dim=-1)
            width = size // (2 * c)
            out = out.view(len(bands), n, b, t, width, c, 2).permute(2, 1, 5, 3, 0, 4, 6)   # (b, n, c, t, k, w, 2)
            masks.append(out.reshape(b, n, c, t, len(bands) * width, 2))
        return torch.cat(masks, dim=-2)

    def forward_per_band(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        masks = torch.stack([estimator(x) for estimator in self], dim=1)                     # (b, n, t, Σ sizes)
        return masks.view(b, len(self), t, -1, self.channels, 2).permute(0, 1, 4, 2, 3, 5)


def _batched_linear(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """x (m, rows, in) through m linear layers of one shape, the i-th on x[i]: (m, rows, out)."""
    weight = torch.stack([linear.weight for linear in linears]).transpose(1, 2)
    bias = torch.stack([linear.bias for linear in linears]).unsqueeze(1)
    return torch.baddbmm(bias, x, weight)


def _equal_runs(sizes: list[int]) -> list[tuple[int, range]]:
    """The runs of neighbouring equal sizes, as (size, the indices of the run)."""
    runs, start = [], 0
    for size, members in itertools.groupby(sizes):
        count = len(list(members))
        runs.append((size, range(start, start + count)))
        start += count
    return runs


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
        self.mask_estimators = MaskEstimators(
            [MaskEstimator(model.dim, band_sizes, model.mask_hidden_factor) for _ in self.stems], audio.channels)

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

        masks = self.mask_estimators(x).float()                                  # (b, n, c, t, f, 2)
        mixture = spec.transpose(2, 3).unsqueeze(1)      # (b, 1, c, t, f, 2): stft's own memory order, no copy
        stems = torch.view_as_real(torch.view_as_complex(masks) * torch.view_as_complex(mixture))
        return stems.transpose(3, 4)                     # a view: `through_spectrogram` reads (t, f) rows back


def through_spectrogram(wave: torch.Tensor, separate_spectrogram, n_fft: int, hop_length: int,
                        window: torch.Tensor) -> torch.Tensor:
    """STFT of (batch, channels, samples) → `separate_spectrogram` → iSTFT of each stem: (batch, stems, channels,
    samples). The one STFT code for the network and for its ONNX export (`bsmamba2.onnx`)."""
    samples = wave.shape[-1]
    # centered STFT reflects n_fft/2 samples at each edge: give very short inputs room (zeros) to do so
    padded = max(samples, n_fft)
    stems_spec = separate_spectrogram(stft(F.pad(wave.float(), (0, padded - samples)), n_fft, hop_length, window))
    frames_first = torch.view_as_complex(stems_spec.transpose(3, 4).flatten(0, 2))     # (b·n·c, t, f)
    stems_wave = istft(frames_first, n_fft, hop_length, window, padded)
    return stems_wave.unflatten(0, stems_spec.shape[:3])[..., :samples]


def stft(wave: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor) -> torch.Tensor:
    """(batch, channels, samples) → (batch, channels, freqs, frames, 2: real, imaginary), centred: a view of
    (frames, freqs)-ordered memory, as torch.stft computes it."""
    spec = torch.stft(wave.flatten(0, 1), n_fft, hop_length, window=window, return_complex=True)
    return torch.view_as_real(spec).unflatten(0, wave.shape[:2])


def istft(spec: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor, length: int) -> torch.Tensor:
    """torch.istft of centred one-sided spectra given frames first, (batch, frames, freqs) complex → (batch,
    length): inverse FFT per frame, window, overlap-add, divide by the overlap-added squared window.

    The same arithmetic as torch.istft, composed so that the (frames, freqs) rows the network writes reach the
    inverse FFT, and its gradient comes back, without torch.istft's copies to and from (freqs, frames) order, and
    without its per-call check that the window envelope has no zeros (a fixed property of window and hop)."""
    frames = torch.fft.irfft(spec, n_fft, dim=-1) * window                            # (batch, t, n_fft)
    signal = n_fft + hop_length * (spec.shape[-2] - 1)
    wave = torch.ops.aten.unfold_backward(frames, [spec.shape[0], signal], 1, n_fft, hop_length)   # overlap-add
    envelope = torch.ops.aten.unfold_backward(window.square().expand(spec.shape[-2], n_fft), [signal], 0, n_fft,
                                              hop_length)
    start = n_fft // 2
    wave = wave[:, start:start + length] / envelope[start:start + length]
    if wave.shape[-1] < length:                             # as torch.istft: zeros past the last frame
        wave = F.pad(wave, (0, length - wave.shape[-1]))
    return wave
