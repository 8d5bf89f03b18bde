"""Training and validation data from MUSDB18-HQ-style folders or the `.stem.mp4` MUSDB18 release.

Training examples follow the paper ("Mamba2 Meets Silence"): every source stem comes from its own random track and
random position, gets a random gain in `gain_range` and is silenced with probability `silence_prob`; the mixture is
the sum of the stems and each target is exactly the scaled (or silenced) stem inside that mixture. Optional:
segments whose stem is quieter than `min_activity_db` are redrawn, each stem sped up or slowed down
(`repitch_semitones`, or `stem_repitch_semitones` per stem: pitch and tempo together), channels swapped, polarity
flipped, given a random EQ (`eq_db`), a gain drawn in dB (`gain_db_range`), whole examples reduced to one stem
(`solo_prob`), and one target stem set at a random level over the rest (`level_over_rest_db`).

Example `index` is a pure function of `(seed, index)`: whichever worker or rank draws it, it is the same, so
worker seeding, multi-process splits and exact resumption all reduce to "which indices come next"
(`StreamBatches`). Only the needed frames of each stem are read from disk.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soxr
import torch
from torch.utils.data import Dataset, Sampler

from .config import Config
from .errors import BSMamba2Error
from .tracks import check_sample_rate, check_stems, has_stem, list_tracks, pick_tracks, read_stem

# Redraws of a too-quiet stem before accepting whatever came last (a track may be silent throughout).
ACTIVITY_TRIES = 10

# Random EQ: gains drawn at these frequencies (two octaves apart) and joined linearly over log frequency, so every
# stem gets a smooth tilt/bell curve, a timbre the renderer's instruments and rooms never had.
EQ_ANCHORS_HZ = 40.0 * 4.0 ** np.arange(5)


class FolderTrack:
    """A track folder holding one audio file per stem; `frames` is the shortest stem's length."""

    def __init__(self, directory: Path, stems: list[str], sample_rate: int):
        self.directory = directory
        self.name = directory.name
        self.has_mixture = has_stem(directory, "mixture")
        infos = check_stems(directory, stems + ["mixture"] * self.has_mixture, sample_rate)
        self.frames = min(info.frames for info in infos)

    def read(self, stem: str, start: int, frames: int) -> np.ndarray:
        return read_stem(self.directory, stem, start, frames)


class StemsFileTrack:
    """A track of the `.stem.mp4` MUSDB18 release, decoded through the `musdb` package (ffmpeg)."""

    def __init__(self, track, sample_rate: int):
        check_sample_rate(track.path, track.rate, sample_rate)
        self.track = track
        self.name = track.name
        self.has_mixture = True
        self.frames = int(track.samples)
        self.rate = sample_rate

    def read(self, stem: str, start: int, frames: int) -> np.ndarray:
        stem_id = self.track.stem_id if stem == "mixture" else self._source(stem).stem_id
        duration = None if frames < 0 else frames / self.rate
        audio = self.track.load_audio(self.track.path, stem_id, start / self.rate, duration)
        audio = np.ascontiguousarray(audio.T, dtype=np.float32)
        return audio if frames < 0 else _fit_length(audio, frames)  # ffmpeg may return a sample more or less

    def _source(self, stem: str):
        if stem not in self.track.sources:
            raise BSMamba2Error(f"{self.track.path}: no {stem} stem (has {', '.join(self.track.sources)})")
        return self.track.sources[stem]


def open_tracks(root: str, subset: str, stems: list[str], sample_rate: int) -> list:
    """The tracks of `root/subset`: track folders, or `.stem.mp4` files read through `musdb`."""
    subset_dir = Path(root) / subset
    if subset_dir.is_dir() and any(name.endswith(".stem.mp4") for name in os.listdir(subset_dir)):
        return [StemsFileTrack(track, sample_rate) for track in _musdb_tracks(root, subset)]
    return [FolderTrack(directory, stems, sample_rate) for directory in list_tracks(root, subset)]


def _musdb_tracks(root: str, subset: str) -> list:
    try:
        import musdb
    except ImportError:
        raise BSMamba2Error(f"{root}/{subset} holds .stem.mp4 files, which need the optional `musdb` package "
                            f"and ffmpeg: pip install musdb (or use the MUSDB18-HQ wav release)") from None
    return musdb.DB(root=str(root), subsets=[subset], is_wav=False, download=False).tracks


