"""`bsmamba2 separate` driven as users run it: a subprocess on files generated here, with a tiny checkpoint.

Each subprocess pays the torch import, so one invocation checks many files at once where that is natural.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from bsmamba2.cli import main
from bsmamba2.pretrained import example_song
from bsmamba2.separate import Input, find_inputs
from separation_fixtures import noise, save_tiny_checkpoint, tiny_config, write_audio

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

# name: (sample rate, channels, samples); together: the formats, rates, channel counts and lengths users have
GOOD = {"stereo44.wav": (44100, 2, 44100), "mono22.flac": (22050, 1, 22050), "stereo48.ogg": (48000, 2, 480),
        "mono44.mp3": (44100, 1, 44100), "long48.wav": (48000, 2, 30 * 48000),
        "shorter_than_a_window.wav": (44100, 2, 100)}
BAD = {"missing.wav": "no such file", "empty.wav": "empty file", "text.mp3": "not an audio file",
       "cut.flac": "truncated", "three.wav": "has 3 channels", "no_audio_here": "no audio files"}


def separate(*args, cwd, check_rc=None, timeout=300):
    result = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert result.returncode == check_rc, result.stderr
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    save_tiny_checkpoint(root / "tiny.ckpt")
    inputs = root / "inputs"
    inputs.mkdir()
    for seed, (name, (rate, channels, samples)) in enumerate(GOOD.items()):
        write_audio(inputs / name, noise(channels, samples, seed=seed), rate)
    sf.write(inputs / "silence.wav", np.zeros((44100, 2)), 44100)
    wave = noise(2, 44100, seed=9)
    wave[:, 1000:1100], wave[0, 5000], wave[1, 6000] = np.nan, np.inf, -np.inf
    sf.write(inputs / "nan.wav", wave.T, 44100, subtype="FLOAT")
    (inputs / "empty.wav").touch()
    (inputs / "text.mp3").write_text("definitely not audio\n" * 50)
    cut = write_audio(inputs / "cut.flac", noise(2, 44100), 44100)
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    sf.write(inputs / "three.wav", noise(3, 4410).T, 44100)
    (inputs / "no_audio_here").mkdir()
    (inputs / "no_audio_here" / "notes.txt").write_text("no audio")
    return root


@pytest.fixture(scope="module")
def main_run(workspace):
    names = list(GOOD) + ["silence.wav", "nan.wav"] + list(BAD)
    started = time.perf_counter()
    result = separate(*[f"inputs/{name}" for name in names], "--checkpoint", "tiny.ckpt", "-o", "out",
                      cwd=workspace)
    return result, time.perf_counter() - started


def test_good_files_give_stems_of_the_same_length_rate_and_channels(workspace, main_run):
    result, seconds = main_run
    for name, (rate, channels, samples) in GOOD.items():
        for stem in ("vocals", "drums"):
            info = sf.info(workspace / "out" / Path(name).stem / f"{stem}.wav")
            assert (info.samplerate, info.channels, info.frames, info.subtype) == (rate, channels, samples, "PCM_24")
        assert f"inputs/{name}: " in result.stderr
    summaries = [line for line in result.stderr.splitlines() if "real-time factor" in line]
    assert len(summaries) == len(GOOD) + 2 and "long48.wav: 30.0 s of audio in" in result.stderr
    assert not list((workspace / "out").rglob("*partial*"))
    print(f"main CLI run: {seconds:.1f} s")


def test_silence_nan_and_inf_are_handled(workspace, main_run):
    result, _ = main_run
    for stem in ("vocals", "drums"):
        silent, _ = sf.read(workspace / "out" / "silence" / f"{stem}.wav")
        assert silent.shape == (44100, 2) and not silent.any()
        cleaned, _ = sf.read(workspace / "out" / "nan" / f"{stem}.wav")
        assert cleaned.shape == (44100, 2) and np.isfinite(cleaned).all() and np.abs(cleaned).max() > 1e-3
    assert "inputs/nan.wav: 202 NaN/Inf samples replaced by silence" in result.stderr


def test_bad_inputs_are_each_reported_on_one_line_and_the_rest_is_processed(main_run):
    result, _ = main_run
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BAD)
    for name, problem in BAD.items():
        assert sum(f"inputs/{name}" in line and problem in line for line in errors) == 1, (name, errors)
    assert result.stderr.endswith(f"\n{len(GOOD) + 2} separated, {len(BAD)} failed\n")  # each error once, no 0 count
    assert "Traceback" not in result.stderr


def test_existing_stems_are_kept_without_force_and_options_apply(workspace, main_run):
    vocals = workspace / "out" / "stereo44" / "vocals.wav"
    before = vocals.stat().st_mtime_ns
    script = subprocess.run([sys.executable, str(REPO / "separate.py"), "inputs/stereo44.wav", "--checkpoint",
                             "tiny.ckpt", "-o", "out"], cwd=workspace, capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    assert "inputs/stereo44.wav: skipped, its stems are there: out/stereo44/ (vocals.wav, drums.wav)" in script.stderr
    assert vocals.stat().st_mtime_ns == before

    result = separate("inputs/stereo44.wav", "inputs/mono22.flac", "--checkpoint", "tiny.ckpt", "-o", "out",
                      "--force", "--two-stems", "vocals", "--format", "flac", "--bit-depth", "16", "--filename",
                      "{stem}/{track}.{ext}", "--jobs", "2", "--chunk", "0.5", "--overlap", "0.5", "--batch-size",
                      "3", "--tta", "--quiet", cwd=workspace, check_rc=0)
    assert "%|" not in result.stderr and "real-time factor" not in result.stderr
    for track in ("stereo44", "mono22"):
        mixture, rate = sf.read(workspace / "inputs" / f"{track}.{'wav' if track == 'stereo44' else 'flac'}")
        vocal, vocal_rate = sf.read(workspace / "out" / "vocals" / f"{track}.flac")
        rest, _ = sf.read(workspace / "out" / "no_vocals" / f"{track}.flac")
        assert vocal_rate == rate and vocal.shape == rest.shape == mixture.shape
        np.testing.assert_allclose(vocal + rest, mixture, atol=2.5 / 32768)  # two 16-bit roundings
        assert np.abs(vocal).max() > 1e-3 and np.abs(rest).max() > 1e-3
    assert sf.info(workspace / "out" / "vocals" / "stereo44.flac").subtype == "PCM_16"


def test_folders_and_only_chosen_stems(workspace):
    album = workspace / "album"
    (album / "disc2").mkdir(parents=True)
    write_audio(album / "a.wav", noise(2, 8000), 44100)
    write_audio(album / "disc2" / "b.flac", noise(1, 8000), 48000)
    separate("album", "--recursive", "--stems", "drums", "--bit-depth", "32f", "--checkpoint", "tiny.ckpt",
             "-o", "out_album", cwd=workspace, check_rc=0)
    written = sorted(str(p.relative_to(workspace / "out_album")) for p in (workspace / "out_album").rglob("*.*"))
    assert written == ["a/drums.wav", "b/drums.wav"]
    assert sf.info(workspace / "out_album" / "b" / "drums.wav").subtype == "FLOAT"


def test_input_search(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.wav", "b.MP3", "notes.txt", "sub/c.flac"):
        (tmp_path / name).touch()
    pattern = str(tmp_path / "*.flac")
    files, problems = find_inputs([str(tmp_path), str(tmp_path / "a.wav"), pattern], False)
    assert files == [Input(tmp_path / "a.wav"), Input(tmp_path / "b.MP3")]
    assert problems == [(pattern, f"{pattern}: no file matches this pattern")]
    # {folder}: relative to the folder, or to the part of a pattern before its first wildcard
    files, problems = find_inputs([str(tmp_path / "**" / "*.flac"), str(tmp_path / "sub")], True)
    assert files == [Input(tmp_path / "sub" / "c.flac", "sub")] and problems == []
    files, problems = find_inputs([str(tmp_path)], True)
    assert [item.folder for item in files] == ["", "", "sub"]
    files, problems = find_inputs([str(tmp_path / "sub" / "missing.wav")], False)
    assert files == [Input(tmp_path / "sub" / "missing.wav")]  # reported when opened, like any unreadable file


def test_inputs_whose_stems_would_collide_and_no_input_means_the_example(workspace, capsys):
    """In process (no subprocess needed): two tracks named alike stop the run before any work, and the message
    gives a template that tells them apart."""
    (workspace / "again").mkdir(exist_ok=True)
    write_audio(workspace / "again" / "stereo44.flac", noise(2, 4000), 44100)
    out = workspace / "out_collide"
    status = main(["separate", str(workspace / "inputs" / "stereo44.wav"), str(workspace / "again" / "stereo44.flac"),
                   "--checkpoint", str(workspace / "tiny.ckpt"), "-o", str(out), "--quiet"])
    assert status == 2 and not out.exists()
    assert capsys.readouterr().err == (
        f"bsmamba2 separate: error: {workspace}/inputs/stereo44.wav and {workspace}/again/stereo44.flac would both "
        f"write {out}/stereo44/vocals.wav: use --filename '{{track}}_{{input_ext}}/{{stem}}.{{ext}}'\n")
    # no input: the bundled example song
    assert main(["separate", "--checkpoint", str(workspace / "tiny.ckpt"), "-o", str(out), "--quiet"]) == 0
    assert sf.info(out / "example" / "vocals.wav").frames == sf.info(example_song()).frames


@pytest.mark.slow
def test_torchrun_shares_the_files_out_across_ranks(workspace):
    names = ["stereo44.wav", "mono22.flac", "stereo48.ogg"]
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "bsmamba2", "separate",
                             *[f"inputs/{name}" for name in names], "--checkpoint", "tiny.ckpt", "-o", "out_ranks"],
                            cwd=workspace, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name, rank in zip(names, [0, 1, 0]):
        summaries = [line for line in output.splitlines() if f"inputs/{name}: " in line and "real-time" in line]
        assert len(summaries) == 1 and summaries[0].startswith(f"[rank {rank}]"), summaries
        assert (workspace / "out_ranks" / Path(name).stem / "drums.wav").exists()


@pytest.mark.slow
def test_bad_model_and_output_folder(workspace):
    config = tiny_config().to_dict()
    config["model"]["dim"] = 24
    (workspace / "wider.yaml").write_text(yaml.safe_dump(config))
    result = separate("inputs/stereo44.wav", "--checkpoint", "tiny.ckpt", "--config", "wider.yaml", "-o", "x",
                      cwd=workspace, check_rc=2)
    assert result.stderr.count("\n") == 1 and "checkpoint tiny.ckpt does not match the model config" in result.stderr

    (workspace / "a_file").touch()
    result = separate("inputs/stereo44.wav", "inputs/mono22.flac", "--checkpoint", "tiny.ckpt",
                      "-o", "a_file/out", cwd=workspace, check_rc=1)
    assert result.stderr.count("cannot write to a_file/out") == 2  # each once, at the time


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_run_leaves_no_stem_under_its_final_name(workspace, how):
    long = workspace / "two_minutes.wav"
    if not long.exists():
        write_audio(long, noise(2, 120 * 44100), 44100)
    out = workspace / f"out_interrupted_{how.name}"
    process = subprocess.Popen([sys.executable, "-m", "bsmamba2", "separate", long.name, "--checkpoint", "tiny.ckpt",
                                "-o", out.name, "--chunk", "0.25", "--batch-size", "1", "--quiet"], cwd=workspace,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until audio is being written
        partial = [p for p in out.rglob("*partial*")] if out.exists() else []
        if partial and all(p.stat().st_size > 50_000 for p in partial):
            break
        time.sleep(0.05)
    process.send_signal(how)
    if how == signal.SIGINT:  # the first Ctrl-C lets the file in progress finish; a second one stops at once
        time.sleep(0.5)
        process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert not (out / "two_minutes" / "vocals.wav").exists() and not (out / "two_minutes" / "drums.wav").exists()
    if how != signal.SIGKILL:
        assert process.returncode == 130 and "interrupted: 0 of 1 inputs done; run the same command again" in stderr
        assert not list(out.rglob("*partial*"))  # cleaned up on the way out
    else:
        assert process.returncode == -signal.SIGKILL and partial


def test_a_file_named_with_dots_gets_a_plain_track_name(tmp_path, monkeypatch):
    """`...wav` without its extension is "..": {track} would put its stems above the output folder."""
    monkeypatch.chdir(tmp_path)
    save_tiny_checkpoint(tmp_path / "tiny.ckpt")
    write_audio(tmp_path / "...wav", noise(2, 4410), 44100)
    assert main(["separate", "-q", "--checkpoint", "tiny.ckpt", "-o", "out/sub", "...wav"]) == 0
    assert sorted(path.relative_to(tmp_path).as_posix() for path in (tmp_path / "out").rglob("*.wav")) == [
        "out/sub/track/drums.wav", "out/sub/track/vocals.wav"]
