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
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import soundfile as sf
import soxr

from .errors import BSMamba2Error
from .files import temporary_path

log = logging.getLogger("bsmamba2")

# What a folder search picks up: the containers libsndfile decodes.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf",
                    ".w64", ".rf64")
# --format: (libsndfile's container, its codec for the lossy formats; None = PCM at --bit-depth)
OUTPUT_FORMATS = {"wav": ("WAV", None), "flac": ("FLAC", None), "mp3": ("MP3", "MPEG_LAYER_III"),
                  "ogg": ("OGG", "VORBIS"), "opus": ("OGG", "OPUS")}
BIT_DEPTHS = {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}
DEFAULT_BIT_DEPTH = "24"
# --bitrate in kbps for the lossy formats: (lowest, highest) the encoder can be asked for
BITRATES = {"mp3": (32, 320), "ogg": (64, 500), "opus": (12, 512)}
DEFAULT_BITRATE = 320
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates an Opus stream has; others are written at 48 kHz
# Vorbis encodes at a quality (VBR), not a bitrate: its nominal bitrates for 44.1 kHz stereo at quality 0, 0.1 … 1
VORBIS_NOMINAL_KBPS = (64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 500)
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

    Clipping: 32-bit float files are written as they are (values beyond ±1 kept); integer and lossy files are
    clipped to full scale, counted, and reported once in a warning when the file is committed.
    Lossy formats (mp3, ogg, opus) take `bitrate` in kbps (default DEFAULT_BITRATE) instead of a bit depth; an
    Opus file is written at 48 kHz unless `sample_rate` is one of OPUS_RATES.
    """

    def __init__(self, path: Union[str, Path], sample_rate: int, channels: int, file_format: str = "wav",
                 bit_depth: Optional[str] = None, bitrate: Optional[int] = None):
        check_output_format(file_format, bit_depth, bitrate)
        self.path = Path(path)
        self.temporary = temporary_path(self.path)
        self.clip = bit_depth != "32f"
        self.clipped = 0
        self.peak = 0.0
        container, codec = OUTPUT_FORMATS[file_format]
        options = {"subtype": codec or BIT_DEPTHS[bit_depth or DEFAULT_BIT_DEPTH], "format": container}
        self._resampler = None
        if file_format == "opus" and sample_rate not in OPUS_RATES:
            self._resampler = soxr.ResampleStream(sample_rate, 48000, channels, dtype="float32", quality="VHQ")
            sample_rate = 48000
        if codec is not None:
            bitrate = bitrate or DEFAULT_BITRATE
            options["compression_level"] = compression_level(file_format, bitrate, sample_rate, channels)
            if file_format == "mp3":
                options["bitrate_mode"] = "CONSTANT"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = sf.SoundFile(self.temporary, "w", samplerate=sample_rate, channels=channels, **options)
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
        frames = np.ascontiguousarray(block.T)
        self._file.write(self._resampler.resample_chunk(frames) if self._resampler else frames)

    def commit(self) -> Path:
        if self._resampler is not None:
            self._file.write(self._resampler.resample_chunk(np.zeros((0, self._file.channels), np.float32),
                                                            last=True))
        self._file.close()
        os.replace(self.temporary, self.path)
        if self.clipped:
            log.warning("%s: %d samples clipped to full scale (peak %+.1f dBFS); bit depth 32f keeps them",
                        self.path, self.clipped, 20 * np.log10(self.peak))
        return self.path

    def discard(self) -> None:
        self._file.close()
        self.temporary.unlink(missing_ok=True)


def check_output_format(file_format: str, bit_depth: Optional[str] = None, bitrate: Optional[int] = None) -> None:
    """The output options fit together and the libsndfile here can write the format (checked before any work).
    A bit depth belongs to wav and flac (default DEFAULT_BIT_DEPTH), a bitrate to the lossy formats."""
    if file_format not in OUTPUT_FORMATS:
        raise BSMamba2Error(f"format {file_format}: must be one of {', '.join(OUTPUT_FORMATS)}")
    if bit_depth is not None and bit_depth not in BIT_DEPTHS:
        raise BSMamba2Error(f"bit depth {bit_depth}: must be one of {', '.join(BIT_DEPTHS)}")
    if file_format == "flac" and bit_depth == "32f":
        raise BSMamba2Error("bit depth 32f: FLAC stores integers only; choose format wav, or bit depth 16 or 24")
    lossy = file_format in BITRATES
    if lossy and bit_depth is not None:
        raise BSMamba2Error(f"bit depth {bit_depth}: {file_format} is lossy and has no bit depth; "
                            "set its size with a bitrate")
    if not lossy and bitrate is not None:
        raise BSMamba2Error(f"bitrate {bitrate}: {file_format} is lossless; a bitrate applies to "
                            f"{', '.join(BITRATES)}")
    if bitrate is not None and not BITRATES[file_format][0] <= bitrate <= BITRATES[file_format][1]:
        raise BSMamba2Error(f"bitrate {bitrate}: {file_format} takes {BITRATES[file_format][0]} to "
                            f"{BITRATES[file_format][1]} kbps")
    container, codec = OUTPUT_FORMATS[file_format]
    if container not in sf.available_formats() or (codec and codec not in sf.available_subtypes(container)):
        raise BSMamba2Error(f"format {file_format}: the libsndfile here ({sf.__libsndfile_version__}) cannot "
                            f"write {container}{f' {codec}' if codec else ''}; libsndfile >= 1.1 can, and the "
                            "soundfile >= 0.12 wheels bundle it: pip install --upgrade soundfile")


def compression_level(file_format: str, bitrate: int, sample_rate: int, channels: int) -> float:
    """libsndfile's compression level, 0 (largest file) to 1 (smallest), that gives about `bitrate` kbps.

    libsndfile spreads the level linearly over the encoder's range: for mp3 LAME's constant bitrates of the MPEG
    version that the sample rate implies (LAME then takes the nearest standard bitrate), for Opus a target of
    256 down to 6 kbps per channel; for Vorbis the level is 1 − quality."""
    if file_format == "ogg":
        quality = np.interp(bitrate, VORBIS_NOMINAL_KBPS, np.linspace(0, 1, len(VORBIS_NOMINAL_KBPS)))
        return float(1 - quality)
    if file_format == "mp3":
        high, low = (320, 32) if sample_rate >= 32000 else (160, 8) if sample_rate >= 16000 else (64, 8)
    else:
        high, low = 256 * channels, 6 * channels
    return min(max((high - bitrate) / (high - low), 0.0), 0.999)  # libsndfile refuses 1.0 for mp3
