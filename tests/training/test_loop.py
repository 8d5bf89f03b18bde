"""The training loop end to end on a tiny BSMamba2 and 8 kHz data the tests write: learning, exact resumption
(in process, after SIGTERM and after SIGKILL), checkpoints, errors, non-finite steps, 2-process DDP on gloo."""
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import bsmamba2
from bsmamba2.checkpoint import build_model, save_model
from bsmamba2.cli import main as cli_main
from bsmamba2.data import TrainingSegments, split_tracks
from bsmamba2.losses import MultiResolutionLoss
from bsmamba2.training.loop import STEP_PHASES, Trainer, autocast_dtype, cpu_has_bf16, seed_everything

from training_fixtures import tiny_config, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def train(config_path: Path, out: Path, *extra: str) -> int:
    return cli_main(["train", "--config", str(config_path), "--out", str(out), "--quiet", *extra])


def records(run_dir: Path, kind: str = "loss") -> dict:
    """{step: record} of metrics.jsonl's training (kind="loss") or validation (kind="usdr") records."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if kind in r}


def weights(path: Path, key: str = "model") -> dict:
    return torch.load(path, weights_only=True)[key]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_training_lowers_the_loss_and_keeps_the_best(data_root, tmp_path):
    config = tiny_config(data_root, training={"max_steps": 10, "validate_every": 5, "checkpoint_every": 5,
                                              "ema_decay": 0.5})
    # a fixed batch of examples the run never draws (the stream is indexed by example)
    examples = TrainingSegments(split_tracks(config)[0], config)
    mixture, targets = (torch.stack(items) for items in zip(*(examples[10**6 + i] for i in range(8))))
    loss = MultiResolutionLoss(config.training.loss)
    seed_everything(config.training.seed)
    with torch.no_grad():
        before = loss(bsmamba2.build_model(config).eval()(mixture), targets).item()

    assert Trainer(config, tmp_path / "run", quiet=True).run() == 0

    trained = bsmamba2.load_model(tmp_path / "run" / "last.ckpt")
    assert_same_weights(trained.state_dict(), weights(tmp_path / "run" / "last.ckpt", "ema"))  # EMA preferred
    with torch.no_grad():
        after = loss(trained(mixture), targets).item()
    assert after < 0.8 * before
    validations = records(tmp_path / "run", "usdr")
    assert sorted(validations) == [5, 10] and set(validations[10]["usdr"]) == {"vocals"}
    best_step = max(validations, key=lambda step: validations[step]["usdr_mean"])
    best = torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)
    assert best["step"] == best_step and best["best_usdr"] == pytest.approx(validations[best_step]["usdr_mean"])


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_checkpoints_and_exact_resume_after_copy_sigterm_and_sigkill(data_root, tmp_path):
    reference = tmp_path / "reference"
    assert train(write_config(tmp_path / "six.yaml", tiny_config_dict(data_root, training={"max_steps": 6})),
                 reference) == 0
    curve = {step: r["loss"] for step, r in records(reference).items()}
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    last = torch.load(reference / "last.ckpt", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "step", "samples_seen", "rng", "config",
            "code_version"} <= set(last)
    assert last["step"] == 6 and last["config"]["training"]["max_steps"] == 6
    assert sorted(p.name for p in reference.glob("step_*.ckpt")) == ["step_00000004.ckpt", "step_00000006.ckpt"]
    assert any(not torch.equal(last["model"][k], last["ema"][k]) for k in last["model"])

    def assert_continues_the_reference(run_dir: Path, atol: float) -> None:
        resumed = torch.load(run_dir / "last.ckpt", weights_only=True)
        assert resumed["step"] == 6
        for key in ("model", "ema"):
            assert_same_weights(resumed[key], last[key], atol=atol)
        resumed_curve = {step: r["loss"] for step, r in records(run_dir).items()}
        assert resumed_curve == pytest.approx({step: curve[step] for step in resumed_curve}, abs=atol)

    # in process: a run directory holding the step-4 checkpoint as last.ckpt continues bit-exactly
    (tmp_path / "copy").mkdir()
    shutil.copy(reference / "step_00000004.ckpt", tmp_path / "copy" / "last.ckpt")
    assert cli_main(["train", "--out", str(tmp_path / "copy"), "--resume", "--quiet"]) == 0
    assert_continues_the_reference(tmp_path / "copy", atol=0.0)
    assert sorted(records(tmp_path / "copy")) == [5, 6]

    # as a user would: the interrupted run has a longer budget (its learning rate is constant) so that it is
    # still going when hit; SIGTERM saves and exits, the same command resumes, SIGKILL, then finish at step 6
    long_run = write_config(tmp_path / "long.yaml", tiny_config_dict(data_root, training={"max_steps": 10**6}))
    out = tmp_path / "run"
    command = [str(BIN / "python"), str(REPO / "train.py"), "--config", str(long_run), "--out", str(out), "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(records(out)) >= 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = torch.load(out / "last.ckpt", weights_only=True)["step"]
    assert 1 <= stopped_at < 5 and f"SIGTERM: saved {out / 'last.ckpt'} at step {stopped_at}" in stderr

    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for(lambda: any(int(p.stem[5:]) > stopped_at for p in out.glob("step_*.ckpt")), process)
    process.kill()
    process.communicate(timeout=60)
    assert subprocess.run(command + ["--resume", "--set", "training.max_steps=6"], cwd=tmp_path).returncode == 0
    assert_continues_the_reference(out, atol=1e-6)
    assert sorted(records(out)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("problem", ["missing", "corrupt", "not training", "wrong weights"])
def test_missing_or_corrupt_last_checkpoint_is_one_line(data_root, tmp_path, capsys, problem):
    out = tmp_path / "run"
    out.mkdir()
    if problem == "corrupt":
        (out / "last.ckpt").write_bytes(b"\x80\x02 half a checkpoint")
    if problem == "not training":
        torch.save({"config": {}, "model": {}}, out / "last.ckpt")
    if problem == "wrong weights":
        torch.save({"config": tiny_config(data_root).to_dict(), "model": {"final_norm.gamma": torch.ones(3)},
                    "optimizer": {}, "scheduler": {}, "step": 1, "samples_seen": 2, "rng": []}, out / "last.ckpt")
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(data_root))
    assert train(config_path, out, "--resume") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("bsmamba2 train: error:") and "last.ckpt" in error
    expected = {"missing": "does not exist", "corrupt": "not a readable PyTorch checkpoint",
                "not training": "not a training checkpoint",
                "wrong weights": "the saved training state does not fit this model"}[problem]
    assert expected in error


def test_config_errors_are_one_line(data_root, tmp_path, capsys):
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(data_root))
    assert train(config_path, tmp_path / "run", "--set", "training.max_step=3") == 2
    error = capsys.readouterr().err
    assert error.startswith("bsmamba2 train: error: --set 'training.max_step=3': unknown key training.max_step "
                            "(did you mean training.max_steps?; known: ")
    assert error.count("\n") == 1
    (tmp_path / "run").mkdir()
    stored = tiny_config(data_root, model={"dim": 32}).to_dict()
    torch.save({"config": stored, "model": {}, "optimizer": {}, "scheduler": {}, "step": 1, "samples_seen": 2,
                "rng": []}, tmp_path / "run" / "last.ckpt")
    assert train(config_path, tmp_path / "run") == 2  # the run in that directory has other weights
    error = capsys.readouterr().err
    assert f"model.dim is 16 but the run in {tmp_path / 'run'} was trained with 32" in error
    assert cli_main(["train", "--out", str(tmp_path / "run"), "--set", "model.dim=16", "--quiet"]) == 2
    assert f"model.dim is 16 but the run in {tmp_path / 'run'} was trained with 32" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_run_files_get_the_umask_permissions_and_the_last_line_says_how_to_use_them(data_root, tmp_path, caplog):
    """A teammate on the same server can read the checkpoints (umask 002: group-writable, like any file saved)."""
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(data_root, training={
        "max_steps": 2, "validate_every": 2, "checkpoint_every": 2}))
    previous = os.umask(0o002)
    try:
        with caplog.at_level(logging.INFO, logger="bsmamba2"):
            assert cli_main(["train", "--config", str(config_path), "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(previous)
    for name in ("last.ckpt", "best.ckpt", "config.yaml", "metrics.jsonl"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o664, name
    assert f"bsmamba2 separate song.wav --checkpoint {tmp_path / 'run' / 'best.ckpt'}" in caplog.text


def test_relative_data_root_that_is_not_there_says_where_it_was_looked_for(data_root, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(data_root))
    assert train(config_path, tmp_path / "run", "--set", "data.root=data/musdb") == 2
    error = capsys.readouterr().err
    assert error == ("bsmamba2 train: error: data root data/musdb is not a directory (a relative path, taken from "
                     f"the working directory: {tmp_path.resolve() / 'data' / 'musdb'})\n")


def test_init_starts_a_new_run_from_given_weights_and_refuses_other_shapes(data_root, tmp_path, capsys):
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(data_root, training={"max_steps": 2}))
    source = bsmamba2.build_model(tiny_config(data_root))
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.fill_(0.01)
    save_model(source, tmp_path / "start.ckpt")
    trainer = Trainer(tiny_config(data_root), tmp_path / "unused", quiet=True, init_from=str(tmp_path / "start.ckpt"))
    assert_same_weights(trainer.model.state_dict(), source.state_dict())
    assert_same_weights(trainer.ema.state_dict(), source.state_dict())

    assert train(config_path, tmp_path / "fine", "--init", str(tmp_path / "start.ckpt")) == 0
    assert records(tmp_path / "fine").keys() == {1, 2}
    assert train(config_path, tmp_path / "wide", "--init", str(tmp_path / "start.ckpt"), "--set", "model.dim=32") == 2
    error = capsys.readouterr().err
    assert "start.ckpt does not match the model config: " in error and error.count("\n") == 1


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, capsys):
    root = tmp_path / "data"
    for subset in ("train", "test"):
        track = root / subset / "nan"
        track.mkdir(parents=True)
        for stem in ("mixture", "vocals", "drums", "bass", "other"):
            audio = np.full((8000, 2), 0.1, np.float32)
            audio[100] = np.nan if subset == "train" else 0.1
            sf.write(track / f"{stem}.wav", audio, 8000, subtype="FLOAT")
    config_path = write_config(tmp_path / "nan.yaml", tiny_config_dict(
        root, training={"max_steps": 10, "max_nonfinite_steps": 3, "checkpoint_every": 1},
        data={"segment_seconds": 0.99, "gain_range": [1.0, 1.0], "silence_prob": 0.0}))
    assert train(config_path, tmp_path / "run") == 2
    error = capsys.readouterr().err
    assert "stopped at step 3: 3 steps in a row had a non-finite loss or gradient (training.max_nonfinite_steps)" \
           in error and error.count("\n") == 1
    logged = records(tmp_path / "run")
    assert [(r["loss"], r["nonfinite_steps"]) for r in logged.values()] == [(None, 1), (None, 2), (None, 3)]
    config = tiny_config(root)
    seed_everything(config.training.seed)
    initial = bsmamba2.build_model(config).state_dict()
    assert_same_weights(weights(tmp_path / "run" / "last.ckpt"), initial)  # skipped steps change nothing


@pytest.mark.slow
def test_two_process_ddp_and_accumulation_match_one_bigger_batch(data_root, tmp_path):
    """Batch 2 in one process, 2 × batch 1 (accumulated) and 2 processes × batch 1 see the same examples."""
    # fp32: under bf16 autocast (`auto` on a CPU with bf16) differently grouped sums round ~1e-4 apart
    values = tiny_config_dict(data_root, training={"max_steps": 2, "validate_every": 2, "precision": "fp32"})
    one = tmp_path / "one"
    assert train(write_config(tmp_path / "one.yaml", values), one) == 0
    values["training"]["batch_size"] = 1
    accumulated = tmp_path / "accumulated"
    assert train(write_config(tmp_path / "accumulated.yaml", values), accumulated, "--set",
                 "training.grad_accum_steps=2") == 0
    ddp_config = write_config(tmp_path / "ddp.yaml", values)
    ddp = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train.py"), "--config", str(ddp_config), "--out", str(ddp)],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("scan backend: ") == 1  # rank 0 alone tells the run's story
    for run in (ddp, accumulated):
        # Adam's first step turns float rounding of near-zero gradients into differences of up to ~lr·1e-3
        assert_same_weights(weights(run / "last.ckpt"), weights(one / "last.ckpt"), atol=2e-5)
        for step in (1, 2):
            assert records(run)[step]["loss"] == pytest.approx(records(one)[step]["loss"], rel=1e-5)
            assert records(run)[step]["grad_norm"] == pytest.approx(records(one)[step]["grad_norm"], rel=1e-5)
    assert len(torch.load(ddp / "last.ckpt", weights_only=True)["rng"]) == 2
    lines = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 alone logs: steps 1, 2 and one validation over both ranks' tracks
    assert records(ddp, "usdr")[2]["usdr"]["vocals"] == pytest.approx(records(one, "usdr")[2]["usdr"]["vocals"],
                                                                      abs=1e-3)


def test_train_step_reports_its_phases_and_is_the_step_run_takes(data_root, tmp_path):
    config = tiny_config(data_root, training={"max_steps": 2, "grad_accum_steps": 2})
    trainer = Trainer(config, tmp_path / "unused", quiet=True)
    stream, phases = trainer.data_stream(), []
    for _ in range(2):
        result = trainer.train_step(stream, lap=phases.append)
        assert result.updated and not result.stop_requested and np.isfinite(result.loss)
    micro_batch = [phase for phase in STEP_PHASES[:-1] if phase != "teacher"]  # only with training.teacher
    assert phases == (micro_batch * 2 + [STEP_PHASES[-1]]) * 2
    assert (trainer.step, trainer.samples_seen) == (2, 2 * 2 * 2)
    run = Trainer(config, tmp_path / "run", quiet=True)
    assert run.run() == 0
    assert_same_weights(trainer.model.state_dict(), run.model.state_dict())
    assert_same_weights(trainer.ema.state_dict(), run.ema.state_dict())


def test_cpu_precision_auto_is_bf16_where_the_cpu_has_it_and_agrees_with_float32(data_root):
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    # One step's loss and gradients under bf16 autocast (as `auto` trains on such a CPU) against float32 (measured:
    # the loss 0.003 % apart, the gradients 0.7 %); bf16 is emulated where the CPU lacks it: slow, but comparable.
    config = tiny_config(data_root, model={"stems": ["vocals", "drums"]})
    segments = TrainingSegments(split_tracks(config)[0], config)
    mixture, targets = (torch.stack(items) for items in zip(segments[0], segments[1]))
    loss_function = MultiResolutionLoss(config.training.loss)
    torch.manual_seed(0)
    model = build_model(config).train()

    def step(dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            estimate = model(mixture)
        loss = loss_function(estimate, targets)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    (loss32, grads32), (loss16, grads16) = step(None), step(torch.bfloat16)
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32)
    assert (grads16 - grads32).norm() <= 0.05 * grads32.norm()


def test_frozen_parameters_keep_their_starting_values_while_the_rest_learns(data_root, tmp_path, capsys):
    """training.freeze: new stems' estimators learn on a trained network that, with its own stems, stays as it was."""
    model = {"stems": ["vocals", "drums"]}
    frozen = ["band_split", "layers", "final_norm", "mask_estimators.0"]
    save_model(bsmamba2.build_model(tiny_config(data_root, model=model)), tmp_path / "start.ckpt")
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(
        data_root, model=model, training={"max_steps": 3, "freeze": frozen}))
    assert train(config_path, tmp_path / "run", "--init", str(tmp_path / "start.ckpt")) == 0
    start, end = weights(tmp_path / "start.ckpt"), weights(tmp_path / "run" / "last.ckpt")
    for name in start:
        assert torch.equal(start[name], end[name]) == name.startswith(tuple(frozen)), name
    assert train(config_path, tmp_path / "typo", "--set=training.freeze=[layer]") == 2
    assert capsys.readouterr().err.startswith("bsmamba2 train: error: training.freeze: 'layer' names no parameter")


