"""Tiny MUSDB18-HQ-style data sets and configs for the training tests (8 kHz, seconds-long tracks)."""
from pathlib import Path

import numpy as np
import soundfile as sf

from bsmamba2.config import Config

RATE = 8000
SOURCES = ("vocals", "drums", "bass", "other")


def track_ratio(index: int) -> float:
    """Every stem of track `index` has right = ratio × left: a stem's track is readable from any segment."""
    return 0.3 + 0.1 * index


def write_tracks(root: Path, subset: str, count: int, seconds: float = 2.0, first: int = 0,
                 silent: tuple = ()) -> None:
    """Tracks `track{i}` with a distinct, always-active sound per stem; `silent` names stems left silent."""
    t = np.arange(int(seconds * RATE)) / RATE
    for index in range(first, first + count):
        rng = np.random.default_rng(index)
        mono = {
            "vocals": 0.3 * np.sin(2 * np.pi * (330 + 20 * index) * t + 4 * np.sin(2 * np.pi * 5 * t)),
            "drums": 0.4 * rng.standard_normal(t.size) * np.exp(-20 * (t % 0.25)),
            "bass": 0.3 * np.sin(2 * np.pi * (55 + 5 * index) * t),
            "other": 0.15 * np.sign(np.sin(2 * np.pi * (520 + 15 * index) * t)) + 0.01,
        }
        directory = root / subset / f"track{index}"
        directory.mkdir(parents=True, exist_ok=True)
        mixture = 0
        for stem, left in mono.items():
            stereo = np.stack([left, track_ratio(index) * left], axis=1).astype(np.float32)
            if stem in silent:
                stereo[:] = 0
            sf.write(directory / f"{stem}.wav", stereo, RATE, subtype="FLOAT")
            mixture = mixture + stereo
        sf.write(directory / "mixture.wav", mixture, RATE, subtype="FLOAT")


def tiny_config_dict(root: Path, **sections) -> dict:
    """A CPU-second-sized BSMamba2 training config on 8 kHz data (`sections` update the defaults per section)."""
    values = {
        "audio": {"sample_rate": RATE, "n_fft": 256, "hop_length": 64},
        "model": {"stems": ["vocals"], "dim": 16, "depth": 1, "band_widths": [4, 4, 8, 16, 32, 65],
                  "d_state": 16, "expand": 2, "headdim": 16, "scan_chunk_size": 32, "mask_hidden_factor": 2},
        "training": {"max_steps": 4, "batch_size": 2, "grad_accum_steps": 1, "lr": 3e-3, "num_workers": 0,
                     "log_every": 1, "validate_every": 1000, "checkpoint_every": 2, "keep_last": 2,
                     "ema_decay": 0.9, "loss": {"stft_windows": [256, 128], "stft_min_n_fft": 128, "stft_hop": 64}},
        "data": {"root": str(root), "valid_subset": "test", "valid_tracks": [], "segment_seconds": 0.5,
                 "valid_segment_seconds": 0.5},
        "inference": {"chunk_seconds": 0.5, "overlap": 0.25},
    }
    for section, updates in sections.items():
        values[section].update(updates)
    return values


def tiny_config(root: Path, **sections) -> Config:
    return Config.from_dict(tiny_config_dict(root, **sections))
