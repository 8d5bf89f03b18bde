"""Track folders in the MUSDB18-HQ layout: `ROOT/<subset>/<track>/<stem>.wav` (or `.flac`).

One folder per track, one file per stem (`mixture`, `vocals`, `drums`, ...). Finding tracks, picking them by name
and checking their stems happen here for training (`data.py`) and evaluation (`evaluate.py`) alike. Stems are read
with soundfile, only the requested frames, as float32 arrays shaped (channels, samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import soundfile as sf

from .errors import BSMamba2Error

STEM_EXTENSIONS = (".wav", ".flac")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class StemInfo:
    path: Path
    sample_rate: int
    frames: int
    channels: int


def list_tracks(root: PathLike, subset: str) -> list[Path]:
    """The track folders of `root/subset`, sorted by name (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        relative = "" if root.is_absolute() else (f" (a relative path, taken from the working directory: "
                                                   f"{root.resolve()})")
        raise BSMamba2Error(f"data root {root} is not a directory{relative}")
    subset_dir = root / subset
    if not subset_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise BSMamba2Error(f"{subset_dir}: no subset {subset!r} in {root} (found: {', '.join(found) or 'nothing'})")
    tracks = sorted(p for p in subset_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not tracks:
        raise BSMamba2Error(f"{subset_dir}: no track folders")
    return tracks


def pick_tracks(tracks: list, names, where: str) -> list:
    """The tracks called `names` (each once, in the order given) among `tracks` (anything with a `.name`);
    an unknown name raises, with `where` saying where the tracks were looked for."""
    by_name = {track.name: track for track in tracks}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise BSMamba2Error(f"{where}: no track named {unknown[0]!r}"
                            + (f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return [by_name[name] for name in dict.fromkeys(names)]


def check_stems(track_dir: PathLike, stems: list[str], sample_rate: Optional[int] = None,
                same_shape: bool = False) -> list[StemInfo]:
    """The headers of a track's `stems`; raises when one is missing or unreadable, is not at `sample_rate` (when
    given), or, with `same_shape`, differs from the first stem in sample rate, channels or length."""
    infos = [stem_info(track_dir, stem) for stem in stems]
    first = infos[0]
    for info in infos:
        if sample_rate is not None:
            check_sample_rate(info.path, info.sample_rate, sample_rate)
        if same_shape and (info.sample_rate, info.channels, info.frames) != (first.sample_rate, first.channels,
                                                                            first.frames):
            raise BSMamba2Error(
                f"{info.path}: {info.sample_rate} Hz, {info.channels} channels, {info.frames} samples, but the "
                f"{stems[0]} has {first.sample_rate} Hz, {first.channels} channels, {first.frames} samples")
    return infos


def check_sample_rate(path, rate: int, wanted: int) -> None:
    if rate != wanted:
        raise BSMamba2Error(f"{path}: sample rate {rate} Hz, the config wants {wanted} Hz (audio.sample_rate); "
                            f"resample the data set first")


def has_stem(track_dir: PathLike, stem: str) -> bool:
    try:
        stem_path(track_dir, stem)
    except BSMamba2Error:
        return False
    return True


def stem_path(track_dir: PathLike, stem: str) -> Path:
    """The file holding `stem` in a track folder: `<stem>.wav`, else `<stem>.flac`."""
    track_dir = Path(track_dir)
    for extension in STEM_EXTENSIONS:
        path = track_dir / f"{stem}{extension}"
        if path.is_file():
            return path
    raise BSMamba2Error(f"{track_dir}: no {stem} stem ({' or '.join(stem + e for e in STEM_EXTENSIONS)})")


def stem_info(track_dir: PathLike, stem: str) -> StemInfo:
    """Sample rate, length in frames and channel count of a stem, read from the file header."""
    with _open_stem(track_dir, stem) as audio_file:
        return StemInfo(Path(audio_file.name), audio_file.samplerate, audio_file.frames, audio_file.channels)


def read_stem(track_dir: PathLike, stem: str, start: int = 0, frames: int = -1) -> np.ndarray:
    """Read `frames` samples (all the rest when -1) of a stem from `start`, as float32 (channels, samples)."""
    with _open_stem(track_dir, stem) as audio_file:
        if start:
            audio_file.seek(min(start, audio_file.frames))
        audio = audio_file.read(frames, dtype="float32", always_2d=True)
    return np.ascontiguousarray(audio.T)


def _open_stem(track_dir: PathLike, stem: str) -> sf.SoundFile:
    path = stem_path(track_dir, stem)
    try:
        return sf.SoundFile(str(path))
    except RuntimeError as error:  # soundfile's errors derive from RuntimeError
        raise BSMamba2Error(f"{path}: cannot read audio: {getattr(error, 'error_string', error)}") from None
