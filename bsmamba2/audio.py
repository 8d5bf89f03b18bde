"""Audio files in and out, block by block: reading (soundfile), resampling (soxr), atomic writing.

Blocks are float32 arrays shaped (..., samples) — channels first, as the model wants them; soundfile's
(samples, channels) layout stays inside this module. Nothing here holds a whole track, so memory does not grow
with the length of a file.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Union

import numpy as np
import soundfile as sf
import soxr

from .errors import BSMamba2Error
from .files import temporary_path

log = logging.getLogger("bsmamba2")

# What a folder search picks up: the containers libsndfile decodes.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf",
                    ".w64", ".rf64")
OUTPUT_FORMATS = ("wav", "flac")
BIT_DEPTHS = {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}
BLOCK_FRAMES = 1 << 16  # ≈ 1.5 s at 44.1 kHz per read


class AudioReader:
    """An audio file opened for streaming: `sample_rate`, `channels`, `frames` (as the header says), `blocks()`.

    Every way a file can be unusable — missing, empty, not audio, truncated, more than two channels — raises
    BSMamba2Error naming the file, as early as it can be told.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if self.path.is_dir():
            raise BSMamba2Error(f"{self.path}: is a folder, not an audio file")
        try:
            with open(self.path, "rb") as probe:
                empty = not probe.read(1)
        except FileNotFoundError:
            raise BSMamba2Error(f"{self.path}: no such file") from None
        except OSError as error:
            raise BSMamba2Error(f"{self.path}: cannot read: {error.strerror or error}") from None
        if empty:
            raise BSMamba2Error(f"{self.path}: empty file")
        try:
            self._file = sf.SoundFile(self.path)
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            raise BSMamba2Error(f"{self.path}: not an audio file soundfile can read "
                                f"({_libsndfile_reason(error)})") from None
        self.sample_rate = self._file.samplerate
        self.channels = self._file.channels
        self.frames = self._file.frames
        self.frames_read = 0
        self.nonfinite = 0
        problem = _header_problem(self._file)
        if problem is None and self.channels > 2:
            problem = f"has {self.channels} channels; only mono and stereo are supported (downmix it first)"
        if problem is None and self.frames == 0:
            problem = "contains no audio samples"
        if problem is not None:
            self.close()
            raise BSMamba2Error(f"{self.path}: {problem}")

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def blocks(self, frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
        """(channels, n) float32 blocks of the whole file. NaN and ±Inf samples become silence (with a warning)."""
        while True:
            try:
                block = self._file.read(frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as error:
                where = f" after {self.frames_read / self.sample_rate:.2f} s" if self.frames_read else ""
                raise BSMamba2Error(f"{self.path}: truncated or corrupt: decoding failed{where} "
                                    f"({_libsndfile_reason(error)})") from None
            if len(block) == 0:
                break
            self.frames_read += len(block)
            block, nonfinite = finite(block.T)
            self.nonfinite += nonfinite
            yield block
        if self.frames_read < self.frames:
            raise BSMamba2Error(f"{self.path}: truncated: the header promises {self.frames} samples, only "
                                f"{self.frames_read} could be decoded")
        if self.nonfinite:
            log.warning("%s: %d NaN/Inf samples replaced by silence", self.path, self.nonfinite)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finite(block: np.ndarray) -> tuple[np.ndarray, int]:
    """The block (contiguous float32) with NaN and ±Inf samples silenced, and how many there were."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    is_finite = np.isfinite(block)
    if is_finite.all():
        return block, 0
    return np.where(is_finite, block, np.float32(0)), int(block.size - is_finite.sum())


def _header_problem(file: sf.SoundFile):
    """What libsndfile's parse log says is wrong with a file it could still open (truncation), or None."""
    info = file.extra_info
    # WAV: "data : 400000 (should be 199978)" when the file ends before its data chunk does. Streamed WAVs
    # carry a placeholder length (0 or 0xFFFFFFFF) and are fine.
    declared = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.MULTILINE)
    if declared and int(declared.group(2)) < int(declared.group(1)) < 0xFFFFFFFF:
        return (f"truncated: the header promises {int(declared.group(1))} bytes of audio, the file holds "
                f"{int(declared.group(2))}")
    if "Last page lacks an end-of-stream bit" in info:
        return "truncated: the Ogg stream ends without its final page"
    return None


def _libsndfile_reason(error: Exception) -> str:
    text = str(error).replace("\n", " ").strip()
    text = re.sub(r"^Error (opening|:) ('.*?': )?", "", text).strip(" :")
    return text or type(error).__name__


def resample_blocks(blocks: Iterable[np.ndarray], from_rate: int, to_rate: int) -> Iterator[np.ndarray]:
    """Resample a stream of (..., n) blocks (soxr, very high quality). soxr compensates its filter delay, so the
    concatenated output equals resampling the whole signal at once."""
    if from_rate == to_rate:
        yield from blocks
        return
    stream, lead_shape = None, None
    for block in blocks:
        if stream is None:
            lead_shape = block.shape[:-1]
            stream = soxr.ResampleStream(from_rate, to_rate, int(np.prod(lead_shape)), dtype="float32",
                                         quality="VHQ")
        out = stream.resample_chunk(np.ascontiguousarray(block.reshape(-1, block.shape[-1]).T))
        yield out.T.reshape(*lead_shape, -1)
    if stream is not None:
        out = stream.resample_chunk(np.zeros((0, int(np.prod(lead_shape))), np.float32), last=True)
        yield out.T.reshape(*lead_shape, -1)


class AudioWriter:
    """Writes one audio file block by block under a temporary name in its folder; `commit()` renames it into
    place, `discard()` deletes it. A run that dies half-way never leaves a partial file under the final name.

    Clipping: 32-bit float files are written as they are (values beyond ±1 kept); integer files are clipped to
    full scale, counted, and reported once in a warning when the file is committed.
    """

    def __init__(self, path: Union[str, Path], sample_rate: int, channels: int, file_format: str = "wav",
                 bit_depth: str = "24"):
        check_output_format(file_format, bit_depth)
        self.path = Path(path)
        self.temporary = temporary_path(self.path)
        self.clip = bit_depth != "32f"
        self.clipped = 0
        self.peak = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = sf.SoundFile(self.temporary, "w", samplerate=sample_rate, channels=channels,
                                      subtype=BIT_DEPTHS[bit_depth], format=file_format.upper())
        except (OSError, sf.LibsndfileError, RuntimeError) as error:
            reason = getattr(error, "strerror", None) or _libsndfile_reason(error)
            raise BSMamba2Error(f"cannot write to {self.path.parent}: {reason}") from None

    def write(self, block: np.ndarray) -> None:
        """Append a (channels, n) block."""
        if self.clip and block.size:
            peak = float(np.abs(block).max())
            if peak > 1.0:
                self.peak = max(self.peak, peak)
                self.clipped += int((np.abs(block) > 1.0).sum())
                block = np.clip(block, -1.0, 1.0)
        self._file.write(block.T)

    def commit(self) -> Path:
        self._file.close()
        os.replace(self.temporary, self.path)
        if self.clipped:
            log.warning("%s: %d samples clipped to full scale (peak %+.1f dBFS); --bit-depth 32f keeps them",
                        self.path, self.clipped, 20 * np.log10(self.peak))
        return self.path

    def discard(self) -> None:
        self._file.close()
        self.temporary.unlink(missing_ok=True)


def check_output_format(file_format: str, bit_depth: str) -> None:
    if file_format not in OUTPUT_FORMATS:
        raise BSMamba2Error(f"--format {file_format}: must be one of {', '.join(OUTPUT_FORMATS)}")
    if bit_depth not in BIT_DEPTHS:
        raise BSMamba2Error(f"--bit-depth {bit_depth}: must be one of {', '.join(BIT_DEPTHS)}")
    if file_format == "flac" and bit_depth == "32f":
        raise BSMamba2Error("--bit-depth 32f: FLAC stores integers only; use --format wav or --bit-depth 16/24")
