"""`Separator`: load a model once, then separate arrays and files with it.

    separator = Separator("model.ckpt", device="auto", two_stems="vocals")
    stems = separator.separate(wave, 48000)            # {"vocals": array, "no_vocals": array}
    paths = separator.separate_file("song.flac", "separated")

A track flows through as blocks: read (or sliced from the array) → resampled to the model's rate → chunked
overlap-add (`apply.apply_model`) → resampled back → cut to the input's exact length → written (or collected).
The command line (`bsmamba2 separate`) is a loop over `separate_file`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Full, Queue
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from .apply import apply_model
from .audio import BLOCK_FRAMES, AudioReader, AudioWriter, check_output_format, finite, resample_blocks
from .checkpoint import load_model
from .errors import BSMamba2Error
from .files import path_inside, track_name
from .pretrained import default_checkpoint
from .quantize import check_quantize
from .runtime import resolve_device

log = logging.getLogger("bsmamba2")

# --filename's fields: the input's name without extension (as a plain name: `files.track_name`), the stem, the
# output's extension, the input's extension (without the dot) and the input's folder relative to the folder or glob
# it was found under ("" for a file named directly)
FILENAME_FIELDS = ("track", "stem", "ext", "input_ext", "folder")


class Separator:
    """A loaded model plus how to apply it and how to write its stems.

    checkpoint: our checkpoint or a published BSMamba2 one, or a `bsmamba2 export` .onnx file (run by onnxruntime);
    None = the default model (`hub.DEFAULT_MODEL`).
    device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N", "mps" or a torch.device.
    model: instead of a checkpoint, a model from the registry by name (downloaded on first use).
    config: a Config or YAML path that overrides the checkpoint's own config.
    quantize: "int8" runs the model's projections in int8 (CPU only; see `bsmamba2.quantize`).
    stems: write only these model stems. two_stems: write this stem and `no_<stem>` = mixture − stem (the
    default for a model with one stem).
    chunk_seconds, overlap, batch_size: the overlap-add settings (default: the config's `inference` section).
    tta: also run each chunk with inverted polarity and swapped channels, and average.
    file_format ("wav", "flac", "mp3", "ogg", "opus"), bit_depth ("16", "24" (default), "32f"; wav and flac only),
    bitrate (kbps, lossy formats only), filename (template with the FILENAME_FIELDS, see `output_paths`),
    force (rewrite stems that are already there; by default `separate_file` writes only the missing ones), jobs
    (≥ 2: decode in one thread and encode in jobs − 1 threads beside inference), progress (a tqdm bar per file
    while stderr is a terminal).
    """

    def __init__(self, checkpoint: Union[str, Path, None] = None, device: Union[str, torch.device] = "auto", *,
                 model: Optional[str] = None, config=None, quantize: Optional[str] = None,
                 stems: Optional[list[str]] = None, two_stems: Optional[str] = None,
                 chunk_seconds: Optional[float] = None, overlap: Optional[float] = None,
                 batch_size: Optional[int] = None, tta: bool = False, file_format: str = "wav",
                 bit_depth: Optional[str] = None, filename: str = "{track}/{stem}.{ext}", force: bool = False,
                 jobs: int = 1, progress: bool = False, bitrate: Optional[int] = None):
        check_output_format(file_format, bit_depth, bitrate)
        check_filename_template(filename)
        _check(jobs >= 1, f"jobs {jobs}: must be at least 1")
        _check(model is None or checkpoint is None, "choose either a checkpoint or a model, not both")
        self.device = resolve_device(device, option="device")
        check_quantize(quantize, self.device)  # before a download
        if model is not None:
            from .hub import checkpoint_file

            checkpoint, registry_config = checkpoint_file(model, progress=progress)
            config = config if config is not None else registry_config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        if self.checkpoint.suffix.lower() == ".onnx":  # a `bsmamba2 export` file, run by onnxruntime
            from .onnx import OnnxModel

            _check(config is None, "an ONNX model carries its own config: a config applies to checkpoints only")
            _check(quantize is None, f"quantize {quantize}: applies to PyTorch checkpoints, not to an ONNX model")
            self.model = OnnxModel(self.checkpoint, chunk_seconds)
        else:
            self.model = load_model(self.checkpoint, config, self.device, quantize=quantize)
        chosen = {"chunk_seconds": chunk_seconds, "overlap": overlap, "batch_size": batch_size}
        self.inference = dataclasses.replace(self.model.config.inference,
                                             **{key: value for key, value in chosen.items() if value is not None})
        try:
            self.inference.validate()
        except ValueError as error:  # "inference.overlap: must be …" in the words of the option and its value
            key, _, problem = str(error).partition(": ")
            option = key.rpartition(".")[2]
            raise BSMamba2Error(f"{option.replace('_', ' ')} {getattr(self.inference, option)}: {problem}") from None
        self.tta, self.file_format, self.bit_depth, self.bitrate = tta, file_format, bit_depth, bitrate
        self.filename, self.force, self.jobs, self.progress = filename, force, jobs, progress

        available = ", ".join(self.model.stems)
        for name in (stems or []) + ([two_stems] if two_stems else []):
            _check(name in self.model.stems, f"stem {name!r}: this model has {available}")
        _check(not (stems and two_stems), "choose either stems or two_stems, not both")
        if len(self.model.stems) == 1 and not stems:
            two_stems = self.model.stems[0]  # a one-stem model's other output is what it leaves of the mixture
        self.two_stems = two_stems
        computed = [two_stems] if two_stems else list(stems or self.model.stems)
        self._stem_index = [self.model.stems.index(name) for name in computed]
        self.outputs = computed + ([f"no_{two_stems}"] if two_stems else [])
        _check(len(self.outputs) == 1 or "{stem}" in filename,
               f"filename {filename!r}: needs {{stem}} to tell the {len(self.outputs)} stems apart")

    def separate(self, audio, sample_rate: int) -> dict[str, np.ndarray]:
        """Stems of a numpy array or tensor shaped (channels, samples), (samples, channels) or (samples,) with one
        or two channels; each stem comes back as float32 in the input's layout."""
        _check(isinstance(sample_rate, (int, np.integer)) and sample_rate > 0,
               f"sample rate {sample_rate!r}: must be a positive integer")
        array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if array.ndim == 1:
            wave, restore = array[None], lambda stem: stem[0]
        elif array.ndim == 2 and array.shape[0] in (1, 2):
            wave, restore = array, lambda stem: stem
        elif array.ndim == 2 and array.shape[1] in (1, 2):
            wave, restore = array.T, lambda stem: stem.T
        else:
            raise BSMamba2Error(f"audio of shape {array.shape}: expected (channels, samples), (samples, channels) "
                                "or (samples,) with one or two channels")
        _check(wave.shape[1] > 0, "audio has no samples")
        wave, nonfinite = finite(wave)
        if nonfinite:
            log.warning("%d NaN/Inf samples replaced by silence", nonfinite)
        blocks = (wave[:, start:start + BLOCK_FRAMES] for start in range(0, wave.shape[1], BLOCK_FRAMES))
        separated = np.concatenate(list(self._separate_blocks(blocks, int(sample_rate))), axis=-1)
        return {name: restore(stem) for name, stem in zip(self.outputs, separated)}

    def separate_file(self, path: Union[str, Path], out_dir: Union[str, Path, None] = None, *, folder: str = "",
                      only: Optional[Iterable[str]] = None,
                      on_progress: Optional[Callable[[float, float], None]] = None) -> dict:
        """Separate an audio file. With `out_dir`, make sure its stems are there (named by the filename template,
        with `folder` for its {folder} field) and return their paths: the stems `missing_stems` names are written
        (the model still runs once over the whole track), the others kept, so that calling it again finishes an
        interrupted run and a finished track costs nothing. `only` restricts this to some of `self.outputs`.
        Without `out_dir`, return the stems as (channels, samples) float32 arrays. `on_progress(seconds_done,
        seconds_total)` is called after each block; an exception it raises stops the separation there, and no
        stem file is left behind."""
        path = Path(path)
        asked = list(self.outputs) if only is None else list(only)
        for name in asked:
            _check(name in self.outputs, f"stem {name!r}: the outputs are {', '.join(self.outputs)}")
        written = asked
        if out_dir is not None:
            paths = {name: stem_path for name, stem_path in self.output_paths(path, out_dir, folder).items()
                     if name in asked}
            written = [name for name in self.missing_stems(path, out_dir, folder) if name in asked]
            if not written:
                return paths
        selected = [index for index, name in enumerate(self.outputs) if name in written]
        started = time.perf_counter()
        with AudioReader(path) as reader:
            writers = None
            if out_dir is not None:
                writers = StemWriters({name: paths[name] for name in written}, reader.sample_rate, reader.channels,
                                      self.file_format, self.bit_depth, threads=self.jobs - 1, bitrate=self.bitrate)
            blocks = reader.blocks()
            if self.jobs > 1:
                blocks = prefetched(blocks)
            collected = []
            # disable=None: a bar on a terminal only; in a log file or a pipe each redraw would leave a line
            bar = tqdm(total=round(reader.seconds, 2), unit="s", desc=path.name, leave=False,
                       disable=None if self.progress else True, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                       "{n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]")
            frames_done = 0
            try:
                for block in self._separate_blocks(blocks, reader.sample_rate):
                    if writers is None:
                        collected.append(block)
                    else:
                        writers.write(block[selected])
                    bar.update(block.shape[-1] / reader.sample_rate)
                    frames_done += block.shape[-1]
                    if on_progress is not None:
                        on_progress(frames_done / reader.sample_rate, reader.seconds)
                if writers is None:
                    result = dict(zip(self.outputs, np.concatenate(collected, -1)))
                else:
                    writers.commit()
                    result = paths
            except BaseException:
                if writers is not None:
                    writers.discard()
                raise
            finally:
                blocks.close()  # stops a decoding thread before the file closes under it
                bar.close()
            seconds = reader.frames_read / reader.sample_rate
        wall = time.perf_counter() - started
        log.debug("%s: %.1f s of audio in %.1f s, real-time factor %.3f", path, seconds, wall, wall / seconds)
        return result

    def missing_stems(self, path: Union[str, Path], out_dir: Union[str, Path], folder: str = "") -> list[str]:
        """The outputs that `separate_file(path, out_dir, folder=folder)` writes: those whose file is not there
        yet, or every one with `force`. Another format's stems are other files: they do not count."""
        return [name for name, stem_path in self.output_paths(path, out_dir, folder).items()
                if self.force or not stem_path.exists()]

    def output_paths(self, path: Union[str, Path], out_dir: Union[str, Path], folder: str = "",
                     filename: Optional[str] = None) -> dict[str, Path]:
        """Where `separate_file(path, out_dir, folder=folder)` writes each stem (with `filename`: where it would
        with that template); a path that would leave `out_dir` is refused."""
        path = Path(path)
        return {name: path_inside(out_dir, render_filename(filename or self.filename, track=track_name(path),
                                                           stem=name, ext=self.file_format,
                                                           input_ext=path.suffix[1:], folder=folder))
                for name in self.outputs}

    def _separate_blocks(self, blocks: Iterable[np.ndarray], sample_rate: int) -> Iterator[np.ndarray]:
        """(channels, n) blocks at `sample_rate` → (outputs, channels, n) blocks of the same total length."""
        source = Tap(blocks, keep=self.two_stems is not None)
        estimates = apply_model(self.model, resample_blocks(source, sample_rate, self.model.sample_rate),
                                chunk_seconds=self.inference.chunk_seconds, overlap=self.inference.overlap,
                                batch_size=self.inference.batch_size, tta=self.tta, device=self.device)
        selected = (estimate[self._stem_index] for estimate in estimates)
        for block in exact_length(resample_blocks(selected, self.model.sample_rate, sample_rate), source):
            if self.two_stems:
                block = np.concatenate([block, source.take(block.shape[-1])[None] - block])
            yield block


class Tap:
    """Passes blocks through, counting their samples in `frames`; with `keep`, also queues them so that
    `take(n)` returns the oldest n samples not yet taken (the mixture that an output block came from)."""

    def __init__(self, blocks: Iterable[np.ndarray], keep: bool = False):
        self.blocks, self.keep = blocks, keep
        self.frames = 0
        self.queue = deque()

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.blocks:
            self.frames += block.shape[-1]
            if self.keep:
                self.queue.append(block)
            yield block

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            block = self.queue.popleft()
            parts.append(block[..., :n])
            if block.shape[-1] > n:
                self.queue.appendleft(block[..., n:])
            n -= parts[-1].shape[-1]
        return np.concatenate(parts, axis=-1)


def exact_length(blocks: Iterable[np.ndarray], source: Tap) -> Iterator[np.ndarray]:
    """Cut or zero-extend a resampled stream to the number of input samples (a resampling round trip may be off
    by a sample). Output is held back while it runs ahead of the input read so far."""
    held, emitted = None, 0
    for block in blocks:
        held = block if held is None else np.concatenate([held, block], axis=-1)
        ready = min(held.shape[-1], source.frames - emitted)
        if ready > 0:
            yield held[..., :ready]
            held, emitted = held[..., ready:], emitted + ready
    # the input has run out: `source.frames` is final
    if held is not None and source.frames > emitted:
        yield np.zeros((*held.shape[:-1], source.frames - emitted), np.float32)


class StemWriters:
    """The stem files of one track, written under temporary names and renamed together by `commit`. With
    `threads`, encoding runs in that many background threads (each file's blocks stay in order)."""

    def __init__(self, paths: dict[str, Path], sample_rate: int, channels: int, file_format: str,
                 bit_depth: Optional[str], threads: int = 0, bitrate: Optional[int] = None):
        self.pools, self.pending, self.writers = [], deque(), {}
        try:
            for name, path in paths.items():
                self.writers[name] = AudioWriter(path, sample_rate, channels, file_format, bit_depth, bitrate)
        except BaseException:
            self.discard()
            raise
        self.pools = [ThreadPoolExecutor(1) for _ in range(min(threads, len(self.writers)))]

    def write(self, block: np.ndarray) -> None:
        """Append one (stems, channels, n) block."""
        for index, (writer, stem) in enumerate(zip(self.writers.values(), block)):
            if self.pools:
                self.pending.append(self.pools[index % len(self.pools)].submit(writer.write, stem))
            else:
                writer.write(stem)
        while len(self.pending) > 4 * len(self.writers):  # bounded: encoding may lag inference only a little
            self.pending.popleft().result()

    def commit(self) -> dict[str, Path]:
        while self.pending:
            self.pending.popleft().result()
        self._stop_threads()
        return {name: writer.commit() for name, writer in self.writers.items()}

    def discard(self) -> None:
        self._stop_threads()
        for writer in self.writers.values():
            writer.discard()

    def _stop_threads(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True)


def prefetched(blocks: Iterable[np.ndarray], depth: int = 4) -> Iterator[np.ndarray]:
    """Iterate `blocks` in a background thread, up to `depth` blocks ahead, so decoding overlaps inference."""
    queue: Queue = Queue(depth)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return
            except Full:
                continue

    def produce() -> None:
        try:
            for block in blocks:
                put(("block", block))
                if stop.is_set():
                    return
            put(("end", None))
        except BaseException as error:  # handed to the consuming thread, which raises it
            put(("error", error))

    thread = threading.Thread(target=produce, name="bsmamba2-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def render_filename(template: str, **fields: str) -> Path:
    """The template filled in, as a relative path; empty parts (an empty {folder}) and "." are dropped."""
    parts = template.format(**fields).split("/")
    return Path(*[part for part in parts if part not in ("", ".")])


def check_filename_template(template: str) -> None:
    """A relative path with only the FILENAME_FIELDS."""
    try:
        example = Path(template.format(**{field: field for field in FILENAME_FIELDS}))
    except (KeyError, IndexError, ValueError) as error:
        raise BSMamba2Error(f"filename {template!r}: bad template ({error}); the fields are "
                            + ", ".join("{%s}" % field for field in FILENAME_FIELDS)) from None
    _check(not example.is_absolute() and ".." not in example.parts and example.name,
           f"filename {template!r}: must be a relative path inside the output folder")


def _check(condition, message: str) -> None:
    if not condition:
        raise BSMamba2Error(message)
