"""ONNX: the network between STFT and iSTFT as an .onnx file, and such a file run by onnxruntime.

    bsmamba2 export model.ckpt model.onnx                  # export_onnx
    bsmamba2 separate song.wav --checkpoint model.onnx     # OnnxModel in the PyTorch network's place

The file holds `BSMamba2.separate_spectrogram`: the mixture's STFT as real numbers in, the stems' STFTs out. STFT
and iSTFT stay outside, where every runtime has them (ONNX's own STFT takes no complex tensors, and torch.onnx
cannot translate the complex iSTFT). The number of frames is fixed at export, one inference chunk (the scan's loop
over its chunks unrolls into the graph); the batch is dynamic. The file's metadata_props say everything a program
needs to use it without this package (`export_metadata`), and hold the model's config for `OnnxModel`.

`OnnxModel` runs a file with onnxruntime behind the interface of the network that the chunked overlap-add and
`Separator` use, with the network's own STFT code (`through_spectrogram`), so every separation option behaves the
same and the stems differ from PyTorch's by float rounding only.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from . import __version__
from .apply import chunk_length
from .checkpoint import CONFIG_METADATA, VERSION_METADATA
from .config import Config
from .errors import BSMamba2Error
from .files import atomic_write
from .metrics import usdr
from .models.bs_mamba2 import BSMamba2, stft, through_spectrogram
from .models.mamba2 import Mamba2

INPUT, OUTPUT = "mixture_stft", "stems_stft"
INSTALL = 'pip install "bsmamba2[onnx]" (onnxruntime, onnx, onnxscript)'
# What onnxruntime's stems must reach against PyTorch's (as SDR, dB) before `export_onnx` writes a file.
MIN_AGREEMENT_DB = 60.0
OPSET = 20  # the ONNX operator set the export targets (onnxruntime ≥ 1.17 runs it)


def export_onnx(model: BSMamba2, path: Union[str, Path], chunk_seconds: Optional[float] = None) -> float:
    """Write the network of `model` (on the CPU) for chunks of `chunk_seconds` (default: its config's inference
    chunk) to `path`, once onnxruntime's output on chunks of noise agrees with PyTorch's; returns that agreement
    in dB."""
    for module in ("onnxscript", "onnxruntime"):  # the exporter; the check of its output
        _require(module, "exporting to ONNX")
    config = copy.deepcopy(model.config)
    if chunk_seconds is not None:
        config.inference.chunk_seconds = chunk_seconds
        config.validate()
    samples = chunk_length(config.inference.chunk_seconds, model.sample_rate)
    if samples < model.n_fft:
        raise BSMamba2Error(f"chunk {config.inference.chunk_seconds} s: shorter than one STFT window "
                            f"({model.n_fft} samples)")
    # noise chunks: two to export with, the first alone to check the dynamic batch (and little memory)
    mixture = torch.randn(2, model.audio_channels, samples, generator=torch.Generator().manual_seed(0))
    spec = stft(mixture, model.n_fft, model.hop_length, model.window)
    network = _SpectrogramNetwork(model).eval()
    mixers = [module for module in model.modules() if isinstance(module, Mamba2)]
    backends = [mixer.scan_backend for mixer in mixers]
    try:
        for mixer in mixers:  # the pure-PyTorch scan: the CUDA and Triton kernels do not export
            mixer.scan_backend = "torch"
        with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own workings, of no use to a user
            program = torch.onnx.export(network, (spec,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                                        custom_translation_table={torch.ops.aten.exp2.default: _exp2}, verbose=False)
            expected = network(spec[:1]).numpy()
    finally:
        for mixer, backend in zip(mixers, backends):
            mixer.scan_backend = backend
    proto, metadata = program.model_proto, export_metadata(config)
    proto.doc_string = "BSMamba2 between STFT and iSTFT: " + metadata["output"]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    serialized = proto.SerializeToString()
    session = _session(serialized, source=path)
    agreement = usdr(expected, session.run([OUTPUT], {INPUT: spec[:1].numpy()})[0])
    if not agreement >= MIN_AGREEMENT_DB:
        raise BSMamba2Error(f"ONNX export: onnxruntime's output agrees with PyTorch's to {agreement:.1f} dB only "
                            f"(at least {MIN_AGREEMENT_DB:.0f} dB expected); nothing written")
    with atomic_write(path) as file:
        file.write(serialized)
    return agreement


def _exp2(x):
    """aten.exp2 as Exp(x·ln 2): onnxruntime's Pow with base 2 is several times slower than its Exp (the scan
    takes all its decays as powers of 2)."""
    from onnxscript import opset20 as op

    return op.Exp(op.Mul(x, op.CastLike(op.Constant(value_float=math.log(2.0)), x)))


class _SpectrogramNetwork(torch.nn.Module):
    """`BSMamba2.separate_spectrogram` as a module's forward, the form the exporter takes."""

    def __init__(self, model: BSMamba2):
        super().__init__()
        self.model = model

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.model.separate_spectrogram(spec)


