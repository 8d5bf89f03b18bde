"""Checkpoints are data: a pickle that would run code never does; Lightning, torch and safetensors files load."""
import builtins
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
from bsmamba2.config import Config
from bsmamba2.errors import BSMamba2Error

from separation_fixtures import tiny_config

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
