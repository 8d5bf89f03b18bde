"""Reading and writing checkpoints, building models, and loading the published BSMamba2 checkpoints.

Our checkpoints hold at least `config` (the resolved Config as a dict) and `model` (a state dict), and, from
training, `ema` (preferred for inference when present): a torch.save dict, or a .safetensors file with the config
as JSON in its metadata. The published checkpoints (the authors' Lightning `sota_model.ckpt`, Music-Source-
Separation-Training's `bs_mamba2_vocals.ckpt`) hold the same parameter names, possibly nested under `state_dict` /
`model` / `ema`-like keys and prefixed with `model.` / `module.`; without a stored config they get the paper vocals
config.

A bag of models (`bsmamba2.models.bag`) is a torch.save dict of `stems` (the bag's, in order), `members`, a list
of such checkpoints, each a `config` and a `model`, and `sharing_members` (absent: 0; bags saved before it have
`last_shares_rest`, true for 1).

Checkpoints are data: nothing in one is ever run, and what one makes us allocate is bounded by its size. torch
files are read by a restricted unpickler that rebuilds tensors, containers and plain values and turns every other
object (Lightning's hyper-parameters and callbacks, or worse) into an inert `Placeholder`; what it returns is then
rebuilt of plain dicts, lists and tensors, so that no method a pickle could have set is ever called.
"""
from __future__ import annotations

import codecs
import collections
import copy
import functools
import io
import json
import logging
import pickle
import pickletools
import types
import zipfile
from pathlib import Path
from typing import Optional, Union

import safetensors
import safetensors.torch
import torch

from . import __version__
from .config import Config, load_config
from .errors import BSMamba2Error
from .files import atomic_write
from .models.bag import BagOfModels
from .models.bs_mamba2 import BSMamba2
from .quantize import check_quantize, quantize_model
from .runtime import setup_process

log = logging.getLogger("bsmamba2")

# Every BSMamba2 state dict has exactly one of these; what precedes it in a key is the nesting prefix.
ANCHOR_KEY = "final_norm.gamma"

# The metadata of our .safetensors checkpoints: the config (JSON of Config.to_dict()) and the writing version.
CONFIG_METADATA = "bsmamba2.config"
VERSION_METADATA = "bsmamba2.version"

# How deep containers may nest in a torch checkpoint (Lightning's nest a few levels): deeper, or a loop, is refused.
MAX_NESTING = 100

# The pickles of a torch file in the format before torch 1.6: magic number, protocol, system information, the
# object itself, storage keys; the storages' bytes follow.
LEGACY_PICKLES = 5


def build_model(config: Config) -> BSMamba2:
    """An untrained model for `config` (in train mode); `model.config` keeps the config."""
    model = BSMamba2(config.model, config.audio)
    model.config = config
    return model


def keep_stems(model: BSMamba2, stems: list[str]) -> BSMamba2:
    """A copy of `model` with the mask estimators of `stems` only, in that order (the network before them kept)."""
    missing = [stem for stem in stems if stem not in model.stems]
    if missing:
        raise BSMamba2Error(f"the model has no {', '.join(missing)} stem (its stems: {', '.join(model.stems)})")
    config = copy.deepcopy(model.config)
    config.model.stems = list(stems)
    # the training settings that name stems keep those that are left
    config.training.loss.stem_weights = {stem: weight for stem, weight in config.training.loss.stem_weights.items()
                                         if stem in stems}
    config.training.teacher_stems = [stem for stem in config.training.teacher_stems if stem in stems]
    config.training.teacher = config.training.teacher if config.training.teacher_stems else ""
    kept = build_model(config.validate())
    kept.load_state_dict({moved_estimator_name(name, model.stems, stems): tensor
                          for name, tensor in model.state_dict().items()
                          if not name.startswith("mask_estimators.") or model.stems[int(name.split(".")[1])] in stems})
    return kept.train(model.training)


def moved_estimator_name(name: str, old_stems: list, new_stems: list) -> str:
    """`mask_estimators.I.rest` → `mask_estimators.J.rest`, J the place in `new_stems` of stem I of `old_stems`;
    other names unchanged."""
    prefix, _, rest = name.partition(".")
    if prefix != "mask_estimators":
        return name
    index, _, rest = rest.partition(".")
    return f"mask_estimators.{new_stems.index(old_stems[int(index)])}.{rest}"


