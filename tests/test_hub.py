"""The model registry and its downloads, offline: every download comes from a server on 127.0.0.1 that the test
starts (tests/hub_server.py), with Range support and ways to fail."""
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from bsmamba2 import hub
from bsmamba2.cli import main
from bsmamba2.config import config_path, load_config
from bsmamba2.errors import BSMamba2Error

from hub_server import FileServer

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = random.Random(0).randbytes(300_000)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "test-model"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(hub.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def server():
    with FileServer({"/model.ckpt": PAYLOAD}) as running:
        yield running


@pytest.fixture
def register(tmp_path, monkeypatch):
    """Write a BSMAMBA2_MODELS file holding one entry `test-model` (or several), and point the variable at it."""
    def write(entry=None, models=None):
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({"models": models if models is not None else {NAME: entry}}))
        monkeypatch.setenv(hub.MODELS_ENV, str(path))
        return path
    return write


def served(server, **fields):
    return {"url": server.url + "/model.ckpt", "sha256": SHA256, "size": len(PAYLOAD), "config": "small", **fields}


def leftovers(cache):
    return sorted(p.name for p in cache.rglob("*") if p.suffix in (".part", ".ckpt"))


def test_first_use_downloads_verifies_and_caches_and_second_use_makes_no_request(server, register, cache):
    register(served(server))
    path, config = hub.checkpoint_file(NAME, progress=False)
    assert path == cache / NAME / "model.ckpt" and path.read_bytes() == PAYLOAD and config == "small"
    assert leftovers(cache) == ["model.ckpt"] and hub.is_cached(hub.get_model(NAME))
    assert server.requests == [("/model.ckpt", None)]
    assert hub.checkpoint_file(NAME, progress=False) == (path, "small")
    assert len(server.requests) == 1


@pytest.mark.slow
def test_downloaded_checkpoint_without_a_config_loads_with_the_entrys_config(tmp_path, register, cache):
    torch = pytest.importorskip("torch")
    import bsmamba2
    model = bsmamba2.build_model(load_config("small"))
    torch.save(model.state_dict(), tmp_path / "weights.ckpt")  # a bare state dict, like MSST's release
    data = (tmp_path / "weights.ckpt").read_bytes()
    with FileServer({"/weights.ckpt": data}) as server:
        register({"url": server.url + "/weights.ckpt", "sha256": hashlib.sha256(data).hexdigest(),
                  "config": "small"})
        path, config = hub.checkpoint_file(NAME, progress=False)
    loaded = bsmamba2.load_model(path, config)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("field, value, message", [
    ("sha256", "0" * 64, f"sha256 {SHA256}, expected {'0' * 64}"),
    ("size", len(PAYLOAD) + 1, f"{len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"),
])
def test_a_download_that_does_not_match_never_reaches_the_cache(server, register, cache, field, value, message):
    register(served(server, **{field: value}))
    with pytest.raises(BSMamba2Error, match=f"model {NAME}: .*{message}.*deleted"):
        hub.checkpoint_file(NAME, progress=False)
    assert leftovers(cache) == []


def test_a_connection_closed_mid_file_is_resumed_with_a_range_request(server, register, cache):
    register(served(server))
    server.cut_responses = 1
    path, _ = hub.checkpoint_file(NAME, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/model.ckpt", None), ("/model.ckpt", f"bytes={len(PAYLOAD) // 2}-")]


def test_a_download_cut_every_time_keeps_its_part_and_the_next_call_resumes_it(server, register, cache):
    register(served(server))
    server.cut_responses = hub.ATTEMPTS
    with pytest.raises(BSMamba2Error, match=f"model {NAME}: the download from .* kept stopping.*run the command "
                                            "again to resume"):
        hub.checkpoint_file(NAME, progress=False)
    part = cache / NAME / "model.ckpt.part"
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD) and part.read_bytes() == PAYLOAD[:kept]
    assert not (cache / NAME / "model.ckpt").exists()
    path, _ = hub.checkpoint_file(NAME, progress=False)
    assert path.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1] == ("/model.ckpt", f"bytes={kept}-")