def split_tracks(config: Config) -> tuple[list, list]:
    """(training tracks, validation tracks) as `config.data` says; validation tracks never train."""
    data, stems = config.data, config.data.sources
    if data.root is None:
        raise BSMamba2Error("data.root: not set (a MUSDB18-HQ-style folder with train/ and test/)")
    rate = config.audio.sample_rate
    train = open_tracks(data.root, data.train_subset, stems, rate)
    pool = train if data.valid_subset == data.train_subset else open_tracks(data.root, data.valid_subset, stems, rate)
    valid = pool
    if data.valid_tracks:
        valid = pick_tracks(pool, data.valid_tracks, f"data.valid_tracks: {Path(data.root) / data.valid_subset}")
    if pool is train:
        held_out = {track.name for track in valid}
        train = [track for track in train if track.name not in held_out]
    if not train:
        raise BSMamba2Error(f"{data.root}/{data.train_subset}: no training tracks left after taking out the "
                            f"validation tracks (data.valid_tracks / data.valid_subset)")
    return train, valid


class TrainingSegments(Dataset):
    """Example `index` → (mixture (channels, samples), targets (stems, channels, samples)), float32 tensors."""

    def __init__(self, tracks: list, config: Config):
        self.tracks = tracks
        self.data = config.data
        self.sources = config.data.sources
        self.target_positions = [self.sources.index(stem) for stem in config.model.stems]
        self.frames = round(config.data.segment_seconds * config.audio.sample_rate)
        self.channels = config.audio.channels
        self.sample_rate = config.audio.sample_rate
        self.seed = config.training.seed
        self.attempts = ACTIVITY_TRIES if config.data.min_activity_db is not None else 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        if self.data.mix_different_tracks:
            # Distinct tracks for the stems whenever there are enough of them.
            picks = rng.choice(len(self.tracks), size=len(self.sources), replace=len(self.tracks) < len(self.sources))
            stems = [self._active_segment(rng, stem, int(pick), self._speed(rng, stem))
                     for stem, pick in zip(self.sources, picks)]
        else:
            stems = self._aligned_segments(rng, self._speed(rng))
        for audio in stems:
            if self.data.channel_swap and rng.random() < 0.5:
                audio[:] = audio[::-1].copy()
            if self.data.polarity_flip and rng.random() < 0.5:
                audio *= -1
            if self.data.eq_db > 0:
                audio[:] = random_eq(audio, rng, self.data.eq_db, self.sample_rate)
        if self.data.gain_db_range is None:
            gains = rng.uniform(*self.data.gain_range, size=len(stems))
        else:
            gains = 10 ** (rng.uniform(*self.data.gain_db_range, size=len(stems)) / 20)
        kept = rng.random(len(stems)) >= self.data.silence_prob
        if self.data.solo_prob > 0 and rng.random() < self.data.solo_prob:
            kept = np.arange(len(stems)) == rng.integers(len(stems))
        stems = np.stack(stems) * (gains * kept)[:, None, None].astype(np.float32)
        if self.data.level_over_rest_db is not None and rng.random() < self.data.level_over_rest_prob:
            set_level_over_rest(stems, int(rng.choice(self.target_positions)), rng.uniform(*self.data.level_over_rest_db))
        mixture = stems.sum(axis=0)
        return torch.from_numpy(mixture), torch.from_numpy(stems[self.target_positions])

    def _speed(self, rng: np.random.Generator, stem: str | None = None) -> float:
        """A playback speed for `stem_repitch_semitones` or `repitch_semitones` (1 when off: then nothing is drawn,
        so older configs' examples stay as they were)."""
        if stem in self.data.stem_repitch_semitones:
            return 2 ** (rng.uniform(*self.data.stem_repitch_semitones[stem]) / 12)
        semitones = self.data.repitch_semitones
        return 2 ** (rng.uniform(-semitones, semitones) / 12) if semitones > 0 else 1.0

    def _active_segment(self, rng: np.random.Generator, stem: str, track: int, speed: float) -> np.ndarray:
        """One stem's segment from `track`; when filtering, redrawn (track and position) while too quiet."""
        for attempt in range(self.attempts):
            if attempt:
                track = int(rng.integers(len(self.tracks)))
            audio = self._read(self.tracks[track], stem, rng, speed)
            if self._active(audio):
                break
        return audio

    def _aligned_segments(self, rng: np.random.Generator, speed: float) -> list[np.ndarray]:
        """All stems from one track at one position (a real song excerpt); filtering looks at the targets."""
        for _ in range(self.attempts):
            track = self.tracks[int(rng.integers(len(self.tracks)))]
            start = self._start(rng, track, self._source_frames(speed))
            stems = [self._read_at(track, stem, start, speed) for stem in self.sources]
            if all(self._active(stems[i]) for i in self.target_positions):
                break
        return stems

    def _active(self, audio: np.ndarray) -> bool:
        return self.data.min_activity_db is None or level_db(audio) >= self.data.min_activity_db

    def _start(self, rng: np.random.Generator, track, frames: int) -> int:
        return int(rng.integers(max(track.frames - frames, 0) + 1))

    def _source_frames(self, speed: float) -> int:
        """Frames to read so that playing them at `speed` fills one segment."""
        return self.frames if speed == 1 else math.ceil(self.frames * speed)

    def _read(self, track, stem: str, rng: np.random.Generator, speed: float) -> np.ndarray:
        return self._read_at(track, stem, self._start(rng, track, self._source_frames(speed)), speed)

    def _read_at(self, track, stem: str, start: int, speed: float) -> np.ndarray:
        frames = self._source_frames(speed)
        audio = to_channels(_fit_length(track.read(stem, start, frames), frames), self.channels)
        if speed != 1:
            # Played back `speed` times faster: the frames, taken at rate·speed, resampled to the rate.
            audio = soxr.resample(audio.T, self.sample_rate * speed, self.sample_rate, quality="HQ").T
            audio = _fit_length(np.ascontiguousarray(audio, dtype=np.float32), self.frames)
        return audio