def test_lr_scales_train_named_modules_at_a_multiple_of_the_rate_and_stay_fixed_for_the_run(data_root, tmp_path,
                                                                                                capsys):
    """training.lr_scales: e.g. a trained network at a fraction of the rate of new stems' estimators; the longest
    prefix decides, and a resume under other scales would give the optimizer's state to the wrong parameters."""
    scales = {"layers": 0.25, "layers.0": 0.5}
    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(
        data_root, training={"max_steps": 2, "lr_scales": scales}))
    trainer = Trainer(bsmamba2.load_config(config_path), tmp_path / "unused", quiet=True)
    lr = trainer.schedule.set_step(10)
    by_parameter = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in trainer.model.named_parameters():
        expected = 0.5 if name.startswith("layers.0.") else 0.25 if name.startswith("layers.") else 1.0
        assert by_parameter[id(parameter)] == pytest.approx(lr * expected), name
    assert train(config_path, tmp_path / "run") == 0
    assert train(config_path, tmp_path / "run", "--resume", "--set=training.lr_scales={layers: 0.1}") == 2
    assert "training.lr_scales is {'layers': 0.1} but the run" in capsys.readouterr().err
    assert train(config_path, tmp_path / "typo", "--set=training.lr_scales={layer: 0.1}") == 2
    assert capsys.readouterr().err.startswith("bsmamba2 train: error: training.lr_scales: 'layer' names no parameter")