def test_a_stalled_server_times_out_instead_of_hanging(server, register, cache, monkeypatch):
    register(served(server))
    monkeypatch.setattr(hub, "TIMEOUT_SECONDS", 0.2)
    server.gate.clear()  # headers sent, then no byte of the body
    with pytest.raises(BSMamba2Error, match="kept stopping \\(0 of 300000 bytes so far"):
        hub.checkpoint_file(NAME, progress=False)
    assert len(server.requests) == hub.ATTEMPTS and not (cache / NAME / "model.ckpt").exists()


@pytest.mark.parametrize("ignore_range, stale_part", [
    (True, b"x" * 1000),                 # a server that answers a Range request with the whole file (200)
    (False, PAYLOAD + b"trailing junk"),  # a part longer than the file: the server answers 416
])
def test_a_part_the_server_cannot_continue_is_started_afresh(server, register, cache, ignore_range, stale_part):
    register(served(server))
    server.ignore_range = ignore_range
    (cache / NAME).mkdir(parents=True)
    (cache / NAME / "model.ckpt.part").write_bytes(stale_part)
    path, _ = hub.checkpoint_file(NAME, progress=False)
    assert path.read_bytes() == PAYLOAD and leftovers(cache) == ["model.ckpt"]


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-length"])
def test_a_server_sending_more_than_the_entrys_size_is_stopped_there(server, register, cache, send_length):
    """A hostile server, or anyone on a plain http path, must not fill the disk."""
    register(served(server, size=1000))
    server.send_length = send_length
    with pytest.raises(BSMamba2Error, match=f"^model {NAME}: {server.url}/model.ckpt sends more than the 1000 bytes "
                                            f"that .*models.yaml gives for it; stopped and deleted the download"):
        hub.checkpoint_file(NAME, progress=False)
    assert leftovers(cache) == [] and len(server.requests) == 1


@pytest.mark.parametrize("planted", ["model.ckpt.part", "model.ckpt.lock"])
def test_a_symbolic_link_planted_in_the_cache_is_not_written_through(server, register, cache, tmp_path, planted):
    """In a shared cache, another user could plant a link where we write, to have us overwrite a file of theirs
    choosing (or create one)."""
    register(served(server))
    victim, absent = tmp_path / "victim.txt", tmp_path / "absent.txt"
    victim.write_bytes(b"precious")
    (cache / NAME).mkdir(parents=True)
    (cache / NAME / planted).symlink_to(victim)
    (cache / NAME / "other").symlink_to(absent)
    with pytest.raises(BSMamba2Error, match=f"^{cache / NAME / planted} is a symbolic link, which the model cache "
                                            "never holds: refused to write through it \\(delete it\\)$"):
        hub.checkpoint_file(NAME, progress=False)
    assert victim.read_bytes() == b"precious"
    (cache / NAME / planted).unlink()
    (cache / NAME / "other").rename(cache / NAME / planted)  # a link to no file: following it would create one
    with pytest.raises(BSMamba2Error, match="is a symbolic link"):
        hub.checkpoint_file(NAME, progress=False)
    assert not absent.exists()


def test_not_found_names_the_url_and_where_to_put_the_file(server, register, cache):
    register(served(server, url=server.url + "/missing.ckpt"))
    expected = cache / NAME / "missing.ckpt"
    with pytest.raises(BSMamba2Error) as error:
        hub.checkpoint_file(NAME, progress=False)
    message = str(error.value)
    assert "\n" not in message and "HTTP 404" in message
    assert f"{server.url}/missing.ckpt" in message and f"put the file at {expected} by hand" in message
    assert leftovers(cache) == []


def test_offline_names_the_url_and_where_to_put_the_file(register, cache):
    with socket.socket() as probe:  # a port nobody listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.ckpt"
    register({"url": url, "sha256": SHA256})
    with pytest.raises(BSMamba2Error, match=f"cannot download {url} .*put the file at "
                                            f"{cache / NAME / 'model.ckpt'} by hand \\(sha256 {SHA256}\\)"):
        hub.checkpoint_file(NAME, progress=False)


