"""Spectrogram pictures of a mixture and its stems, on one colour scale so that their loudness compares.

The picture is a grid of `columns` evenly spaced FFT frames; rows are log-spaced in frequency (as a musician
hears pitch), low notes at the bottom. The PNG is written with numpy and zlib: a picture this simple does not
need an imaging library. Its axes are drawn by the page, from the tick positions `axes` gives, so that their
labels are sharp text at any zoom.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from ..audio import AudioReader
from ..files import atomic_write

N_FFT = 2048
COLUMNS = 800
ROWS = 200
LOWEST_HZ = 30.0
RANGE_DB = 80.0  # shown below the loudest point of all the pictures of one job
FREQUENCY_TICKS_HZ = (100, 1000, 10000)  # one a decade: enough to read a log axis in a picture 72 px tall
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600)  # seconds between time ticks; the first giving at most 8
# "magma"-like anchors from silence (black) to loudest (pale yellow), interpolated into 256 colours
ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                    [250, 193, 39], [252, 255, 164]], np.float64)
PALETTE = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(ANCHORS)), ANCHORS[:, channel])
                    for channel in range(3)], axis=-1).round().astype(np.uint8)


def draw(sources: dict[str, Path], paths: dict[str, Path]) -> dict:
    """Write a picture of each of `sources` at paths[name], all on one colour scale and over the frequencies of
    the first source (the mixture; a stem written at a higher rate, as Opus does, is shown up to the same
    frequency); return the ticks of their common `axes`."""
    with AudioReader(next(iter(sources.values()))) as reader:
        seconds, top_hz = reader.seconds, reader.sample_rate / 2
    write_pictures({name: levels_db(path, top_hz) for name, path in sources.items()}, paths)
    return axes(seconds, top_hz)


def axes(seconds: float, top_hz: float) -> dict:
    """The pictures' ticks as [position, label] pairs: "time" positions are fractions of the width from the left
    (a tick every round number of seconds, none at the edges, where a label would not fit), "frequency" ones
    fractions of the height from the bottom (0.1, 1 and 10 kHz on the log scale of the rows)."""
    step = next((step for step in TIME_STEPS if seconds / step <= 8), TIME_STEPS[-1])
    times = [[ticks * step / seconds, f"{ticks * step:g} s"] for ticks in range(1, int(seconds / step) + 1)
             if ticks * step / seconds < 0.97]
    frequencies = [[float(np.log(hz / LOWEST_HZ) / np.log(top_hz / LOWEST_HZ)), f"{hz / 1000:g} kHz"]
                   for hz in FREQUENCY_TICKS_HZ if LOWEST_HZ < hz < top_hz]
    return {"time": times, "frequency": frequencies}


def levels_db(path: Union[str, Path], top_hz: float) -> np.ndarray:
    """(ROWS, COLUMNS) power in dB of the file's mono mix from LOWEST_HZ to `top_hz`; row 0 is the highest
    frequency band."""
    with AudioReader(path) as reader:
        mono = np.concatenate([block.mean(axis=0) for block in reader.blocks()])
        sample_rate = reader.sample_rate
    if len(mono) < N_FFT:
        mono = np.pad(mono, (0, N_FFT - len(mono)))
    starts = np.linspace(0, len(mono) - N_FFT, COLUMNS).round().astype(np.int64)
    frames = mono[starts[:, None] + np.arange(N_FFT)] * np.hanning(N_FFT).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # (COLUMNS, bins)
    # each row takes the loudest bin of its band; a band narrower than a bin repeats that bin
    edges_hz = np.geomspace(LOWEST_HZ, top_hz, ROWS + 1)[:-1]
    first_bins = np.minimum((edges_hz * N_FFT / sample_rate).astype(np.int64), power.shape[-1] - 1)
    bands = np.maximum.reduceat(power, first_bins, axis=-1)
    return 10 * np.log10(bands.T[::-1] + 1e-12)


def write_pictures(levels: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    """Write each of `levels` (from `levels_db`) as the PNG at paths[name], all on the loudest one's scale."""
    top = max(float(level.max()) for level in levels.values())
    for name, level in levels.items():
        shade = np.clip((level - (top - RANGE_DB)) / RANGE_DB, 0.0, 1.0)
        write_png(paths[name], PALETTE[(shade * 255).round().astype(np.uint8)])


def write_png(path: Union[str, Path], rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG of a (height, width, 3) uint8 array."""
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    with atomic_write(path) as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
                   + chunk(b"IEND", b""))
