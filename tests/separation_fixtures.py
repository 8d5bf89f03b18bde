"""Shared by the separation tests: a tiny two-stem BSMamba2 checkpoint and generated audio files."""
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bsmamba2.config import Config

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}


def tiny_config(**inference) -> Config:
    """Two stems, 129 bins in 4 bands, one dual-path layer: a 30 s file separates in a few seconds."""
    return Config.from_dict({
        "audio": {"n_fft": 256, "hop_length": 128},
        "model": {"stems": ["vocals", "drums"], "dim": 16, "depth": 1, "band_widths": [16, 16, 32, 65],
                  "mask_hidden_factor": 2, "d_state": 16, "expand": 2, "headdim": 16, "scan_chunk_size": 32},
        "inference": {"chunk_seconds": 1.0, "overlap": 0.25, "batch_size": 4, **inference}})


def save_tiny_checkpoint(path: Path, config: Config = None) -> Path:
    """Seeded random weights (an untrained model starts close to an identity mask, which hides mix-ups)."""
    from bsmamba2.checkpoint import build_model, save_model  # the model, only for the tests that need it

    torch.manual_seed(0)
    model = build_model(config or tiny_config())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.5 * torch.randn_like(parameter)).add_(0.05 * torch.randn_like(parameter))
    save_model(model, path)
    return path


def noise(channels: int, frames: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((channels, frames))).astype(np.float32)


def write_audio(path: Path, wave: np.ndarray, rate: int) -> Path:
    """Write (channels, samples) in the format the suffix names (16-bit for wav and flac)."""
    file_format, subtype = FORMATS[path.suffix[1:]]
    sf.write(path, wave.T, rate, format=file_format, subtype=subtype)
    return path