def test_a_file_put_in_the_cache_by_hand_is_hashed_once_and_a_wrong_one_is_downloaded_again(server, register,
                                                                                          cache):
    register(served(server))
    path = cache / NAME / "model.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(PAYLOAD)
    assert hub.checkpoint_file(NAME, progress=False)[0] == path and server.requests == []
    assert path.with_name("model.ckpt.verified").read_text().split()[0] == SHA256
    path.write_bytes(bytes(len(PAYLOAD)))  # same size, other bytes: the stamp no longer matches
    assert hub.checkpoint_file(NAME, progress=False)[0] == path and path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_an_unwritable_cache_is_one_line(server, register, cache):
    register(served(server))
    cache.write_text("a file where the cache folder should be")
    with pytest.raises(BSMamba2Error, match=f"cannot write to the model cache .*set {hub.CACHE_ENV}"):
        hub.checkpoint_file(NAME, progress=False)


def test_a_file_url_is_used_in_place_and_checked(tmp_path, register, cache):
    local = tmp_path / "my weights.ckpt"
    local.write_bytes(PAYLOAD)
    register({"url": local.as_uri(), "sha256": SHA256, "description": "mine"})
    assert hub.checkpoint_file(NAME, progress=False) == (local, None)
    assert not cache.exists()  # nothing copied
    register({"url": local.as_uri(), "sha256": "f" * 64})
    with pytest.raises(BSMamba2Error, match=f"model {NAME}: .*my weights.ckpt has sha256 {SHA256}, expected f+"):
        hub.checkpoint_file(NAME, progress=False)
    register({"url": (tmp_path / "gone.ckpt").as_uri()})  # no sha256: allowed for a local file
    with pytest.raises(BSMamba2Error, match="no file .*gone.ckpt"):
        hub.checkpoint_file(NAME, progress=False)


