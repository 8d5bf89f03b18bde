"""Checkpoints are data: a pickle that would run code never does, nor one that would fill the memory or write
outside the output folder; Lightning, torch and safetensors files load."""
import builtins
import codecs
import collections
import copyreg
import io
import json
import logging
import os
import pathlib
import pickle
import random
import re
import shlex
import zipfile

import pytest
import safetensors
import safetensors.torch
import torch

from bsmamba2.checkpoint import Placeholder, build_model, load_model, read_checkpoint, save_model
from bsmamba2.cli import main
from bsmamba2.config import Config
from bsmamba2.errors import BSMamba2Error

from separation_fixtures import noise, tiny_config, write_audio

MARKER = "created-by-unpickling"


# Objects that create the file MARKER (in the current directory) when unpickled, each by another route.
class RunsShell:
    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(MARKER)}",)


class OpensFile:
    def __reduce__(self):
        return builtins.open, (MARKER, "w")


class TouchesPath:  # pathlib.Path.touch is pickled as builtins.getattr(pathlib.Path, "touch") below protocol 4
    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(MARKER),)


class Executes:
    def __reduce__(self):
        return builtins.exec, (f"open({MARKER!r}, 'w').close()",)


class WritesOnSetstate:  # BUILD (protocol 2+) or copyreg._reconstructor then BUILD (protocol 1)
    def __getstate__(self):
        return {"armed": True}  # pickle writes no BUILD for an empty state

    def __setstate__(self, state):
        pathlib.Path(MARKER).touch()


class WritesOnNew:  # NEWOBJ
    def __new__(cls, name=None, mode="w"):
        if name:
            open(name, mode).close()
        return super().__new__(cls)

    def __getnewargs__(self):
        return (MARKER,)


class WritesOnNewWithKeywords(WritesOnNew):  # NEWOBJ_EX; below protocol 4, functools.partial(cls.__new__, ...)
    def __getnewargs_ex__(self):
        return (MARKER,), {"mode": "w"}


# (object, pickle protocol, whether the load is refused rather than inert): a placeholder that a pickle then
# calls (getattr's result, a partial's) refuses the load; any other call of a placeholder only records arguments.
CASES = [(route, protocol, False) for route in (RunsShell, OpensFile, Executes, WritesOnSetstate, WritesOnNew)
         for protocol in (1, 2, 4) if (route, protocol) != (WritesOnNew, 1)]  # protocol 1 ignores __getnewargs__
CASES += [(TouchesPath, 2, True), (TouchesPath, 4, False), (WritesOnNewWithKeywords, 2, True),
          (WritesOnNewWithKeywords, 4, False)]


class AttributeDict(dict):
    """Like Lightning's hyper-parameter container: a dict subclass, here with an attribute besides its items."""


class Milestones(list):
    pass


class EarlyStopping:
    def __init__(self):
        self.patience, self.best = 3, torch.tensor(0.5)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def armed(evil, protocol: int = 2):
    """`evil` after checking that plain unpickling really creates the marker (so a test of it can fail)."""
    pickle.loads(pickle.dumps(evil, protocol=protocol))
    assert os.path.exists(MARKER), f"{type(evil).__name__} does not create the marker"
    os.remove(MARKER)
    return evil


def trained_weights(config):
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def lightning_checkpoint(model, **extra) -> dict:
    hyper_parameters = AttributeDict(lr=3e-4, milestones=Milestones([10, 20]))
    hyper_parameters.name = "vocals"
    return {"state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
            "hyper_parameters": hyper_parameters, "callbacks": {"EarlyStopping": EarlyStopping(), **extra},
            "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.1.0"}