def load_model(checkpoint: Union[str, Path, None] = None, config: Union[Config, str, Path, None] = None,
               device: Union[str, torch.device] = "cpu",
               quantize: Optional[str] = None) -> Union[BSMamba2, BagOfModels]:
    """A model in eval mode from a checkpoint (ours or a published one: torch, Lightning or safetensors, or a bag of
    models); `config` overrides the stored one. quantize="int8": the projections run in int8 (CPU only;
    `bsmamba2.quantize`).

    Without `checkpoint`, the bundled default model. On the CPU this sets up the process as the commands do
    (`runtime.setup_process`: glibc keeps freed memory; BSMAMBA2_KEEP_FREED_MEMORY=0 opts out).
    """
    device = torch.device(device)
    check_quantize(quantize, device)
    if device.type == "cpu":
        setup_process()
    if checkpoint is None:
        from .pretrained import default_checkpoint
        checkpoint = default_checkpoint()
    payload = read_checkpoint(checkpoint)
    if "members" in payload:
        if config is not None:
            raise BSMamba2Error(f"checkpoint {checkpoint} is a bag of models: its members keep their own configs")
        model = _load_bag(payload, checkpoint)
    else:
        if config is not None:
            config = config if isinstance(config, Config) else load_config(config)
        elif isinstance(payload.get("config"), dict):
            config = Config.from_dict(payload["config"], source=f"config stored in {checkpoint}")
        else:
            config = Config().validate()  # the defaults are the published vocals checkpoints' configuration
        model = build_model(config)
        model.load_state_dict(find_state_dict(payload, model, checkpoint))
    return quantize_model(model.to(device).eval(), quantize, device)


def _load_bag(payload: dict, source) -> BagOfModels:
    members, stems = payload["members"], payload.get("stems")
    if not isinstance(members, list) or not members or not all(
            isinstance(member, dict) and isinstance(member.get("config"), dict) for member in members):
        raise BSMamba2Error(f"checkpoint {source}: a bag's members must each hold a config and weights")
    if not isinstance(stems, list) or not all(isinstance(stem, str) for stem in stems):
        raise BSMamba2Error(f"checkpoint {source}: a bag must list its stems")
    sharing_members = payload.get("sharing_members", int(payload.get("last_shares_rest", False) is True))
    if not isinstance(sharing_members, int) or isinstance(sharing_members, bool):
        raise BSMamba2Error(f"checkpoint {source}: a bag's sharing_members must be a whole number")
    models = []
    for number, member in enumerate(members):
        model = build_model(Config.from_dict(member["config"], source=f"member {number} of {source}"))
        model.load_state_dict(find_state_dict(member, model, f"{source} (member {number})"))
        models.append(model)
    try:
        return BagOfModels(models, stems, sharing_members)
    except BSMamba2Error as error:
        raise BSMamba2Error(f"checkpoint {source}: {error}") from None


def find_state_dict(payload: dict, model: torch.nn.Module, source) -> dict:
    """The model's weights inside a checkpoint, checked name by name and shape by shape against `model`."""
    candidates = _weight_sets(payload)
    if not candidates:
        raise BSMamba2Error(f"checkpoint {source}: no BSMamba2 weights found (no '{ANCHOR_KEY}' tensor)")
    # EMA weights are the better ones wherever a checkpoint holds both.
    candidates.sort(key=lambda named: "ema" not in named[0].lower())
    expected = model.state_dict()
    problems = []
    for name, weights in candidates:
        problems = _mismatches(weights, expected)
        if not problems:
            return weights
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    raise BSMamba2Error(f"checkpoint {source} does not match the model config: {shown}")


def _weight_sets(payload, path: str = "", depth: int = 0) -> list:
    """All (where, state dict) pairs found in nested dicts, with any key prefix before the anchor removed."""
    found = []
    if not isinstance(payload, dict) or depth > 3:
        return found
    prefixes = [key[: -len(ANCHOR_KEY)] for key in payload if isinstance(key, str) and key.endswith(ANCHOR_KEY)
                and isinstance(payload[key], torch.Tensor)]
    for prefix in prefixes:
        weights = {key[len(prefix):]: value for key, value in payload.items()
                   if isinstance(key, str) and key.startswith(prefix) and isinstance(value, torch.Tensor)}
        found.append((path + prefix, weights))
    for key, value in payload.items():
        if isinstance(value, dict):
            found += _weight_sets(value, f"{path}{key}/", depth + 1)
    return found