def test_two_processes_downloading_at_once_download_once(server, register, cache):
    models = register(served(server))
    server.gate.clear()  # hold the first download's body until the other process waits for the lock
    child = ("import logging; logging.basicConfig(level=logging.INFO); from bsmamba2 import hub; "
             "print(hub.checkpoint_file('test-model', False)[0])")
    env = {**os.environ, "PYTHONPATH": str(REPO), hub.CACHE_ENV: str(cache), hub.MODELS_ENV: str(models)}
    children = [subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [[] for _ in children]
    readers = [threading.Thread(target=lambda c=c, log=log: log.extend(c.stderr), daemon=True)
               for c, log in zip(children, logs)]
    try:
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 30
        while not any("waiting for another process" in line for log in logs for line in log):
            assert time.monotonic() < deadline, logs
            time.sleep(0.02)
        server.gate.set()
        outputs = [c.stdout.read() for c in children]
        for c in children:
            c.wait(timeout=60)
    finally:
        server.gate.set()
        for c in children:
            c.kill()
    assert [c.returncode for c in children] == [0, 0], logs
    assert {out.strip() for out in outputs} == {str(cache / NAME / "model.ckpt")}
    assert len(server.requests) == 1 and (cache / NAME / "model.ckpt").read_bytes() == PAYLOAD


def test_unknown_model_lists_the_known_ones(register, cache):
    register({"url": "file:///x.ckpt"})
    with pytest.raises(BSMamba2Error, match="unknown model 'nope' \\(known: bsmamba2-vocals-msst, synth-4stem, "
                                            f"synth-vocals, {NAME};"):
        hub.get_model("nope")


@pytest.mark.parametrize("entry, message", [
    ({"url": "https://example.org/v.ckpt"}, "sha256: required for an http\\(s\\) URL"),
    ({"url": "https://example.org/v.ckpt", "sha256": "0123abcd"}, "sha256: expected 64 hexadecimal digits"),
    ({"url": "ftp://example.org/v.ckpt", "sha256": SHA256}, "url: expected an http://, https:// or file:// URL"),
    ({"url": "https://example.org/v.ckpt", "sha256": SHA256, "colour": "red"},
     "colour: unknown key \\(known: description, stems, url,"),
    ({"url": "https://example.org/v.ckpt", "sha256": SHA256, "size": "big"}, "size: expected a positive number"),
    ({"url": "https://example.org/v.ckpt", "sha256": SHA256, "config": "nope"},
     "config: 'nope' is neither a packaged config \\(bsmamba2_4stem, bsmamba2_vocals"),
    ({"url": "https://example.org/", "sha256": SHA256}, "file: expected a plain file name"),
    ({"description": "no url"}, "url: give a URL \\(http://, https:// or file://\\), or package_file"),
    ({"url": "https://example.org/v.ckpt", "sha256": SHA256, "scores": [{"stem": "vocals", "value": 9}]},
     "scores\\[0\\]: expected stem, metric, value, dataset, source"),
])
def test_user_entries_are_checked_with_one_line_naming_the_file_and_key(register, entry, message):
    path = register(entry)
    with pytest.raises(BSMamba2Error, match=f"^{path}: models.{NAME}.{message}"):
        hub.registry()


def test_user_entries_extend_and_override_the_shipped_ones(tmp_path, register):
    register(models={
        "bsmamba2-vocals-msst": {"url": "https://mirror.example.org/bs_mamba2_vocals.ckpt", "sha256": SHA256},
        "my-vocals": {"url": "https://example.org/vocals.ckpt", "sha256": SHA256.upper(), "size": 192610602,
                      "config": "bsmamba2_vocals", "description": "my fine-tuned vocals model"},
        "my-own-config": {"url": "file:///w.ckpt", "config": "configs/mine.yaml"},
    })
    entries = hub.registry()
    assert entries["bsmamba2-vocals-msst"].url == "https://mirror.example.org/bs_mamba2_vocals.ckpt"
    assert entries["my-vocals"].sha256 == SHA256 and entries["my-vocals"].config == "bsmamba2_vocals"
    assert entries["my-own-config"].config == str(tmp_path / "configs" / "mine.yaml")  # beside the models file
    assert hub.DEFAULT_MODEL in entries


def test_the_shipped_registry_is_usable_without_a_network(monkeypatch):
    monkeypatch.delenv(hub.MODELS_ENV, raising=False)
    entries = hub.registry()
    path, config = hub.checkpoint_file(hub.DEFAULT_MODEL, progress=False)
    assert path.is_file() and path.parent.name == "pretrained" and config is None
    for entry in entries.values():
        assert entry.stems and entry.description and entry.license and entry.source and entry.scores
        assert entry.package_file or (entry.url.startswith("https://") and entry.sha256 and entry.size)
        if entry.config:
            assert config_path(entry.config).is_file() and load_config(entry.config)


def test_cache_folder_follows_the_platform_and_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "bsmamba2"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert hub.cache_dir() == Path.home() / "Library" / "Caches" / "bsmamba2"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert hub.cache_dir() == tmp_path / "local" / "bsmamba2" / "Cache"


def test_models_command_lists_downloads_and_fails_with_exit_code_2(server, register, cache, capsys):
    register(served(server, stems=["vocals"], description="served by the test",
                    scores=[{"stem": "vocals", "metric": "uSDR", "value": 7.5, "dataset": "x", "source": "y"}]))
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(NAME))
    assert row.split()[:5] == [NAME, "vocals", f"{len(PAYLOAD) / 1e6:.1f}", "MB", "no"] and "vocals uSDR 7.5 dB (x)" in row
    assert "synth-vocals" in table and "bundled" in table and str(cache) in table
    assert main(["models", "download", NAME, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"{NAME}: {cache / NAME / 'model.ckpt'}"
    assert main(["models", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed[NAME]["cached"] is True and listed[NAME]["sha256"] == SHA256
    assert main(["models", "download", "nope", NAME]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert len(server.requests) == 1


def test_models_command_needs_no_torch():
    code = ("import argparse, sys; from bsmamba2 import models_command as command; parser = argparse.ArgumentParser(); "
            "command.add_arguments(parser); command.run(parser.parse_args([])); "
            "command.run(parser.parse_args(['info', 'synth-vocals'])); sys.exit('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "bsmamba2-vocals-msst" in result.stdout and "path: " in result.stdout


def test_separate_with_a_model_downloads_verifies_caches_and_separates(tmp_path, register, cache, monkeypatch):
    """Issue 17's "done": `bsmamba2 separate song.wav --model NAME` against an entry served from 127.0.0.1."""
    from separation_fixtures import noise, save_tiny_checkpoint, write_audio

    data = save_tiny_checkpoint(tmp_path / "served.ckpt").read_bytes()
    song = write_audio(tmp_path / "song.wav", noise(2, 44100), 44100)
    monkeypatch.chdir(tmp_path)
    with FileServer({"/tiny.ckpt": data}) as server:
        register({"url": server.url + "/tiny.ckpt", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
        assert main(["separate", str(song), "--model", NAME, "-o", "first", "-q"]) == 0
        assert server.requests == [("/tiny.ckpt", None)]
        assert (cache / NAME / "tiny.ckpt").read_bytes() == data
        assert main(["separate", str(song), "--model", NAME, "-o", "second", "-q"]) == 0
        assert len(server.requests) == 1  # the second run uses the cache
    for stem in ("vocals", "drums"):
        assert (tmp_path / "first" / "song" / f"{stem}.wav").read_bytes() == \
            (tmp_path / "second" / "song" / f"{stem}.wav").read_bytes()


def test_a_corrupted_model_never_reaches_the_cache_or_the_model(tmp_path, register, cache, monkeypatch, capsys):
    from separation_fixtures import noise, save_tiny_checkpoint, write_audio

    data = save_tiny_checkpoint(tmp_path / "served.ckpt").read_bytes()
    song = write_audio(tmp_path / "song.wav", noise(2, 4410), 44100)
    monkeypatch.chdir(tmp_path)
    corrupted = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
    with FileServer({"/tiny.ckpt": corrupted}) as server:
        register({"url": server.url + "/tiny.ckpt", "sha256": hashlib.sha256(data).hexdigest()})
        assert main(["separate", str(song), "--model", NAME, "-q"]) == 2
    assert "sha256" in capsys.readouterr().err
    assert not any(cache.rglob("*.ckpt")) and not any(cache.rglob("*.part"))
    assert not (tmp_path / "separated").exists()


class _WritesAFile:
    """Unpickling this with plain pickle creates MARKER: the payload a malicious checkpoint would carry."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["BSMAMBA2_TEST_MARKER"]),))


def test_a_malicious_pickle_served_as_a_model_never_runs(tmp_path, register, cache, monkeypatch):
    import pickle

    torch = pytest.importorskip("torch")
    from separation_fixtures import noise, save_tiny_checkpoint, write_audio

    marker = tmp_path / "pwned"
    monkeypatch.setenv("BSMAMBA2_TEST_MARKER", str(marker))
    pickle.loads(pickle.dumps(_WritesAFile()))  # armed: plain unpickling does create the file
    assert marker.exists()
    marker.unlink()
    checkpoint = torch.load(save_tiny_checkpoint(tmp_path / "tiny.ckpt"), weights_only=True)
    checkpoint["hyper_parameters"] = _WritesAFile()
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    data = (tmp_path / "evil.ckpt").read_bytes()
    song = write_audio(tmp_path / "song.wav", noise(2, 4410), 44100)
    monkeypatch.chdir(tmp_path)
    with FileServer({"/evil.ckpt": data}) as server:
        register({"url": server.url + "/evil.ckpt", "sha256": hashlib.sha256(data).hexdigest()})
        main(["separate", str(song), "--model", NAME, "-q"])  # loaded inert or refused: either way, not run
    assert not marker.exists()
