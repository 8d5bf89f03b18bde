"""`bsmamba2 separate` over a library, as someone running it overnight meets it: re-runs skip finished tracks and
fill in missing stems, Ctrl-C stops after the file in progress, every track says where its stems went, a JSON
report for scripts, templates that mirror a tree, lossy output formats, and the run-wide options."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bsmamba2.cli import main
from separation_fixtures import noise, save_tiny_checkpoint, write_audio

STEMS = ("vocals", "drums")


def separate(*args, cwd, umask=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bsmamba2", "separate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    save_tiny_checkpoint(root / "tiny.ckpt")
    return root


def stem_files(out: Path) -> dict:
    """{relative path: (inode, mtime_ns)} of every stem under `out`."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.rglob("*.wav"))}


@pytest.mark.slow
def test_a_library_run_again_separates_only_what_is_missing(root):
    library, out = root / "library", root / "library_out"
    library.mkdir()
    for index in range(6):
        write_audio(library / f"song{index}.wav", noise(2, 6000, seed=index), 44100)

    first = separate("library", "--checkpoint", "tiny.ckpt", "-o", out.name, cwd=root, umask=0o002)
    assert first.returncode == 0, first.stderr
    assert first.stderr.endswith("\n6 separated\n")  # no zero counts
    assert "\r" not in first.stderr  # no progress bar where stderr is not a terminal
    for index in range(6):  # each track says where its stems went, relative to the working directory
        assert f"library/song{index}.wav: 0.1 s of audio in " in first.stderr
        assert f"→ library_out/song{index}/ (vocals.wav, drums.wav)" in first.stderr
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*.wav")}
    assert modes == {0o664}  # what the umask allows, as for any file the user saves
    before = stem_files(out)
    assert len(before) == 12

    write_audio(library / "song6.wav", noise(2, 6000, seed=6), 44100)
    second = separate("library", "--checkpoint", "tiny.ckpt", "-o", out.name, cwd=root)
    assert second.returncode == 0, second.stderr
    assert second.stderr.endswith("\n1 separated, 6 skipped (stems already there)\n")
    assert ("library/song0.wav: skipped, its stems are there: library_out/song0/ (vocals.wav, drums.wav) "
            "(--force rewrites them)") in second.stderr
    after = stem_files(out)
    assert {path: after[path] for path in before} == before and len(after) == 14

    (out / "song3" / "drums.wav").unlink()
    third = separate("library", "--checkpoint", "tiny.ckpt", "-o", out.name, "--report", "report.json", cwd=root)
    assert third.returncode == 0, third.stderr
    assert "→ library_out/song3/ (drums.wav)" in third.stderr
    rewritten = stem_files(out)
    assert {path: value for path, value in rewritten.items() if path != "song3/drums.wav"} == \
           {path: value for path, value in after.items() if path != "song3/drums.wav"}
    assert (out / "song3" / "drums.wav").exists()

    report = json.loads((root / "report.json").read_text())
    assert (report["separated"], report["skipped"], report["failed"], report["interrupted"]) == (1, 6, 0, False)
    song3 = next(entry for entry in report["inputs"] if entry["input"] == "library/song3.wav")
    assert song3["status"] == "separated" and song3["written"] == ["drums"] and song3["error"] is None
    assert song3["outputs"] == {stem: f"library_out/song3/{stem}.wav" for stem in STEMS}
    assert song3["seconds"] == pytest.approx(6000 / 44100) and song3["real_time_factor"] > 0

    forced = separate("library/song0.wav", "--checkpoint", "tiny.ckpt", "-o", out.name, "--force", cwd=root)
    assert forced.returncode == 0  # one input: its own line ends the output, no summary
    assert forced.stderr.splitlines()[-1].startswith("library/song0.wav: 0.1 s of audio in ")
    assert all(stem_files(out)[f"song0/{stem}.wav"] != rewritten[f"song0/{stem}.wav"] for stem in STEMS)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_file_in_progress_and_the_same_command_finishes(root):
    slow = root / "slow"
    slow.mkdir()
    for index in range(4):
        write_audio(slow / f"take{index}.wav", noise(2, 15 * 44100, seed=index), 44100)
    command = [sys.executable, "-m", "bsmamba2", "separate", "slow", "--checkpoint", "tiny.ckpt", "-o", "slow_out",
               "--chunk", "0.25", "--batch-size", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not all((root / "slow_out" / "take0" / f"{stem}.wav").exists() for stem in STEMS):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "Ctrl-C: stopping after the file in progress" in stderr
    assert "of 4 inputs done; run the same command again to separate the rest" in stderr
    done = [index for index in range(4) if (root / "slow_out" / f"take{index}" / "drums.wav").exists()]
    assert done in ([0], [0, 1])  # the file in progress when Ctrl-C came is finished, nothing after it
    assert not list((root / "slow_out").rglob("*partial*"))

    again = subprocess.run(command[:-1], cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{4 - len(done)} separated, {len(done)} skipped" in again.stderr
    assert all((root / "slow_out" / f"take{index}" / f"{stem}.wav").exists() for index in range(4) for stem in STEMS)


@pytest.mark.slow
def test_templates_mirror_a_tree_and_collisions_are_caught_before_any_work(root):
    tree = root / "tree"
    for name in ("artist/album/one.flac", "artist/album/two.flac", "other/one.flac"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        write_audio(tree / name, noise(1, 4000), 22050)
    write_audio(root / "single.wav", noise(1, 4000), 22050)

    clash = separate("tree", "--recursive", "--checkpoint", "tiny.ckpt", "-o", "tree_out", cwd=root)
    assert clash.returncode == 2 and not (root / "tree_out").exists()
    assert clash.stderr == ("bsmamba2 separate: error: tree/artist/album/one.flac and tree/other/one.flac would both "
                            "write tree_out/one/vocals.wav: use --filename '{folder}/{track}/{stem}.{ext}'\n")

    mirrored = separate("tree", "single.wav", "--recursive", "--checkpoint", "tiny.ckpt", "-o", "tree_out",
                        "--filename", "{folder}/{track}.{input_ext}/{stem}.{ext}", "--stems", "drums", cwd=root)
    assert mirrored.returncode == 0, mirrored.stderr
    written = sorted(str(p.relative_to(root / "tree_out")) for p in (root / "tree_out").rglob("*") if p.is_file())
    assert written == ["artist/album/one.flac/drums.wav", "artist/album/two.flac/drums.wav",
                       "other/one.flac/drums.wav", "single.wav/drums.wav"]


def test_quiet_prints_only_problems_and_json_goes_to_stdout(root):
    write_audio(root / "good.wav", noise(2, 4000), 44100)
    (root / "bad.wav").write_text("not audio")
    result = separate("good.wav", "bad.wav", "missing_folder/*.wav", "--checkpoint", "tiny.ckpt", "-o", "quiet_out",
                      "--quiet", "--json", cwd=root)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: missing_folder/*.wav: no file matches this pattern",
        "error: bad.wav: not an audio file soundfile can read (Format not recognised.)"]  # each error once
    report = json.loads(result.stdout)
    assert [(entry["input"], entry["status"]) for entry in report["inputs"]] == [
        ("missing_folder/*.wav", "failed"), ("good.wav", "separated"), ("bad.wav", "failed")]
    assert report["inputs"][1]["outputs"] == {stem: f"quiet_out/good/{stem}.wav" for stem in STEMS}


def tones(rate: int, seconds: float) -> np.ndarray:
    """A stereo chord with a tremolo and band-limited noise: music-like, unlike white noise, which perceptual
    codecs are not built for."""
    t = np.arange(int(rate * seconds)) / rate
    chord = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate([220, 330, 440, 660, 990, 1320], 1))
    hiss = np.fft.irfft(np.fft.rfft(noise(2, len(t))) * (np.fft.rfftfreq(len(t), 1 / rate) < 8000), len(t))
    wave = 0.1 * np.stack([chord, np.roll(chord, 100)]) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t) ** 2) + 0.1 * hiss
    return wave.astype(np.float32)


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    # without the mean: Opus's encoder high-passes away the DC offset that an untrained model's stems carry
    reference, estimate = reference - reference.mean(0), estimate - estimate.mean(0)
    return 10 * np.log10((reference ** 2).sum() / ((reference - estimate) ** 2).sum())


@pytest.mark.slow
def test_lossy_formats_keep_length_rate_channels_and_sound(root):
    sf.write(root / "chord48.wav", tones(48000, 3).T, 48000, subtype="FLOAT")
    sf.write(root / "chord44.wav", tones(44100, 2)[:1].T, 44100, subtype="FLOAT")
    reference = separate("chord48.wav", "--checkpoint", "tiny.ckpt", "-o", "lossy", "--bit-depth", "32f", cwd=root)
    assert reference.returncode == 0, reference.stderr
    for file_format in ("mp3", "ogg", "opus"):
        result = separate("chord48.wav", "chord44.wav", "--checkpoint", "tiny.ckpt", "-o", "lossy", "--format",
                          file_format, cwd=root)
        assert result.returncode == 0, result.stderr
        if file_format == "mp3":  # another format's stems are another output, written beside the kept wav ones
            assert ("chord48.wav: stems in another format are there too: lossy/chord48/ (vocals.wav, drums.wav) "
                    "(kept: each format is an output of its own)") in result.stderr
            assert "chord44.wav: stems in another format" not in result.stderr
        for stem in STEMS:
            wav, _ = sf.read(root / "lossy" / "chord48" / f"{stem}.wav")
            lossy, rate = sf.read(root / "lossy" / "chord48" / f"{stem}.{file_format}")
            assert (rate, lossy.shape) == (48000, wav.shape)
            assert sdr(wav, lossy) >= 20, (file_format, stem, sdr(wav, lossy))
            mono = sf.info(root / "lossy" / "chord44" / f"{stem}.{file_format}")
            rate = 48000 if file_format == "opus" else 44100  # Opus streams have no 44.1 kHz: written at 48 kHz
            assert (mono.samplerate, mono.channels, mono.frames) == (rate, 1, 2 * rate)

    small = separate("chord48.wav", "--checkpoint", "tiny.ckpt", "-o", "lossy128", "--format", "mp3",
                     "--bitrate", "128", cwd=root)
    assert small.returncode == 0, small.stderr
    kbps = (root / "lossy128" / "chord48" / "vocals.mp3").stat().st_size * 8 / 3 / 1000
    assert 120 <= kbps <= 140  # constant bitrate, plus the small header


@pytest.mark.parametrize("options, message", [
    (["--format", "mp3", "--bit-depth", "24"], "bit depth 24: mp3 is lossy and has no bit depth; set its size "
                                               "with a bitrate"),
    (["--format", "flac", "--bitrate", "192"], "bitrate 192: flac is lossless; a bitrate applies to mp3, ogg, opus"),
    (["--format", "mp3", "--bitrate", "500"], "bitrate 500: mp3 takes 32 to 320 kbps"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
])
def test_output_options_that_do_not_fit_stop_before_any_work(root, capsys, options, message):
    status = main(["separate", str(root / "nothing.wav"), "--checkpoint", str(root / "tiny.ckpt"), "-o",
                   str(root / "never"), *options])
    assert status == 2 and capsys.readouterr().err == f"bsmamba2 separate: error: {message}\n"
    assert not (root / "never").exists()


def test_a_format_the_local_libsndfile_cannot_write_says_what_is_missing(root, capsys, monkeypatch):
    formats = {name: text for name, text in sf.available_formats().items() if name != "MP3"}
    monkeypatch.setattr(sf, "available_formats", lambda: formats)
    status = main(["separate", str(root / "nothing.wav"), "--checkpoint", str(root / "tiny.ckpt"), "-o",
                   str(root / "never"), "--format", "mp3"])
    assert status == 2 and not (root / "never").exists()
    assert capsys.readouterr().err == (
        f"bsmamba2 separate: error: format mp3: the libsndfile here ({sf.__libsndfile_version__}) cannot write MP3 "
        "MPEG_LAYER_III; libsndfile >= 1.1 can, and the soundfile >= 0.12 wheels bundle it: pip install --upgrade "
        "soundfile\n")


@pytest.mark.slow
def test_threads_sets_torchs_threads_and_defaults_to_every_core(root):
    write_audio(root / "short.wav", noise(2, 2000), 44100)
    code = ("import sys, torch\n"
            "from bsmamba2.cli import main\n"
            "from bsmamba2.runtime import cpu_count\n"
            "status = main(['separate', 'short.wav', '--checkpoint', 'tiny.ckpt', '-o', 'threads_out', '--force',"
            " '--quiet', *sys.argv[1:]])\n"
            "print(status, torch.get_num_threads(), cpu_count())\n")
    for extra, expected in ((["--threads", "1"], lambda cores: 1), ([], lambda cores: cores)):
        done = subprocess.run([sys.executable, "-c", code, *extra], cwd=root, capture_output=True, text=True,
                              timeout=120)
        status, threads, cores = map(int, done.stdout.split())
        assert status == 0 and threads == expected(cores), (done.stdout, done.stderr)