def _mismatches(weights: dict, expected: dict) -> list:
    problems = [f"missing {key}" for key in expected if key not in weights]
    problems += [f"unexpected {key}" for key in weights if key not in expected]
    problems += [f"{key} has shape {tuple(weights[key].shape)}, the config wants {tuple(value.shape)}"
                 for key, value in expected.items() if key in weights and weights[key].shape != value.shape]
    return problems


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The dict inside a PyTorch, Lightning or safetensors checkpoint, on the CPU; nothing in the file is run, and
    reading it takes at most about twice its size in memory.

    Errors (missing, unreadable, refused, not a dict) are one line.
    """
    path = Path(path)
    if not path.is_file():
        raise BSMamba2Error(f"checkpoint {path}: no such file")
    try:
        kind = _file_kind(path)
    except OSError as error:
        raise BSMamba2Error(f"checkpoint {path}: cannot read it ({error.strerror or error})") from None
    if kind == "safetensors":
        payload = _read_safetensors(path)
    elif kind:
        payload = _plain(_read_torch(path, kind), path)
    else:
        raise BSMamba2Error(f"checkpoint {path}: not a PyTorch, Lightning or safetensors checkpoint")
    if not isinstance(payload, dict):
        raise BSMamba2Error(f"checkpoint {path}: expected a dict of tensors, found {type(payload).__name__}")
    return payload


def _file_kind(path: Path) -> str:
    """From the first bytes: "zip" (torch.save since torch 1.6), "pickle" (older torch.save), "safetensors" (an
    8-byte little-endian header length, then the JSON header), or "" for anything else."""
    with path.open("rb") as file:
        head = file.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80"):  # the PROTO opcode that starts a pickle of protocol 2 or later
        return "pickle"
    if head[8:] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return "safetensors"
    return ""


def _read_torch(path: Path, kind: str):
    """torch.load through the restricted unpickler, once the file passed the checks that keep what loading it
    allocates to about twice its size. (torch's own `weights_only` loader is not used: it also builds
    `bytearray(N)` and nested codecs, gigabytes from a few bytes, and a pickle can steer any load to this one.)"""
    placeholders: dict = {}
    with path.open("rb") as file:  # a file, not a path: torch.load would choose safetensors by the name alone
        try:
            source = _checked(file, kind, path.stat().st_size)
        except BSMamba2Error as refusal:
            raise BSMamba2Error(f"checkpoint {path}: refused, {refusal}") from None
        except Exception as error:  # zipfile's or pickletools' word on a damaged file
            raise _unreadable(path, error) from None
        try:
            payload = torch.load(source, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE,
                                 placeholders=placeholders)
        except Exception as error:
            raise BSMamba2Error(f"checkpoint {path}: refused, {_NOT_INERT} ({_first_line(error)})") from None
    if placeholders:
        names = sorted(placeholders)
        log.warning("checkpoint %s holds objects other than tensors and plain values, kept as inert placeholders: "
                    "%s", path, ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else ""))
    return payload


_NOT_INERT = "it holds objects that cannot be loaded as inert data"


def _checked(file, kind: str, size: int):
    """What torch.load is to read, once checked; a reason to refuse the file is raised as BSMamba2Error."""
    if kind == "zip":
        archive = zipfile.ZipFile(file)
        entries = archive.infolist()
        records = {entry.filename.split("/", 1)[-1]: entry for entry in entries}  # names inside the top folder
        # With weights_only=False, torch.load hands a TorchScript archive to torch.jit.load, which runs its code.
        if "constants.pkl" in records:
            raise BSMamba2Error(f"{_NOT_INERT} (a TorchScript archive)")
        # torch.save stores each entry once, as it is; compressed entries, or entries sharing their bytes, would
        # unpack a small file into gigabytes.
        unpacked = sum(entry.file_size for entry in entries)
        if unpacked > size:
            raise BSMamba2Error(f"its zip entries unpack to {unpacked:,} bytes, more than the file's {size:,} "
                                "(compressed or overlapping entries, which torch.save never writes)")
        _check_pickles(io.BytesIO(archive.read(records["data.pkl"])), 1)
        file.seek(0)
        return file
    # The format before torch 1.6, from memory: given a file, torch.load would first try it as a tar archive,
    # whose loader extracts files.
    data = io.BytesIO(file.read())
    _check_pickles(data, LEGACY_PICKLES)
    data.seek(0)
    return data


def _check_pickles(file, count: int) -> None:
    """Refuse the EXT opcodes in the next `count` pickles of `file`: they take an object from copyreg's
    process-wide cache when an earlier load put it there, without asking find_class. torch.save never writes them."""
    for _ in range(count):
        if any(opcode.name.startswith("EXT") for opcode, _, _ in pickletools.genops(file)):
            raise BSMamba2Error(f"{_NOT_INERT} (a copyreg extension code)")


def _plain(payload, path: Path):
    """`payload` with its dicts, lists and tuples rebuilt as plain ones and its tensors as plain tensors, never
    calling a method of theirs: a pickle can give an OrderedDict or a tensor attributes of its choosing (BUILD
    setting `items` or `get` to an allowed callable), which later code would call. A container met again is
    rebuilt once, so that shared ones cost no more than the file holds."""
    built: dict = {}  # id of a loaded container → its rebuilt self

    def rebuild(value, depth: int):
        if id(value) in built:
            return built[id(value)]
        if depth > MAX_NESTING:
            raise BSMamba2Error(f"checkpoint {path}: refused, its containers nest deeper than {MAX_NESTING} levels "
                                "(or hold themselves)")
        if isinstance(value, dict):
            result = {key: rebuild(item, depth + 1) for key, item in dict.items(value)}
        elif type(value) in (list, tuple):
            result = type(value)(rebuild(item, depth + 1) for item in value)
        elif isinstance(value, torch.Tensor):
            result = torch.Tensor.detach(value)
        else:
            return value
        built[id(value)] = result
        return result

    return rebuild(payload, 0)


class Placeholder:
    """Stands in for an object of a class that a checkpoint names but that is never imported nor called.

    `name` is that class's dotted name; `args`, `kwargs`, `items` and `state` keep, as loaded data, what unpickling
    would have handed to it (constructor arguments, dict or list entries, `__setstate__` state).
    """
    name = "?"

    def __new__(cls, *args, **kwargs):  # pickle's REDUCE calls the class, NEWOBJ calls __new__: both end here
        self = super().__new__(cls)
        self.args, self.kwargs, self.items, self.state = args, kwargs, {}, None
        return self

    def __setitem__(self, key, value):  # SETITEM(S): the entries of a dict subclass
        self.items[key] = value

    def append(self, value):  # APPEND(S): the entries of a list subclass, numbered
        self.items[len(self.items)] = value

    def __setstate__(self, state):  # BUILD: kept, never applied
        self.state = state

    def __repr__(self):
        return f"<{self.name}, not loaded>"


def _latin1_bytes(text, encoding):
    """bytes as pickle protocol 2 (torch.save's) writes them, `_codecs.encode(text, "latin1")`: as long as the
    text. Other codecs are refused: nested, "hex" doubles what it is given each time."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}, not from latin-1 text")
    return codecs.encode(text, "latin1")