def export_metadata(config: Config) -> dict[str, str]:
    """The ONNX metadata_props of an export for `config` (its inference chunk fixes the number of frames)."""
    audio, inference = config.audio, config.inference
    samples = chunk_length(inference.chunk_seconds, audio.sample_rate)
    frames = max(samples, audio.n_fft) // audio.hop_length + 1
    freqs = audio.n_fft // 2 + 1
    return {
        CONFIG_METADATA: json.dumps(config.to_dict()),
        VERSION_METADATA: __version__,
        "sample_rate": str(audio.sample_rate),
        "channels": str(audio.channels),
        "stems": json.dumps(list(config.model.stems)),
        "n_fft": str(audio.n_fft),
        "hop_length": str(audio.hop_length),
        "window": "hann, periodic, length n_fft",
        "stft": "one-sided, centred (n_fft/2 samples reflected at each end), unnormalised; "
                "the iSTFT divides by the overlap-added squared window (torch.stft / torch.istft)",
        "chunk_samples": str(samples),
        "chunk_frames": str(frames),
        "overlap": str(inference.overlap),
        "batch_size": str(inference.batch_size),
        "input": f"{INPUT}: float32 (batch, {audio.channels} channels, {freqs} freqs, {frames} frames, 2 = real, "
                 f"imaginary), the STFT of chunk_samples samples of the mixture at sample_rate",
        "output": f"{OUTPUT}: float32 (batch, {len(config.model.stems)} stems, {audio.channels} channels, {freqs} "
                  f"freqs, {frames} frames, 2), the STFT of each stem in `stems` order; its iSTFT (same window and "
                  f"hop, length chunk_samples) is the stem",
        "chunking": "longer audio: chunks of chunk_samples, neighbours overlapping by round(overlap·chunk_samples) "
                    "samples, cross-faded with complementary raised-cosine ramps (bsmamba2/apply.py)",
    }


class OnnxModel:
    """A `bsmamba2 export` file run by onnxruntime (on the CPU), in the network's place: `config`, `stems`,
    `sample_rate`, `audio_channels`, and model(wave): (batch, channels, chunk_samples) → (batch, stems,
    channels, chunk_samples). `chunk_seconds`, when given, must be the chunk the file was exported for."""

    def __init__(self, path: Union[str, Path], chunk_seconds: Optional[float] = None):
        path = Path(path)
        if not path.is_file():
            raise BSMamba2Error(f"ONNX model {path}: no such file")
        self.session = _session(str(path), source=path)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if CONFIG_METADATA not in metadata or [i.name for i in self.session.get_inputs()] != [INPUT]:
            raise BSMamba2Error(f"ONNX model {path}: not a BSMamba2 export (`bsmamba2 export` makes one)")
        try:
            self.config = Config.from_dict(json.loads(metadata[CONFIG_METADATA]), source=f"metadata of {path}")
        except (ValueError, RecursionError) as error:  # not JSON, or nested deeper than Python's parser goes
            raise BSMamba2Error(f"ONNX model {path}: its '{CONFIG_METADATA}' metadata is unreadable ({error})")
        self.stems = list(self.config.model.stems)
        self.sample_rate, self.audio_channels = self.config.audio.sample_rate, self.config.audio.channels
        self.n_fft, self.hop_length = self.config.audio.n_fft, self.config.audio.hop_length
        self.window = torch.hann_window(self.n_fft)
        self.chunk_samples = chunk_length(self.config.inference.chunk_seconds, self.sample_rate)
        if chunk_seconds is not None and chunk_length(chunk_seconds, self.sample_rate) != self.chunk_samples:
            raise BSMamba2Error(f"chunk {chunk_seconds} s: {path} was exported for chunks of "
                                f"{self.config.inference.chunk_seconds} s (export it again with --chunk "
                                f"{chunk_seconds} for this length)")

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[1:] != (self.audio_channels, self.chunk_samples):
            raise BSMamba2Error(f"this ONNX model takes (batch, {self.audio_channels}, {self.chunk_samples}) "
                                f"chunks, not {tuple(wave.shape)}")
        stems = through_spectrogram(wave.cpu(), self.separate_spectrogram, self.n_fft, self.hop_length, self.window)
        return stems.to(wave.device)

    def separate_spectrogram(self, spec: torch.Tensor) -> torch.Tensor:
        """As `BSMamba2.separate_spectrogram`, through onnxruntime."""
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(spec.numpy())})[0])


@contextmanager
def _quiet_loggers(*names: str):
    """Only errors from these loggers inside the block (the exporter logs each graph rewrite it makes)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _session(model, source):
    """An onnxruntime session on the CPU with as many threads as PyTorch uses (`runtime.setup_process`), idle
    threads waiting as OpenMP's do, and memory taken as tensors need it."""
    onnxruntime = _require("onnxruntime", "running ONNX models")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # Idle threads sleep unless OpenMP's are told to spin (`runtime.prepare_openmp`): on a CPU shared with other
    # jobs, onnxruntime's spinning threads take the cores from the ones that work, as OpenMP's do.
    spin = os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    # No memory pattern (one block planned for all of a run's tensors): the unrolled graph's plan holds far more
    # than the tensors alive at any one time (docs/onnx.md).
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's input
    try:
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types, for a damaged or foreign file
        text = str(error).strip().splitlines()
        raise BSMamba2Error(f"ONNX model {source}: not a readable ONNX model ({text[0] if text else error!r})") \
            from None


def _require(module: str, purpose: str):
    """The module, or one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BSMamba2Error(f"{purpose} needs {module}: {INSTALL}") from None
