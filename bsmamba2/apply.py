"""Chunked overlap-add: the one way a model is applied to audio of any length, in bounded memory.

The track streams in as blocks and is cut into chunks of `chunk` samples, `step = chunk - fade` apart, so
neighbours overlap by `fade` samples. Each chunk's estimate is weighted by a window that rises over its first
`fade` samples and falls over its last `fade` samples with complementary raised-cosine ramps, and every output
sample is divided by the sum of the weights it received, so the weights of each sample add up to one. The track
is preceded by `fade` zeros and followed by enough zeros to fill the last chunk, which puts its first and last
samples where a chunk has full weight. Several chunks go through the model per forward; only those chunks are
on the device; finished samples leave as soon as no later chunk touches them.

    blocks ─→ padded chunks ─batch→ model (+ TTA views) ─→ window · estimate, summed ─→ ÷ weights ─→ blocks
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import BSMamba2Error


def apply_model(model: torch.nn.Module, blocks: Iterable[np.ndarray], *, chunk_seconds: float, overlap: float,
                batch_size: int = 1, tta: bool = False, device="cpu") -> Iterator[np.ndarray]:
    """Separate a stream of (channels, n) float32 blocks at `model.sample_rate` into (stems, channels, n) blocks
    whose lengths add up to exactly the input's."""
    chunk = chunk_length(chunk_seconds, model.sample_rate)
    fade = min(round(overlap * chunk), chunk - 1)
    chunks = PaddedChunks(blocks, chunk, step=chunk - fade, lead=fade)
    window = fade_window(chunk, fade)
    overlap_add = OverlapAdd(window, step=chunk - fade)
    position = 0  # in the padded signal: everything before it has been emitted
    chunk_iterator = iter(chunks)
    while batch := list(islice(chunk_iterator, batch_size)):
        for estimate in estimate_chunks(model, np.stack(batch), tta=tta, device=device):
            finished = overlap_add.add(estimate)
            # the padding in front is dropped; the end is known once the input has run out
            start, stop = max(position, fade), min(position + finished.shape[-1], fade + chunks.frames_read)
            if stop > start:
                yield finished[..., start - position:stop - position]
            position += finished.shape[-1]


def chunk_length(chunk_seconds: float, sample_rate: int) -> int:
    """The samples in one chunk."""
    return max(1, round(chunk_seconds * sample_rate))


def fade_window(chunk: int, fade: int) -> np.ndarray:
    """Ones with raised-cosine ramps of `fade` samples at both ends; overlapping ramps of neighbours add to one."""
    window = np.ones(chunk, np.float32)
    if fade:
        ramp = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade) ** 2
        window[:fade] *= ramp
        window[chunk - fade:] *= ramp[::-1]
    return window


class PaddedChunks:
    """Fixed-length chunks of the stream with `lead` zeros in front and zeros after the end; a chunk is made
    only while it starts before the end of the padded signal, so the last one ends in its own fade-out.
    `frames_read` counts the real samples consumed so far."""

    def __init__(self, blocks: Iterable[np.ndarray], chunk: int, step: int, lead: int):
        self.blocks, self.chunk, self.step, self.lead = blocks, chunk, step, lead
        self.frames_read = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        blocks = iter(self.blocks)
        buffer = None  # the padded signal from the next chunk's start on
        exhausted = False
        start = 0
        while True:
            while not exhausted and (buffer is None or buffer.shape[-1] < self.chunk):
                block = next(blocks, None)
                if block is None:
                    exhausted = True
                    break
                if buffer is None:
                    buffer = np.zeros((block.shape[0], self.lead), np.float32)
                buffer = np.concatenate([buffer, block.astype(np.float32, copy=False)], axis=-1)
                self.frames_read += block.shape[-1]
            if exhausted and (self.frames_read == 0 or start >= self.lead + self.frames_read):
                return
            if buffer.shape[-1] < self.chunk:
                buffer = np.pad(buffer, ((0, 0), (0, self.chunk - buffer.shape[-1])))
            yield buffer[:, :self.chunk]
            buffer = buffer[:, self.step:]
            start += self.step


class OverlapAdd:
    """Sums windowed chunk estimates spaced `step` apart; `add` returns the `step` samples it completed."""

    def __init__(self, window: np.ndarray, step: int):
        self.window, self.step = window, step
        self.total = None  # weighted sum over the current chunk's span
        self.weight = np.zeros_like(window)

    def add(self, estimate: np.ndarray) -> np.ndarray:
        if self.total is None:
            self.total = np.zeros(estimate.shape, np.float32)
        self.total += estimate * self.window
        self.weight += self.window
        finished = self.total[..., :self.step] / self.weight[:self.step]
        self.total = np.concatenate([self.total[..., self.step:], np.zeros_like(self.total[..., :self.step])],
                                    axis=-1)
        self.weight = np.concatenate([self.weight[self.step:], np.zeros_like(self.weight[:self.step])])
        return finished


def estimate_chunks(model: torch.nn.Module, chunks: np.ndarray, *, tta: bool = False, device="cpu") -> np.ndarray:
    """(batch, channels, samples) on the CPU → (batch, stems, channels, samples) on the CPU.

    With `tta`, the model also sees the chunks with inverted polarity and (stereo) swapped channels, in the same
    forward; each view's estimate is mapped back and the views are averaged.
    """
    x = torch.from_numpy(chunks).to(device)
    views = [x]
    if tta:
        views += [-x, x.flip(1)] if x.shape[1] == 2 else [-x]
    with torch.inference_mode():
        estimates = forward_channels(model, torch.cat(views)).float()
    estimates = list(estimates.split(len(chunks)))
    if tta:
        estimates[1] = -estimates[1]
        if len(estimates) == 3:
            estimates[2] = estimates[2].flip(2)
    estimate = torch.stack(estimates).mean(0)
    if not torch.isfinite(estimate).all():
        raise BSMamba2Error("the model produced NaN or Inf on finite input (is the checkpoint corrupt?)")
    return estimate.cpu().numpy()


def forward_channels(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the model on (batch, channels, samples) whatever its channel count: mono input is duplicated for a
    stereo model and its estimates averaged back to mono; stereo input goes through a mono model channel by
    channel."""
    batch, channels, samples = x.shape
    wanted = model.audio_channels
    if channels == wanted:
        return model(x)
    if channels == 1:
        return model(x.expand(batch, wanted, samples)).mean(dim=2, keepdim=True)
    if wanted == 1:
        estimate = model(x.reshape(batch * channels, 1, samples))
        return estimate.reshape(batch, channels, -1, samples).transpose(1, 2)
    raise BSMamba2Error(f"cannot feed {channels}-channel audio to a {wanted}-channel model")