# The only globals a checkpoint may name (by the dotted name a pickle gives), each safe to call with anything a
# pickle can build (plain values, tensors, the entries here and placeholders), and making no more than it is
# given: `bytearray`, whose bytearray(N) makes N bytes of nothing, is a placeholder like any other class.
ALLOWED_GLOBALS = {
    # Containers and plain values: they only hold what they are given.
    "collections.OrderedDict": collections.OrderedDict,  # state dicts
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
    "_codecs.encode": _latin1_bytes,
    # Tensors: a view of a storage that torch's own loader read from the file (sizes checked against it).
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.Size": torch.Size,  # a tuple of ints
    "torch.device": torch.device,  # a name, such as "cuda:0"
    # dtypes are values (a dtype cannot be called).
    **{f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle's Unpickler with each global looked up in ALLOWED_GLOBALS; any other becomes a `Placeholder` class.

    Every opcode that calls something (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ) gets its callable from `find_class`
    (the EXT opcodes, which may not, are refused before loading), so nothing outside ALLOWED_GLOBALS runs:
    `os.system`, `builtins.getattr`, `copyreg._reconstructor` come back as placeholders, and calling a placeholder
    only records the arguments. BUILD (an object's `__setstate__`, else setting its attributes) reaches
    only placeholders (which keep the state), what the allowed globals built (tensors, dicts: data, which `_plain`
    rebuilds) and the globals themselves (read-only, or a fresh wrapper). torch.load looks storage names
    (`torch.FloatStorage`) up in its own table before calling `find_class`.
    """

    def __init__(self, file, *, placeholders: dict, **options):
        super().__init__(file, **options)
        self.placeholders = placeholders  # dotted name -> its Placeholder subclass, for the caller to report

    def find_class(self, module: str, name: str):
        dotted = f"{_PYTHON2_MODULES.get(module, module)}.{name}"
        if dotted in ALLOWED_GLOBALS:
            found = ALLOWED_GLOBALS[dotted]
            # BUILD can set attributes (even __defaults__) on any object on the stack: a Python function gets a
            # fresh wrapper, so that no load changes it. The types and builtins allowed are read-only.
            return functools.partial(found) if isinstance(found, types.FunctionType) else found
        if dotted not in self.placeholders:
            self.placeholders[dotted] = type(f"Placeholder({dotted})", (Placeholder,), {"name": dotted})
        return self.placeholders[dotted]


# Protocol 2 (torch.save's) writes the Python 2 name of the builtins module.
_PYTHON2_MODULES = {"__builtin__": "builtins"}

# All that torch.load(pickle_module=...) uses of a pickle module: its name, its Unpickler, and load (for the
# format before torch 1.6).
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="restricted_pickle", Unpickler=_RestrictedUnpickler,
    load=lambda file, **options: _RestrictedUnpickler(file, **options).load())


def _read_safetensors(path: Path) -> dict:
    """Our safetensors checkpoints hold the config as JSON in the metadata; without it, just the weights."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            weights = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # a damaged header or truncated data
        raise _unreadable(path, error, "safetensors") from None
    if CONFIG_METADATA not in metadata:
        return weights
    try:
        return {"config": json.loads(metadata[CONFIG_METADATA]), "model": weights}
    except (ValueError, RecursionError) as error:  # not JSON, or nested deeper than Python's parser goes
        raise BSMamba2Error(f"checkpoint {path}: its '{CONFIG_METADATA}' metadata is not JSON "
                            f"({_first_line(error)})") from None


def _unreadable(path: Path, error: Exception, file_format: str = "PyTorch") -> BSMamba2Error:
    return BSMamba2Error(f"checkpoint {path}: not a readable {file_format} checkpoint ({_first_line(error)})")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_save(obj, path: Union[str, Path]) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    with atomic_write(path) as file:
        torch.save(obj, file)


def save_model(model: Union[BSMamba2, BagOfModels], path: Union[str, Path], half: bool = False) -> None:
    """A checkpoint that `load_model` reads: the model's config and weights, as safetensors (the config as JSON in
    the metadata) when `path` ends in .safetensors, else as a torch.save dict (a bag of models: torch only).
    half=True stores floating-point weights as float16 (half the file; `load_model` computes in the model's own
    float32)."""
    safetensors_file = Path(path).suffix.lower() == ".safetensors"
    if isinstance(model, BagOfModels):
        if safetensors_file:
            raise BSMamba2Error(f"{path}: a bag of models is saved as a torch checkpoint (.ckpt), not .safetensors")
        atomic_save({"stems": model.stems, "sharing_members": model.sharing_members,
                     "members": [{"config": member.config.to_dict(), "model": _stored_weights(member, half)}
                                 for member in model.members]}, path)
        return
    config = model.config.to_dict()
    weights = _stored_weights(model, half)
    if not safetensors_file:
        atomic_save({"config": config, "model": weights}, path)
        return
    # safetensors refuses tensors that share storage or are not contiguous: a contiguous copy of each keeps
    # every name that load_state_dict expects, whatever views or tied weights a model has.
    weights = {name: tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
               for name, tensor in weights.items()}
    metadata = {"format": "pt", CONFIG_METADATA: json.dumps(config), VERSION_METADATA: __version__}
    with atomic_write(path) as file:
        file.write(safetensors.torch.save(weights, metadata))


def _stored_weights(model: BSMamba2, half: bool) -> dict:
    return {name: tensor.detach().cpu().half() if half and tensor.is_floating_point() else tensor
            for name, tensor in model.state_dict().items()}
