"""The scripts that work on training outputs and data (export_model.py, grow_model.py, oracle_baselines.py in
scripts/), run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
import yaml

import bsmamba2
from bsmamba2.checkpoint import build_model, read_checkpoint, save_model
from bsmamba2.metrics import usdr
from bsmamba2.tracks import list_tracks, read_stem
from bsmamba2.training.loop import Trainer

from training_fixtures import RATE, tiny_config, tiny_config_dict

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_export_keeps_the_ema_weights_only_and_refuses_to_overwrite(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert Trainer(tiny_config(data_root, training={"max_steps": 2}), run_dir, quiet=True).run() == 0
    training = torch.load(run_dir / "last.ckpt", weights_only=True)
    for exported in (tmp_path / "model.safetensors", tmp_path / "model.ckpt"):
        result = run_script("export_model.py", run_dir / "last.ckpt", exported)
        assert result.returncode == 0, result.stderr
        inference = read_checkpoint(exported)
        assert set(inference) == {"config", "model"} and inference["config"] == training["config"]
        for name, tensor in training["ema"].items():
            assert torch.equal(inference["model"][name], tensor), name
        assert exported.stat().st_size < (run_dir / "last.ckpt").stat().st_size / 2  # no optimizer state, one copy
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="pt") as file:  # the config in its metadata
        assert json.loads(file.metadata()["bsmamba2.config"]) == training["config"]

    again = run_script("export_model.py", run_dir / "last.ckpt", exported)
    assert again.returncode != 0 and "already exists (use --force to overwrite)" in again.stderr
    assert run_script("export_model.py", run_dir / "last.ckpt", exported, "--force").returncode == 0


@pytest.mark.slow
def test_export_of_several_models_is_the_mean_of_their_weights(data_root, tmp_path):
    paths = []
    for seed, dim in ((0, 16), (1, 16), (2, 24)):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"model{seed}.ckpt")
        save_model(build_model(tiny_config(data_root, model={"dim": dim})), paths[-1])
    first, second = (torch.load(path, weights_only=True)["model"] for path in paths[:2])
    for averaged in (tmp_path / "average.safetensors", tmp_path / "average.ckpt"):
        result = run_script("export_model.py", paths[0], paths[1], averaged)
        assert result.returncode == 0, result.stderr
        for name, tensor in read_checkpoint(averaged)["model"].items():
            torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-7)

    wider = run_script("export_model.py", paths[0], paths[2], tmp_path / "mixed.ckpt")
    assert wider.returncode != 0 and "another architecture than" in wider.stderr
    assert not (tmp_path / "mixed.ckpt").exists()
    again = run_script("export_model.py", paths[0], paths[1], averaged)
    assert again.returncode != 0 and "already exists (use --force to overwrite)" in again.stderr


def test_oracle_baselines_bracket_the_task(data_root):
    result = run_script("oracle_baselines.py", data_root, "--subset", "test")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: [float(value) for value in line.split()[1:3]]
            for line in result.stdout.splitlines()[1:-1]}
    tracks = list_tracks(str(data_root), "test")
    assert sorted(rows) == sorted(track.name for track in tracks)
    for track in tracks:
        stem, mixture = read_stem(track, "vocals"), read_stem(track, "mixture")
        assert rows[track.name][0] == pytest.approx(usdr(stem, mixture), abs=0.01)  # printed to 2 decimals
        assert rows[track.name][1] > rows[track.name][0] + 10  # a ratio mask on a sine over the rest: far better
    mean_line = result.stdout.splitlines()[-1].split()
    assert mean_line[:4] == ["mean", "of", "2", "tracks"]
    assert float(mean_line[5]) == pytest.approx(np.mean([row[1] for row in rows.values()]), abs=0.01)


@pytest.mark.slow
def test_grown_model_separates_as_its_source_and_has_one_more_layer(data_root, tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_config(data_root))
    save_model(source, tmp_path / "source.ckpt")
    grown_path = tmp_path / "grown.ckpt"
    result = run_script("grow_model.py", tmp_path / "source.ckpt", grown_path)
    assert result.returncode == 0, result.stderr
    grown = bsmamba2.load_model(grown_path)
    assert grown.config.model.depth == source.config.model.depth + 1 == len(grown.layers)
    mixture = torch.randn(1, 2, 22050)
    with torch.no_grad():
        torch.testing.assert_close(grown(mixture), source.eval()(mixture), rtol=0, atol=1e-6)
    grown_weights = dict(grown.named_parameters())
    for name, tensor in source.named_parameters():
        assert torch.equal(grown_weights[name], tensor), name

    again = run_script("grow_model.py", tmp_path / "source.ckpt", grown_path)
    assert again.returncode != 0 and "already exists (use --force to overwrite)" in again.stderr
    regrown = run_script("grow_model.py", tmp_path / "source.ckpt", grown_path, "--force")
    assert regrown.returncode == 0, regrown.stderr
    for name, tensor in bsmamba2.load_model(grown_path).named_parameters():  # same seed, same new layer
        assert torch.equal(grown_weights[name], tensor), name


@pytest.mark.slow
def test_grown_stems_keep_the_sources_separation(data_root, tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_config(data_root))  # vocals only
    save_model(source, tmp_path / "source.ckpt")
    result = run_script("grow_model.py", tmp_path / "source.ckpt", tmp_path / "grown.ckpt", "--stems",
                        "drums,vocals,bass")
    assert result.returncode == 0, result.stderr
    grown = bsmamba2.load_model(tmp_path / "grown.ckpt")
    assert grown.stems == ["drums", "vocals", "bass"] and grown.config.model.depth == source.config.model.depth
    mixture = torch.randn(1, 2, 22050)
    with torch.no_grad():
        torch.testing.assert_close(grown(mixture)[:, 1], source.eval()(mixture)[:, 0], rtol=0, atol=1e-6)
    dropped = run_script("grow_model.py", tmp_path / "source.ckpt", tmp_path / "other.ckpt", "--stems", "drums")
    assert dropped.returncode != 0 and "must keep the source's stems (missing vocals)" in dropped.stderr
    assert not (tmp_path / "other.ckpt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["export_model.py", "grow_model.py"])
def test_unreadable_checkpoint_is_one_line_error_and_writes_nothing(script, tmp_path):
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    for source in (tmp_path / "missing.ckpt", tmp_path / "corrupt.ckpt"):
        result = run_script(script, source, tmp_path / "out.ckpt")
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: checkpoint {source}")
        assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.slow
def test_profile_train_step_times_each_phase_of_the_trainers_step(data_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(data_root)))
    result = run_script("profile_train_step.py", "--config", config, "--steps", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    phases = ("data", "forward", "loss", "backward", "optimizer+ema")
    assert list(rows) == [*phases, "step"]
    wall = {name: float(values[0]) for name, values in rows.items()}
    assert all(wall[phase] >= 0 for phase in phases) and wall["forward"] > 0 and wall["backward"] > 0
    assert wall["step"] == pytest.approx(sum(wall[phase] for phase in phases), abs=0.005)


@pytest.mark.slow
def test_export_half_stores_float16_weights_that_load_as_float32(data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert Trainer(tiny_config(data_root, training={"max_steps": 2}), run_dir, quiet=True).run() == 0
    full, half = tmp_path / "full.ckpt", tmp_path / "half.ckpt"
    assert run_script("export_model.py", run_dir / "last.ckpt", full).returncode == 0
    result = run_script("export_model.py", run_dir / "last.ckpt", half, "--half")
    assert result.returncode == 0, result.stderr
    agreement = float(result.stdout.split("agrees with float32 to ")[1].split(" dB")[0])
    stored = read_checkpoint(half)["model"]
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    assert half.stat().st_size < 0.6 * full.stat().st_size
    model = bsmamba2.load_model(half)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    wave = torch.randn(1, model.audio_channels, RATE)
    with torch.inference_mode():
        assert usdr(bsmamba2.load_model(full)(wave).numpy(), model(wave).numpy()) > 40 and agreement > 40


@pytest.mark.slow
def test_train_speed_times_a_commit_against_the_working_tree(data_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(data_root)))
    result = run_script("train_speed.py", "--baseline", "HEAD", "--config", config, "--steps", 4, "--log-every", 2,
                        "--rounds", 1, "--nproc", 1, "--json", tmp_path / "speed.json")
    assert result.returncode == 0, result.stderr
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert list(speed["steps_per_s"]) == ["baseline HEAD", "working tree"]
    assert all(value > 0 for value in speed["steps_per_s"].values()) and speed["ratio"] > 0
    assert "ratio" in result.stdout.splitlines()[-1]
