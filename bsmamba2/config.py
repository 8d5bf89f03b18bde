"""Typed, validated configuration: YAML files and `--set section.key=value` overrides.

A config has five sections (`audio`, `model`, `training`, `data`, `inference`), each a dataclass. Loading
checks every key against the dataclass: an unknown key, a wrong type or an impossible value raises
`BSMamba2Error` naming the key and the file. The resolved config travels inside every checkpoint as a plain
dict (`Config.to_dict()`), so a checkpoint loads without its YAML.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import BSMamba2Error
from .files import is_plain_name

# The paper's 62 bands over the 1025 bins of a 2048-point STFT ("Mamba2 Meets Silence", the band-split layout of
# BS-RoFormer): narrow bands at low frequencies, where the voice and most pitches live, wide ones above.
PAPER_BAND_WIDTHS = [2] * 24 + [4] * 12 + [12] * 8 + [24] * 8 + [48] * 8 + [128, 129]

# The paper's 14 MUSDB18-HQ validation tracks (taken out of the 100 training tracks).
MUSDB18_VALID_TRACKS = [
    "Actions - One Minute Smile", "Clara Berry And Wooldog - Waltz For My Victims",
    "Johnny Lokke - Promises & Lies", "Patrick Talbot - A Reason To Leave", "Triviul - Angelsaint",
    "Alexander Ross - Goodbye Bolero", "Fergessen - Nos Palpitants", "Leaf - Summerghost",
    "Skelpolu - Human Mistakes", "Young Griffo - Pennies", "ANiMAL - Rockshow",
    "James May - On The Line", "Meaxic - Take A Step", "Traffic Experiment - Sirens",
]

# The implementations of Mamba2's scan and causal conv (bsmamba2.ops.backends); `auto` picks one per device.
SCAN_BACKENDS = ("torch", "torch+compile", "cuda", "triton", "reference")
# What load_model(quantize=...) and --quantize accept (bsmamba2.quantize).
QUANTIZE_MODES = ("int8",)

# The largest model a config may describe, in parameters (4 GB of float32 weights; the paper's has 48 M): a
# checkpoint's stored config is data too, and one asking for more would fill the memory before anything else
# could refuse it. The variable raises the limit for those who mean it.
MAX_PARAMETERS_ENV = "BSMAMBA2_MAX_PARAMETERS"
DEFAULT_MAX_PARAMETERS = 1_000_000_000


@dataclass
class AudioConfig:
    sample_rate: int = 44100
    channels: int = 2
    n_fft: int = 2048
    hop_length: int = 441

    def validate(self) -> None:
        _require(self.sample_rate > 0, "audio.sample_rate", "must be positive")
        _require(self.channels in (1, 2), "audio.channels", "must be 1 or 2")
        _require(self.n_fft >= 16 and self.n_fft % 2 == 0, "audio.n_fft", "must be an even number >= 16")
        _require(0 < self.hop_length <= self.n_fft, "audio.hop_length", "must be in (0, n_fft]")


@dataclass
class ModelConfig:
    stems: list[str] = field(default_factory=lambda: ["vocals"])
    dim: int = 256
    depth: int = 6
    band_widths: list[int] = field(default_factory=lambda: list(PAPER_BAND_WIDTHS))
    mask_hidden_factor: int = 4
    # Mamba2 mixer (mamba_ssm's Mamba2 arguments; scan_chunk_size is its chunk_size)
    d_state: int = 128
    expand: int = 4
    headdim: int = 64
    ngroups: int = 1
    d_conv: int = 4
    scan_chunk_size: int = 128
    scan_backend: str = "auto"
    gradient_checkpointing: bool = False

    def validate(self, audio: AudioConfig) -> None:
        _require(len(self.stems) > 0 and len(set(self.stems)) == len(self.stems), "model.stems",
                 "must be a non-empty list of distinct names")
        _require_plain_names(self.stems, "model.stems")
        for key in ("dim", "depth", "mask_hidden_factor", "d_state", "expand", "headdim", "ngroups",
                    "scan_chunk_size"):
            _require(getattr(self, key) > 0, f"model.{key}", "must be positive")
        bins = audio.n_fft // 2 + 1
        _require(all(w > 0 for w in self.band_widths) and sum(self.band_widths) == bins, "model.band_widths",
                 f"must be positive and sum to n_fft/2+1 = {bins} (they sum to {sum(self.band_widths)})")
        d_inner = self.expand * self.dim
        _require(d_inner % self.headdim == 0, "model.headdim",
                 f"must divide d_inner = expand*dim = {d_inner}")
        _require((d_inner // self.headdim) % self.ngroups == 0, "model.ngroups",
                 f"must divide the number of heads ({d_inner // self.headdim})")
        _require(2 <= self.d_conv <= 4, "model.d_conv", "must be 2, 3 or 4 (the causal-conv1d kernel's range)")
        _require(self.scan_backend in ("auto",) + SCAN_BACKENDS, "model.scan_backend",
                 f"must be auto, {', '.join(SCAN_BACKENDS[:-1])} or {SCAN_BACKENDS[-1]}")
        count, limit = self.parameter_count(audio), max_parameters()
        _require(count <= limit, "model", f"would have {count:,} parameters (dim {self.dim}, depth {self.depth}), "
                 f"above the limit of {limit:,} (set {MAX_PARAMETERS_ENV} to a larger number to build it anyway)")

    def parameter_count(self, audio: AudioConfig) -> int:
        """The parameters of the network this section describes (`models/bs_mamba2.py`; a test checks that they
        agree), counted without building it."""
        dim, d_inner = self.dim, self.expand * self.dim
        heads, conv = d_inner // self.headdim, d_inner + 2 * self.ngroups * self.d_state
        mamba = (dim * (d_inner + conv + heads)   # in_proj: z, xBC and dt
                 + conv * (self.d_conv + 1)      # depthwise conv1d with its bias
                 + 3 * heads + d_inner           # dt_bias, A_log, D; the gated norm
                 + d_inner * dim)                # out_proj
        bidirectional = 2 * (dim + mamba) + 2 * dim * dim + dim  # two pre-norm branches, ConvTranspose1d(2·dim, dim)
        sizes = [2 * audio.channels * width for width in self.band_widths]
        hidden = dim * self.mask_hidden_factor
        band_split = sum(size + size * dim + dim for size in sizes)  # RMSNorm, Linear
        masks = sum(dim * hidden + hidden + hidden * 2 * size + 2 * size for size in sizes)  # Linear, Linear
        return band_split + self.depth * 2 * bidirectional + dim + len(self.stems) * masks


@dataclass
class LossConfig:
    waveform_weight: float = 10.0
    stft_weight: float = 1.0
    stft_windows: list[int] = field(default_factory=lambda: [4096, 2048, 1024, 512, 256])
    stft_hop: int = 147
    stft_min_n_fft: int = 2048
    sdr_weight: float = 0.0
    # The weight of a stem's loss, by name (the others weigh 1): e.g. the vocals of a four-stem model weighted up
    # while its shared network trains for the new stems too.
    stem_weights: dict[str, float] = field(default_factory=dict)

    def validate(self, stems: list[str]) -> None:
        _require(self.waveform_weight >= 0 and self.stft_weight >= 0 and self.sdr_weight >= 0, "training.loss",
                 "weights must be non-negative")
        for stem, weight in self.stem_weights.items():
            _require(stem in stems, "training.loss.stem_weights", f"{stem!r} is not one of model.stems {stems}")
            _require(weight >= 0, f"training.loss.stem_weights.{stem}", "must be non-negative")
        _require(any(self.stem_weights.get(stem, 1.0) > 0 for stem in stems), "training.loss.stem_weights",
                 "at least one stem must weigh more than 0")
        _require(all(w > 0 for w in self.stft_windows), "training.loss.stft_windows", "must be positive")
        _require(self.stft_hop > 0, "training.loss.stft_hop", "must be positive")


@dataclass
class TrainingConfig:
    max_steps: int = 1_000_000
    batch_size: int = 5
    grad_accum_steps: int = 6
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "none"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_steps: int = 0  # linear_tail: constant lr, then a linear decay to min_lr_ratio over the last decay_steps
    plateau_factor: float = 0.5  # plateau: lr × factor after `plateau_patience` validations without a new best
    plateau_patience: int = 3
    grad_clip: float = 3.0
    precision: str = "auto"
    device: str = "auto"
    ema_decay: float = 0.999
    seed: int = 42
    num_workers: int = 4
    log_every: int = 10
    validate_every: int = 1000
    checkpoint_every: int = 500
    keep_last: int = 3
    max_nonfinite_steps: int = 20
    # Modules (parameter-name prefixes) held at their starting (--init) values, e.g. a trained network and its
    # stems' mask estimators while new stems' estimators learn on top (scripts/grow_model.py --stems): those stems
    # separate exactly as before, and the step skips the frozen part's backward.
    freeze: list[str] = field(default_factory=list)
    # A multiple of `lr` for the modules (parameter-name prefixes) named, the longest prefix deciding: e.g. a
    # trained network at a tenth of the rate of the new stems' mask estimators.
    lr_scales: dict[str, float] = field(default_factory=dict)
    # Distillation: the stems in `teacher_stems` learn the estimates of the `teacher` checkpoint on the same
    # mixtures instead of the true stems, e.g. a four-stem model's vocals held to the vocals model's while its
    # shared network trains for the new stems too.
    teacher: str = ""
    teacher_stems: list[str] = field(default_factory=list)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self, model: ModelConfig) -> None:
        for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "validate_every",
                    "checkpoint_every", "keep_last", "max_nonfinite_steps"):
            _require(getattr(self, key) > 0, f"training.{key}", "must be positive")
        _require(self.lr > 0, "training.lr", "must be positive")
        _require(self.weight_decay >= 0, "training.weight_decay", "must be non-negative")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "training.betas",
                 "must be two numbers in [0, 1)")
        _require(self.scheduler in ("none", "cosine", "plateau", "linear_tail"), "training.scheduler",
                 "must be none, cosine, plateau or linear_tail")
        _require(0 <= self.decay_steps <= self.max_steps - self.warmup_steps, "training.decay_steps",
                 "must be in [0, max_steps − warmup_steps]")
        _require(self.warmup_steps >= 0, "training.warmup_steps", "must be non-negative")
        _require(0 <= self.min_lr_ratio <= 1, "training.min_lr_ratio", "must be in [0, 1]")
        _require(0 < self.plateau_factor < 1, "training.plateau_factor", "must be in (0, 1)")
        _require(self.plateau_patience > 0, "training.plateau_patience", "must be positive")
        _require(self.grad_clip >= 0, "training.grad_clip", "must be non-negative (0 disables clipping)")
        _require(self.precision in ("auto", "fp32", "bf16", "fp16"), "training.precision",
                 "must be auto, fp32, bf16 or fp16")
        _require(self.device in ("auto", "cpu", "cuda", "mps"), "training.device", "must be auto, cpu, cuda or mps")
        _require(0 <= self.ema_decay < 1, "training.ema_decay", "must be in [0, 1) (0 disables EMA)")
        _require(self.num_workers >= 0, "training.num_workers", "must be non-negative")
        _require(all(scale > 0 for scale in self.lr_scales.values()), "training.lr_scales", "must be positive")
        _require(bool(self.teacher) == bool(self.teacher_stems), "training.teacher_stems",
                 "name the stems a teacher is given for, and give a teacher for them")
        for stem in self.teacher_stems:
            _require(stem in model.stems, "training.teacher_stems", f"{stem!r} is not one of model.stems {model.stems}")
        self.loss.validate(model.stems)


@dataclass
class DataConfig:
    root: Optional[str] = None
    train_subset: str = "train"
    valid_subset: str = "train"
    valid_tracks: list[str] = field(default_factory=lambda: list(MUSDB18_VALID_TRACKS))
    segment_seconds: float = 8.0
    valid_segment_seconds: float = 0.0
    # The stems summed into a training mixture; the model's stems (the targets) must be among them.
    sources: list[str] = field(default_factory=lambda: ["vocals", "drums", "bass", "other"])
    gain_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    # Each stem's gain drawn uniformly in dB instead (null: gain_range); wide ranges teach every vocal level.
    gain_db_range: Optional[list[float]] = None
    silence_prob: float = 0.1
    solo_prob: float = 0.0  # an example keeps only one random stem (a track that is nearly all one stem)
    # With probability level_over_rest_prob, one random model stem is set this many dB (uniform) over the rest of
    # the mixture, as speech enhancement draws its SNRs: every vocal level is seen, whatever the songs' own mixing.
    level_over_rest_db: Optional[list[float]] = None
    level_over_rest_prob: float = 1.0
    mix_different_tracks: bool = True
    min_activity_db: Optional[float] = None  # redraw a stem's segment while its RMS (dBFS) is below this
    channel_swap: bool = False
    polarity_flip: bool = False
    eq_db: float = 0.0  # each stem through a random smooth EQ within ±eq_db dB (0 = off)
    repitch_semitones: float = 0.0  # each stem sped up or slowed down (pitch and tempo) within ± this (0 = off)
    # {stem: [low, high]}: those stems repitched within their own range instead, e.g. voices lower than the songs'
    stem_repitch_semitones: dict[str, list[float]] = field(default_factory=dict)

    def validate(self, model: ModelConfig) -> None:
        _require(self.segment_seconds > 0, "data.segment_seconds", "must be positive")
        _require(self.valid_segment_seconds >= 0, "data.valid_segment_seconds",
                 "must be non-negative (0 = whole tracks)")
        _require(len(self.sources) > 0 and len(set(self.sources)) == len(self.sources)
                 and "mixture" not in self.sources, "data.sources",
                 "must be a non-empty list of distinct stem names (not 'mixture')")
        _require_plain_names(self.sources, "data.sources")
        missing = [stem for stem in model.stems if stem not in self.sources]
        _require(not missing, "data.sources", f"must include every model stem (missing: {', '.join(missing)})")
        _require(len(self.gain_range) == 2 and 0 <= self.gain_range[0] <= self.gain_range[1], "data.gain_range",
                 "must be [low, high] with 0 <= low <= high")
        _require(self.gain_db_range is None or (len(self.gain_db_range) == 2
                                                  and self.gain_db_range[0] <= self.gain_db_range[1]),
                 "data.gain_db_range", "must be [low, high] in dB with low <= high, or null")
        _require(0 <= self.silence_prob < 1, "data.silence_prob", "must be in [0, 1)")
        _require(0 <= self.solo_prob <= 1, "data.solo_prob", "must be in [0, 1]")
        _require(self.level_over_rest_db is None or (len(self.level_over_rest_db) == 2
                                                     and self.level_over_rest_db[0] <= self.level_over_rest_db[1]),
                 "data.level_over_rest_db", "must be [low, high] in dB with low <= high, or null")
        _require(0 <= self.level_over_rest_prob <= 1, "data.level_over_rest_prob", "must be in [0, 1]")
        _require(0 <= self.repitch_semitones <= 12, "data.repitch_semitones", "must be in [0, 12]")
        for stem, semitones in self.stem_repitch_semitones.items():
            _require(stem in self.sources, "data.stem_repitch_semitones", f"{stem!r} is not one of data.sources")
            _require(len(semitones) == 2 and -12 <= semitones[0] <= semitones[1] <= 12,
                     "data.stem_repitch_semitones", f"{stem}: must be [low, high] with -12 <= low <= high <= 12")
        _require(not self.stem_repitch_semitones or self.mix_different_tracks, "data.stem_repitch_semitones",
                 "needs data.mix_different_tracks (the stems of one song share one speed)")
        _require(self.eq_db >= 0, "data.eq_db", "must be a non-negative gain in dB (0 = off)")
        _require(self.min_activity_db is None or self.min_activity_db < 0, "data.min_activity_db",
                 "must be a negative level in dBFS (RMS of a stem's segment), or null to keep every segment")


@dataclass
class InferenceConfig:
    chunk_seconds: float = 8.0
    overlap: float = 0.25
    batch_size: int = 4

    def validate(self) -> None:
        _require(self.chunk_seconds > 0, "inference.chunk_seconds", "must be positive")
        _require(0 <= self.overlap < 1, "inference.overlap", "must be in [0, 1)")
        _require(self.batch_size > 0, "inference.batch_size", "must be positive")


@dataclass
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> "Config":
        self.audio.validate()
        self.model.validate(self.audio)
        self.training.validate(self.model)
        self.data.validate(self.model)
        self.inference.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "<dict>") -> "Config":
        try:
            return _build(cls, values, "").validate()
        except _ConfigValueError as error:
            raise BSMamba2Error(f"{source}: {error}") from None


# Configs shipped inside the package, so that a registry entry can name one after a non-editable install.
PACKAGED_CONFIGS = Path(__file__).with_name("configs")


def packaged_config_names() -> list[str]:
    return sorted(path.stem for path in PACKAGED_CONFIGS.glob("*.yaml"))


def config_path(name_or_path: Union[str, Path]) -> Path:
    """A YAML file's path, or a packaged config's name (`bsmamba2_vocals`) resolved to its file."""
    path = Path(name_or_path)
    if path.exists():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.name}.yaml"
    if str(name_or_path) == path.name and not path.suffix and packaged.is_file():
        return packaged
    raise BSMamba2Error(f"cannot read config {name_or_path}: no such file or packaged config "
                        f"(packaged: {', '.join(packaged_config_names())})")


def load_config(path: Union[str, Path, None] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config, given by path or packaged name (or the defaults when `path` is None), and apply
    `section.key=value` overrides."""
    values: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = config_path(path).read_text()
        except OSError as error:
            raise BSMamba2Error(f"cannot read config {path}: {error.strerror or error}") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise BSMamba2Error(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise BSMamba2Error(f"{path}: a config must be a mapping of sections")
    for override in overrides or []:
        apply_override(values, override)
        if source == "<defaults>":
            source = "--set"
    return Config.from_dict(values, source)


def apply_override(values: dict, override: str) -> None:
    """Apply one `section.key=value` (the value is parsed as YAML: `1e-4`, `[a, b]`, `true`)."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted.strip():
        raise BSMamba2Error(f"--set {override!r}: expected section.key=value")
    keys = dotted.strip().split(".")
    schema = Config  # the key is checked here, so that a typo is blamed on --set rather than on the YAML file
    for depth, key in enumerate(keys):
        if not dataclasses.is_dataclass(schema):
            raise BSMamba2Error(f"--set {override!r}: {'.'.join(keys[:depth])} is not a section")
        names = [f.name for f in dataclasses.fields(schema)]
        if key not in names:
            raise BSMamba2Error(f"--set {override!r}: {_unknown_key('.'.join(keys[:depth + 1]), names)}")
        schema = typing.get_type_hints(schema)[key]
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise BSMamba2Error(f"--set {override!r}: {key} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise BSMamba2Error(f"--set {override!r}: cannot parse the value") from None


class _ConfigValueError(ValueError):
    pass


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _ConfigValueError(f"{key}: {message}")


def _require_plain_names(names: list[str], key: str) -> None:
    """Stem names become file names (`<stem>.wav`): one that is a path would write outside the output folder."""
    for name in names:
        _require(is_plain_name(name), key, f"{name!r} is not a plain name (a stem names files: no / or \\, drive, "
                 "control character, nor only dots)")


def max_parameters() -> int:
    """The limit on a model's size: BSMAMBA2_MAX_PARAMETERS, else DEFAULT_MAX_PARAMETERS."""
    value = os.environ.get(MAX_PARAMETERS_ENV, "")
    if not value:
        return DEFAULT_MAX_PARAMETERS
    if not value.isdigit():
        raise BSMamba2Error(f"{MAX_PARAMETERS_ENV}={value!r}: expected a number of parameters, such as 5000000000")
    return int(value)


def _build(cls, values: Any, prefix: str):
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    where = prefix.rstrip(".") or "config"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise _ConfigValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - names))  # a checkpoint's stored config may have keys of any type
    if unknown:
        raise _ConfigValueError(_unknown_key(prefix + unknown[0], names))
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def _unknown_key(dotted: str, names) -> str:
    """`unknown key training.lrr (did you mean training.lr?; known: …)`."""
    section, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, names, n=1)
    guess = f"did you mean {section + '.' if section else ''}{close[0]}?; " if close else ""
    return f"unknown key {dotted} ({guess}known: {', '.join(sorted(names))})"


def _convert(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise _ConfigValueError(f"{key}: expected a mapping, got {value!r}")
        return {_convert(args[0], name, key): _convert(args[1], item, f"{key}.{name}") for name, item in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _ConfigValueError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise _ConfigValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _ConfigValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _ConfigValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _ConfigValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")