class StreamBatches(Sampler):
    """Endless micro-batches of example indices for one rank, from micro-batch `start` on.

    Global micro-batch k holds indices [k·B·W, (k+1)·B·W); rank r takes its r-th slice of B. With W ranks of
    batch B the examples are exactly those of one process with batch W·B (DistributedSampler-style).
    """

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for micro_batch in itertools.count(self.start):
            first = (micro_batch * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))


@dataclass
class ValidationItem:
    mixture: np.ndarray  # (channels, samples)
    targets: np.ndarray  # (stems, channels, samples)


class ValidationTracks:
    """Fixed validation audio: whole tracks, or the middle `valid_segment_seconds` of each."""

    def __init__(self, tracks: list, config: Config):
        self.tracks = tracks
        self.stems = config.model.stems
        self.sources = config.data.sources
        self.channels = config.audio.channels
        seconds = config.data.valid_segment_seconds
        self.frames = round(seconds * config.audio.sample_rate) if seconds > 0 else -1

    def __len__(self) -> int:
        return len(self.tracks)

    def __getitem__(self, position: int) -> ValidationItem:
        track = self.tracks[position]
        frames = track.frames if self.frames < 0 else min(self.frames, track.frames)
        start = (track.frames - frames) // 2

        def read(stem):
            return to_channels(track.read(stem, start, frames), self.channels)

        targets = np.stack([read(stem) for stem in self.stems])
        mixture = read("mixture") if track.has_mixture else sum(read(stem) for stem in self.sources)
        return ValidationItem(mixture, targets)


def set_level_over_rest(stems: np.ndarray, position: int, level_db: float) -> None:
    """Scale stem `position` of `stems` (stems, channels, samples) up and the others down by the same factor, in
    place, so that its energy is `level_db` over the rest's; nothing changes when either is silent."""
    stem_energy = float(np.sum(np.square(stems[position], dtype=np.float64)))
    rest_energy = float(np.sum(np.square(stems.sum(axis=0) - stems[position], dtype=np.float64)))
    if stem_energy > 0 and rest_energy > 0:
        factor = (10 ** (level_db / 10) * rest_energy / stem_energy) ** 0.25  # the square root of the amplitude ratio
        stems *= np.float32(1 / factor)
        stems[position] *= np.float32(factor ** 2)


def random_eq(audio: np.ndarray, rng: np.random.Generator, max_db: float, sample_rate: int) -> np.ndarray:
    """`audio` (channels, samples) through a zero-phase EQ whose gain (dB) is drawn in ±`max_db` at each anchor."""
    gains_db = rng.uniform(-max_db, max_db, size=len(EQ_ANCHORS_HZ))
    frequencies = np.fft.rfftfreq(audio.shape[-1], 1 / sample_rate)
    curve_db = np.interp(np.log(np.maximum(frequencies, EQ_ANCHORS_HZ[0])), np.log(EQ_ANCHORS_HZ), gains_db)
    spectrum = np.fft.rfft(audio, axis=-1) * 10 ** (curve_db / 20)
    return np.fft.irfft(spectrum, n=audio.shape[-1], axis=-1).astype(np.float32)


def level_db(audio: np.ndarray) -> float:
    """RMS level in dBFS over all channels and samples (−inf for digital silence)."""
    mean_square = float(np.mean(np.square(audio, dtype=np.float64)))
    return 10 * math.log10(mean_square) if mean_square > 0 else -math.inf


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """(c, s) → (channels, s): mono is duplicated, stereo averaged to mono when one channel is wanted."""
    if audio.shape[0] == channels:
        return audio
    if channels == 1:
        return audio.mean(axis=0, keepdims=True)
    return np.repeat(audio[:1], channels, axis=0)


def _fit_length(audio: np.ndarray, frames: int) -> np.ndarray:
    """Zero-pad at the end (a track shorter than a segment) or cut to exactly `frames` samples."""
    if audio.shape[1] >= frames:
        return audio[:, :frames]
    return np.pad(audio, ((0, 0), (0, frames - audio.shape[1])))