def separates_like(loaded, model):
    wave = torch.randn(1, 2, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(loaded(wave), model(wave))


def torch_zip_with_pickle(data_pkl: bytes, path: pathlib.Path) -> pathlib.Path:
    """A torch.save zip whose data.pkl is `data_pkl`: hand-written opcodes in the format torch.load reads."""
    saved = io.BytesIO()
    torch.save({}, saved)
    source = zipfile.ZipFile(saved)
    with zipfile.ZipFile(path, "w") as target:
        for entry in source.infolist():
            target.writestr(entry, data_pkl if entry.filename.endswith("/data.pkl") else source.read(entry))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's weights-only attempt, about protocol 4
@pytest.mark.parametrize("route, protocol, refused", CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_malicious_object_beside_real_weights_never_runs(route, protocol, refused, caplog):
    config = tiny_config()
    model = trained_weights(config)
    torch.save(lightning_checkpoint(model, evil=armed(route(), protocol)), "evil.ckpt", pickle_protocol=protocol)
    try:
        loaded = load_model("evil.ckpt", config=config)
    except BSMamba2Error as error:
        loaded = str(error)
    assert not os.path.exists(MARKER)
    if refused:
        assert re.fullmatch(r"checkpoint evil.ckpt: refused, it holds objects that cannot be loaded as inert data "
                            r"\(.*not callable\)", loaded)
    else:
        assert separates_like(loaded, model)
        assert isinstance(read_checkpoint("evil.ckpt")["callbacks"]["evil"], Placeholder)
        assert "inert placeholders" in caplog.text


@pytest.mark.parametrize("route", [RunsShell, OpensFile, TouchesPath, Executes, WritesOnSetstate, WritesOnNew])
def test_malicious_pickle_alone_is_refused(route):
    evil = armed(route())
    pathlib.Path("plain.pkl").write_bytes(pickle.dumps({"model": evil}, protocol=2))
    torch.save(evil, "zipped.ckpt")
    for path in ("plain.pkl", "zipped.ckpt"):
        with pytest.raises(BSMamba2Error, match=f"checkpoint {path}: ") as error:
            read_checkpoint(path)
        assert "\n" not in str(error.value)
    assert not os.path.exists(MARKER)


COMMAND = shlex.quote(f"touch {MARKER}").encode()
HAND_WRITTEN = {  # protocol 0 text opcodes: GLOBAL + REDUCE, INST, and MARK + GLOBAL + OBJ, each in a dict
    "reduce": b"(dS'x'\ncos\nsystem\n(S" + COMMAND + b"\ntRs.",
    "inst": b"(dS'x'\n(S" + COMMAND + b"\nios\nsystem\ns.",
    "obj": b"(dS'x'\n(cos\nsystem\nS" + COMMAND + b"\nos.",
}


@pytest.mark.parametrize("opcodes", HAND_WRITTEN.values(), ids=HAND_WRITTEN.keys())
def test_hand_written_opcodes_that_call_os_system_are_inert(opcodes):
    pickle.loads(opcodes)
    assert os.path.exists(MARKER)
    os.remove(MARKER)
    payload = read_checkpoint(torch_zip_with_pickle(opcodes, pathlib.Path("raw.ckpt")))
    assert payload["x"].name == "os.system"
    assert not os.path.exists(MARKER)


def test_extension_codes_are_refused():
    """An EXT opcode takes its object from copyreg's cache, filled by any earlier plain unpickling in the process."""
    copyreg.add_extension(os.system.__module__, "system", 0xB5)
    try:
        data = pickle.dumps({"x": RunsShell()}, protocol=2)
        assert b"\x82\xb5" in data  # EXT1 0xB5 instead of a GLOBAL
        pickle.loads(data)
        assert os.path.exists(MARKER)
        os.remove(MARKER)
        with pytest.raises(BSMamba2Error, match=r"refused, .* \(a copyreg extension code\)$"):
            read_checkpoint(torch_zip_with_pickle(data, pathlib.Path("ext.ckpt")))
    finally:
        copyreg.remove_extension(os.system.__module__, "system", 0xB5)
    assert not os.path.exists(MARKER)


def test_an_allowed_function_cannot_be_changed_by_a_checkpoint():
    """BUILD sets attributes on whatever is on the stack: here the tensor-rebuilding function itself."""
    rebuild = torch._utils._rebuild_tensor_v2
    defaults = rebuild.__defaults__
    data = (b"\x80\x02}X\x01\x00\x00\x00x" + b"ctorch._utils\n_rebuild_tensor_v2\n"
            + b"N}X\x0c\x00\x00\x00__defaults__K\x07\x85s\x86bs.")  # BUILD (None, {"__defaults__": (7,)})
    try:
        pickle.loads(data)
        assert rebuild.__defaults__ == (7,)  # what a plain unpickler does
        rebuild.__defaults__ = defaults
        with pytest.raises(BSMamba2Error, match="refused"):  # BUILD reached a fresh wrapper, which rejects it
            read_checkpoint(torch_zip_with_pickle(data, pathlib.Path("build.ckpt")))
        assert rebuild.__defaults__ == defaults
    finally:
        rebuild.__defaults__ = defaults


def test_lightning_checkpoint_with_hyper_parameter_objects_loads_its_weights(caplog):
    config = tiny_config()
    model = trained_weights(config)
    torch.save(lightning_checkpoint(model), "lightning.ckpt")
    with caplog.at_level(logging.WARNING, logger="bsmamba2"):
        loaded = load_model("lightning.ckpt", config=config)
    assert separates_like(loaded, model)
    assert caplog.text.count("inert placeholders") == 1
    assert "test_checkpoint.AttributeDict" in caplog.text and "test_checkpoint.EarlyStopping" in caplog.text

    payload = read_checkpoint("lightning.ckpt")
    assert payload["epoch"] == 3 and payload["pytorch-lightning_version"] == "2.1.0"
    hyper_parameters = payload["hyper_parameters"]
    assert hyper_parameters.items.keys() == {"lr", "milestones"} and hyper_parameters.items["lr"] == 3e-4
    assert hyper_parameters.items["milestones"].items == {0: 10, 1: 20}
    assert hyper_parameters.state == {"name": "vocals"}
    callback = payload["callbacks"]["EarlyStopping"]
    assert callback.state["patience"] == 3 and torch.equal(callback.state["best"], torch.tensor(0.5))


def test_checkpoints_of_plain_values_load_without_a_warning(caplog):
    values = {"model": {"w": torch.arange(3.0)}, "size": torch.Size([2, 3]), "device": torch.device("cpu"),
              "dtype": torch.bfloat16, "bytes": b"\x00\xff", "set": {1, 2}, "complex": 1 + 2j}
    torch.save(values, "plain.ckpt")
    with caplog.at_level(logging.WARNING, logger="bsmamba2"):
        loaded = read_checkpoint("plain.ckpt")
    assert loaded.keys() == values.keys() and torch.equal(loaded["model"]["w"], values["model"]["w"])
    assert [loaded[key] for key in list(values)[1:]] == list(values.values())[1:]
    assert caplog.text == ""


def test_safetensors_round_trip_keeps_config_and_outputs():
    config = tiny_config()
    model = trained_weights(config)
    save_model(model, "model.safetensors")
    with safetensors.safe_open("model.safetensors", framework="pt") as file:
        assert json.loads(file.metadata()["bsmamba2.config"]) == config.to_dict()
    loaded = load_model("model.safetensors")
    assert loaded.config == config and separates_like(loaded, model)

    os.replace("model.safetensors", "model.bin")  # recognised by its content, not its name
    assert separates_like(load_model("model.bin"), model)
    save_model(model, "torch.ckpt")
    os.replace("torch.ckpt", "torch.safetensors")
    assert separates_like(load_model("torch.safetensors"), model)


@pytest.mark.slow
def test_safetensors_without_our_metadata_is_a_published_checkpoint(tmp_path):
    config = tiny_config()
    model = trained_weights(config)
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    safetensors.torch.save_file(weights, "published.safetensors")
    (tmp_path / "tiny.json").write_text(json.dumps(config.to_dict()))  # YAML is JSON's superset
    assert separates_like(load_model("published.safetensors", config=tmp_path / "tiny.json"), model)

    paper_config = Config().validate()  # the defaults are the paper's vocals model
    with torch.device("meta"):
        shapes = build_model(paper_config).state_dict()
    paper = {name: torch.full(shape.shape, 0.001 * index) for index, (name, shape) in enumerate(shapes.items())}
    safetensors.torch.save_file(paper, "paper.safetensors", metadata={"format": "pt"})
    loaded = load_model("paper.safetensors")
    assert loaded.config == paper_config
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in paper.items())


def test_unreadable_files_are_one_line_errors(tmp_path):
    cases = {"random.bin": random.Random(0).randbytes(4096), "text.ckpt": b"not a checkpoint at all",
             "empty.ckpt": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BSMamba2Error) as error:
            read_checkpoint(name)
        assert str(error.value) == f"checkpoint {name}: not a PyTorch, Lightning or safetensors checkpoint"

    save_model(build_model(tiny_config()), "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BSMamba2Error, match="^checkpoint cut.safetensors: not a readable safetensors checkpoint") \
            as error:
        read_checkpoint("cut.safetensors")
    assert "\n" not in str(error.value)

    safetensors.torch.save_file({"w": torch.zeros(1)}, "bad.safetensors", metadata={"bsmamba2.config": "{oops"})
    with pytest.raises(BSMamba2Error, match="'bsmamba2.config' metadata is not JSON"):
        read_checkpoint("bad.safetensors")


# ------------------------------------------------------------------------------ hostile data that runs no code

class Blank:
    """Unpickles as bytearray(size): `size` zero bytes made by a few bytes of pickle."""

    def __init__(self, size):
        self.size = size

    def __reduce__(self):
        return bytearray, (self.size,)


class Encoded:
    """Unpickles as _codecs.encode(inner, codec), which torch.save writes for bytes with codec "latin1"."""

    def __init__(self, inner, codec):
        self.inner, self.codec = inner, codec

    def __reduce__(self):
        return codecs.encode, (self.inner, self.codec)


class Hijacked(collections.OrderedDict):
    """An OrderedDict whose pickle also sets `get` and `items` on it (a BUILD after its items), as a hostile
    checkpoint's may: both loaders allow it, since an OrderedDict's state is only data."""

    def __reduce__(self):
        return collections.OrderedDict, (), {"get": bytearray, "items": bytearray}, None, iter(dict.items(self))


def stored(config: Config, **changes) -> dict:
    """`config` as a checkpoint stores it, with `changes` ({section: {key: value}}) that validation would refuse."""
    values = config.to_dict()
    for section, keys in changes.items():
        values[section].update(keys)
    return values


def doubled_by_hex(times: int) -> Encoded:
    """Bytes doubled `times` times by the hex codec: 2^times × 2 bytes from about 30 bytes of pickle each."""
    encoded = Encoded("ab", "latin1")
    for _ in range(times):
        encoded = Encoded(encoded, "hex")
    return encoded


def looped() -> list:
    loop = []
    loop.append(loop)
    return loop


ESCAPE = "../../../escaped"
NOT_INERT = "refused, it holds objects that cannot be loaded as inert data"
HOSTILE = {  # a checkpoint with usable weights and something hostile: the start of its one-line refusal
    "stems.ckpt": f"config stored in stems.ckpt: model.stems: {ESCAPE!r} is not a plain name",
    "absurd.ckpt": "config stored in absurd.ckpt: model: would have 57,081,853,832,054 parameters (dim 200000, "
                   "depth 50), above the limit of 1,000,000,000",
    "hex.ckpt": f"checkpoint hex.ckpt: {NOT_INERT} (bytes encoded as 'hex', not from latin-1 text)",
    "compressed.ckpt": "checkpoint compressed.ckpt: refused, its zip entries unpack to",
    "nested.safetensors": "checkpoint nested.safetensors: its 'bsmamba2.config' metadata is not JSON (maximum "
                          "recursion depth exceeded",
    "loop.ckpt": "checkpoint loop.ckpt: refused, its containers nest deeper than 100 levels",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A folder with the HOSTILE checkpoints and a song."""
    folder = tmp_path_factory.mktemp("hostile")
    write_audio(folder / "song.wav", noise(2, 4410), 44100)
    config = tiny_config()
    weights = trained_weights(config).state_dict()
    absurd = {"audio": {"channels": 1, "n_fft": 16, "hop_length": 8},  # a small band split, then dim 200000
              "model": {"stems": ["vocals"], "dim": 200_000, "depth": 50, "band_widths": [9], "expand": 2}}
    torch.save({"config": stored(config, model={"stems": ["vocals", ESCAPE]}, data={"sources": ["vocals", ESCAPE]}),
                "model": weights}, folder / "stems.ckpt")
    torch.save({"config": stored(config, **absurd), "model": weights}, folder / "absurd.ckpt")
    torch.save({"model": weights, "bytes": doubled_by_hex(20)}, folder / "hex.ckpt")
    torch.save({"model": weights, "loop": looped()}, folder / "loop.ckpt")
    # Compressed, a megabyte of zeros takes a kilobyte: torch would unpack it all.
    zeros = io.BytesIO()
    torch.save({"model": weights, "zeros": torch.zeros(1 << 18)}, zeros)
    with zipfile.ZipFile(zeros) as source, zipfile.ZipFile(folder / "compressed.ckpt", "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    deep = "[" * 100_000 + "]" * 100_000
    safetensors.torch.save_file(weights, folder / "nested.safetensors", metadata={"bsmamba2.config": deep})
    return folder


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_checkpoint_is_one_line_and_exit_2_writing_nothing(name, hostile, monkeypatch, capsys):
    monkeypatch.chdir(hostile)
    before = set(hostile.rglob("*"))
    code = main(["separate", "-q", "--checkpoint", name, "-o", "out/sub", "song.wav"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"bsmamba2 separate: error: {HOSTILE[name]}") and error.count("\n") == 1
    assert set(hostile.rglob("*")) == before  # nothing written, inside the output folder or outside it


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "before-torch-1.6"])
def test_a_constructor_that_makes_more_than_it_is_given_is_never_called(zipped, caplog):
    config = tiny_config()
    model = trained_weights(config)
    torch.save({"config": config.to_dict(), "model": model.state_dict(), "blank": Blank(64 << 20)}, "blank.ckpt",
               _use_new_zipfile_serialization=zipped)
    assert os.path.getsize("blank.ckpt") < 1 << 20
    blank = read_checkpoint("blank.ckpt")["blank"]
    assert isinstance(blank, Placeholder) and (blank.name, blank.args) == ("builtins.bytearray", (64 << 20,))
    assert separates_like(load_model("blank.ckpt"), model)
    assert "kept as inert placeholders: builtins.bytearray" in caplog.text


def test_containers_are_rebuilt_without_the_methods_a_pickle_set():
    config = tiny_config()
    model = trained_weights(config)
    torch.save(Hijacked(config=config.to_dict(), model=Hijacked(model.state_dict())), "hijacked.ckpt")
    assert separates_like(load_model("hijacked.ckpt"), model)
    payload = read_checkpoint("hijacked.ckpt")
    assert type(payload) is dict and type(payload["model"]) is dict  # plain dicts: no attributes of their own


def test_shared_containers_are_rebuilt_once():
    """2^40 paths through 40 levels of [x, x]: rebuilt once per container, as the file holds them."""
    shared = ["leaf"]
    for _ in range(40):
        shared = [shared, shared]
    torch.save({"shared": shared}, "shared.ckpt")
    loaded = read_checkpoint("shared.ckpt")["shared"]
    assert loaded[0] is loaded[1]
