"""A bag of models: several BSMamba2 networks on one STFT, each stem taken from the network trained best for it, as
demucs' htdemucs_ft takes each source from its own fine-tuned model. The bundled four-stem model is one: its vocals
are the vocals model's, its drums, bass and other another network's.

When the bag's stems make up the whole mixture (vocals, drums, bass, other), `sharing_members` makes them sum to
it: the last that many members' stems share what the members before them leave of the mixture, each in proportion
to its own estimate's magnitude in every time-frequency bin (the masks re-derived from the estimates, as a Wiener
filter does, with magnitudes rather than powers). The other members' stems stay as they give them.

A bag behaves as one model (`stems`, `config`, `sample_rate`, `forward`, `separate_spectrogram`), so separation,
evaluation, int8 and ONNX export take it as they take a BSMamba2. Its `config` is its first member's with the bag's
stems: the audio, STFT and inference settings, which every member shares.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import BSMamba2Error
from .bs_mamba2 import BSMamba2, through_spectrogram

# The settings every member must share: one STFT of one mixture feeds them all.
SHARED_AUDIO = ("sample_rate", "channels", "n_fft", "hop_length")
# The least squared magnitude when sharing the rest: where all of the last member's estimates are silent, equal
# shares rather than 0/0. (A clamp, not an added epsilon: the ONNX exporter dropped `+ 1e-24` as a no-op.)
TINY_POWER = 1e-20


class BagOfModels(nn.Module):
    def __init__(self, members: list[BSMamba2], stems: list[str], sharing_members: int = 0):
        super().__init__()
        given = [stem for member in members for stem in member.stems]
        if sorted(given) != sorted(stems) or len(set(given)) != len(given):
            raise BSMamba2Error(f"a bag's members must give each of its stems {stems} once (they give {given})")
        first = members[0].config.audio
        for member in members[1:]:
            differing = [key for key in SHARED_AUDIO if getattr(member.config.audio, key) != getattr(first, key)]
            if differing:
                raise BSMamba2Error(f"a bag's members must share their audio settings (they differ in "
                                    f"{', '.join('audio.' + key for key in differing)})")
        if not 0 <= sharing_members <= len(members):
            raise BSMamba2Error(f"a bag of {len(members)} members cannot have {sharing_members} sharing the rest")
        self.members = nn.ModuleList(members)
        self.stems = list(stems)
        self.sharing_members = sharing_members
        self.order = [given.index(stem) for stem in stems]  # from the members' stems, in turn, to the bag's order
        self.config = copy.deepcopy(members[0].config)
        self.config.model.stems = list(stems)
        self.sample_rate, self.audio_channels = members[0].sample_rate, members[0].audio_channels
        self.n_fft, self.hop_length = members[0].n_fft, members[0].hop_length
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, channels, samples) → (batch, stems, channels, samples), any number of samples."""
        if wave.shape[1] != self.audio_channels:
            raise ValueError(f"expected {self.audio_channels} audio channels, got {wave.shape[1]}")
        return through_spectrogram(wave, self.separate_spectrogram, self.n_fft, self.hop_length, self.window)

    def separate_spectrogram(self, spec: torch.Tensor) -> torch.Tensor:
        """As `BSMamba2.separate_spectrogram`: each member's stems, in the bag's order."""
        # the members return (t, f)-ordered memory seen as (f, t): joined in that order, so no copy reorders it
        outputs = [member.separate_spectrogram(spec).transpose(3, 4) for member in self.members]
        if self.sharing_members:
            kept = len(outputs) - self.sharing_members
            rest = spec.transpose(2, 3) - sum(output.sum(dim=1) for output in outputs[:kept])  # (b, c, t, f, 2)
            sharing = torch.cat(outputs[kept:], dim=1)
            magnitudes = sharing.square().sum(dim=-1, keepdim=True).clamp_min(TINY_POWER).sqrt()
            outputs = outputs[:kept] + [magnitudes / magnitudes.sum(dim=1, keepdim=True) * rest.unsqueeze(1)]
        stems = torch.cat(outputs, dim=1)
        return stems[:, self.order].transpose(3, 4)