def test_a_teacher_gives_its_estimates_as_the_targets_of_its_stems(data_root, tmp_path, capsys):
    """training.teacher: e.g. a four-stem model's vocals held to a vocals model's while the rest of it trains."""
    torch.manual_seed(1)
    teacher = build_model(tiny_config(data_root)).eval()  # a vocals model
    save_model(teacher, tmp_path / "teacher.ckpt")
    model = {"stems": ["vocals", "drums"]}
    distilled = {"teacher": str(tmp_path / "teacher.ckpt"), "teacher_stems": ["vocals"]}
    trainer = Trainer(tiny_config(data_root, model=model, training=distilled), tmp_path / "unused", quiet=True)
    mixture, targets = (torch.stack(items) for items in zip(trainer.train_set[0], trainer.train_set[1]))
    given = trainer.teacher.targets(mixture, targets)
    with torch.no_grad():
        torch.testing.assert_close(given[:, 0], teacher(mixture)[:, 0])
    assert torch.equal(given[:, 1], targets[:, 1]) and not torch.allclose(given[:, 0], targets[:, 0])

    config_path = write_config(tmp_path / "tiny.yaml", tiny_config_dict(data_root, model=model,
                                                                       training={"max_steps": 2, **distilled}))
    assert train(config_path, tmp_path / "run") == 0
    assert train(config_path, tmp_path / "drums", "--set=training.teacher_stems=[drums]") == 2
    assert capsys.readouterr().err == (f"bsmamba2 train: error: training.teacher {tmp_path / 'teacher.ckpt'}: has no "
                                       "stem 'drums' (it has vocals)\n")
    save_model(build_model(tiny_config(data_root, audio={"sample_rate": 16000})), tmp_path / "16k.ckpt")
    assert train(config_path, tmp_path / "16k", "--set", f"training.teacher={tmp_path / '16k.ckpt'}") == 2
    assert capsys.readouterr().err == (f"bsmamba2 train: error: training.teacher {tmp_path / '16k.ckpt'}: 16000 Hz, 2 "
                                       "channels; this run trains at 8000 Hz, 2 channels\n")
    assert train(config_path, tmp_path / "none", "--set=training.teacher_stems=[]") == 2
    assert "training.teacher_stems: name the stems a teacher is given for" in capsys.readouterr().err
