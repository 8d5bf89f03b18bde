"""The Python API (`bsmamba2.Separator`) with a tiny two-stem checkpoint, in process."""

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from bsmamba2 import Separator
from bsmamba2.api import check_filename_template
from bsmamba2.checkpoint import atomic_save, read_checkpoint
from bsmamba2.errors import BSMamba2Error
from separation_fixtures import noise, save_tiny_checkpoint, tiny_config, write_audio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.ckpt")


@pytest.fixture(scope="module")
def separator(checkpoint):
    return Separator(checkpoint, device="cpu", chunk_seconds=0.5)


def test_every_array_layout_gives_the_same_stems(separator):
    wave = noise(2, 20_000, seed=1)
    stems = separator.separate(wave, 44100)
    assert list(stems) == ["vocals", "drums"]
    assert all(stem.shape == (2, 20_000) and stem.dtype == np.float32 for stem in stems.values())
    assert np.abs(stems["vocals"] - stems["drums"]).max() > 1e-3  # two different mask estimators
    transposed = separator.separate(wave.T.copy(), 44100)
    tensor = separator.separate(torch.from_numpy(wave), 44100)
    for name in stems:
        np.testing.assert_array_equal(transposed[name], stems[name].T)
        np.testing.assert_array_equal(tensor[name], stems[name])
    mono = separator.separate(wave[0], 44100)
    assert mono["vocals"].shape == (20_000,)


@pytest.mark.parametrize("rate,samples", [(22050, 12_345), (48000, 24_001), (44100, 100)])
def test_lengths_are_sample_accurate_at_any_rate(separator, rate, samples):
    stems = separator.separate(noise(2, samples), rate)
    assert {stem.shape for stem in stems.values()} == {(2, samples)}
    assert all(np.isfinite(stem).all() for stem in stems.values())


def test_chunked_output_does_not_depend_on_batching(checkpoint, separator):
    wave = noise(2, 60_000, seed=2)
    batched = Separator(checkpoint, device="cpu", chunk_seconds=0.5, batch_size=3).separate(wave, 44100)
    for name, stem in separator.separate(wave, 44100).items():
        np.testing.assert_allclose(batched[name], stem, atol=1e-5)


def test_two_stems_add_up_to_the_mixture(checkpoint):
    separator = Separator(checkpoint, device="cpu", two_stems="drums", chunk_seconds=0.5)
    wave = noise(2, 30_000, seed=3)
    stems = separator.separate(wave, 48000)
    assert list(stems) == ["drums", "no_drums"]
    np.testing.assert_allclose(stems["drums"] + stems["no_drums"], wave, atol=1e-6)
    assert np.abs(stems["drums"]).max() > 1e-3 and np.abs(stems["no_drums"]).max() > 1e-3


def test_separate_file_writes_what_separate_returns(separator, checkpoint, tmp_path):
    wave = noise(1, 30_000, seed=4)
    path = write_audio(tmp_path / "song.flac", wave, 22050)
    decoded, _ = sf.read(path, dtype="float32", always_2d=True)
    in_memory = separator.separate_file(path)
    expected = separator.separate(decoded.T, 22050)
    float_writer = Separator(checkpoint, device="cpu", chunk_seconds=0.5, bit_depth="32f", jobs=3)
    paths = float_writer.separate_file(path, tmp_path / "out")
    assert paths == {name: tmp_path / "out" / "song" / f"{name}.wav" for name in ("vocals", "drums")}
    for name in expected:
        np.testing.assert_array_equal(in_memory[name], expected[name])
        written, rate = sf.read(paths[name], dtype="float32", always_2d=True)
        assert rate == 22050 and written.shape == (30_000, 1)  # mono in, mono out
        np.testing.assert_array_equal(written.T, expected[name])  # --jobs 3: same samples, in order


def test_separate_file_again_writes_only_missing_stems_unless_forced(checkpoint, tmp_path):
    """The command line's re-run rule: a finished track is not separated again, a missing stem is written, and
    `force` rewrites every stem (a rewritten file is a new one: its inode changes)."""
    path = write_audio(tmp_path / "song.wav", noise(2, 8000, seed=7), 44100)
    separator = Separator(checkpoint, device="cpu", chunk_seconds=0.5)
    paths = separator.separate_file(path, tmp_path / "out")
    inodes = {name: stem.stat().st_ino for name, stem in paths.items()}
    assert separator.missing_stems(path, tmp_path / "out") == []
    calls = []
    assert separator.separate_file(path, tmp_path / "out", on_progress=lambda *_: calls.append(1)) == paths
    assert calls == [] and {name: stem.stat().st_ino for name, stem in paths.items()} == inodes  # nothing run

    expected = sf.read(paths["drums"], dtype="float32")[0]
    paths["drums"].unlink()
    assert separator.missing_stems(path, tmp_path / "out") == ["drums"]
    assert separator.separate_file(path, tmp_path / "out") == paths  # every stem's path, kept or written
    assert paths["vocals"].stat().st_ino == inodes["vocals"]
    np.testing.assert_array_equal(sf.read(paths["drums"], dtype="float32")[0], expected)
    assert separator.separate_file(path, tmp_path / "out", only=["vocals"]) == {"vocals": paths["vocals"]}

    forced = Separator(checkpoint, device="cpu", chunk_seconds=0.5, force=True)
    assert forced.missing_stems(path, tmp_path / "out") == ["vocals", "drums"]
    forced.separate_file(path, tmp_path / "out")
    assert paths["vocals"].stat().st_ino != inodes["vocals"]


def test_separate_file_writes_only_the_stems_asked_for_under_their_folder(checkpoint, tmp_path):
    path = write_audio(tmp_path / "song.wav", noise(2, 8000, seed=5), 44100)
    separator = Separator(checkpoint, device="cpu", chunk_seconds=0.5, bit_depth="32f",
                          filename="{folder}/{track}_{input_ext}/{stem}.{ext}")
    everything = separator.separate_file(path)
    paths = separator.separate_file(path, tmp_path / "out", folder="live/2019", only=["drums"])
    assert paths == {"drums": tmp_path / "out" / "live" / "2019" / "song_wav" / "drums.wav"}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.*")) == ["drums.wav"]
    written, _ = sf.read(paths["drums"], dtype="float32", always_2d=True)
    np.testing.assert_array_equal(written.T, everything["drums"])  # the drums of the full run, not another stem
    assert separator.output_paths(path, tmp_path / "out")["vocals"] == tmp_path / "out" / "song_wav" / "vocals.wav"
    both = separator.separate_file(path, tmp_path / "both", only=["drums", "vocals"])  # in any order
    for name, stem_path in both.items():
        np.testing.assert_array_equal(sf.read(stem_path, dtype="float32", always_2d=True)[0].T, everything[name])
    with pytest.raises(BSMamba2Error, match="^stem 'bass': the outputs are vocals, drums$"):
        separator.separate_file(path, tmp_path / "out", only=["bass"])


def test_progress_is_reported_per_block_and_can_stop_the_file(checkpoint, tmp_path):
    path = write_audio(tmp_path / "song.wav", noise(2, 44100 * 3, seed=6), 44100)
    separator = Separator(checkpoint, device="cpu", chunk_seconds=0.5)
    calls = []
    separator.separate_file(path, tmp_path / "out", on_progress=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 3 and calls[-1] == (3.0, 3.0)
    assert all(0 < a[0] < b[0] for a, b in zip(calls, calls[1:])) and {total for _, total in calls} == {3.0}

    class Stop(Exception):
        pass

    def stop_halfway(done, total):
        if done > total / 2:
            raise Stop

    with pytest.raises(Stop):
        separator.separate_file(path, tmp_path / "stopped", on_progress=stop_halfway)
    assert not [p for p in (tmp_path / "stopped").rglob("*") if p.is_file()]  # no stem, not even a partial one


def test_silence_in_silence_out(separator):
    stems = separator.separate(np.zeros((2, 5000), np.float32), 44100)
    assert all(np.all(stem == 0) for stem in stems.values())


def test_tta_changes_the_estimate_but_not_its_shape(checkpoint, separator):
    wave = noise(2, 10_000, seed=5)
    plain = separator.separate(wave, 44100)
    tta = Separator(checkpoint, device="cpu", chunk_seconds=0.5, tta=True).separate(wave, 44100)
    assert tta["vocals"].shape == plain["vocals"].shape
    assert 1e-4 < np.abs(tta["vocals"] - plain["vocals"]).max()


def test_a_published_style_checkpoint_loads(checkpoint, separator, tmp_path):
    """Weights nested under `state_dict` with a `model.` prefix, as Lightning saves them, plus a config."""
    ours = read_checkpoint(checkpoint)
    nested = tmp_path / "lightning.ckpt"
    atomic_save({"state_dict": {f"model.{key}": value for key, value in ours["model"].items()}}, nested)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config().to_dict()))
    wave = noise(2, 8000, seed=6)
    published = Separator(nested, device="cpu", config=config, chunk_seconds=0.5).separate(wave, 44100)
    np.testing.assert_array_equal(published["vocals"], separator.separate(wave, 44100)["vocals"])


def test_option_errors_are_one_clear_line(checkpoint):
    cases = [({"stems": ["bass"]}, "stem 'bass': this model has vocals, drums"),
             ({"two_stems": "vocals", "stems": ["drums"]}, "either stems or two_stems"),
             ({"overlap": 1.0}, r"overlap 1.0: must be in \[0, 1\)"),
             ({"chunk_seconds": 0.0}, "chunk seconds 0.0: must be positive"),
             ({"batch_size": 0}, "batch size 0: must be positive"),
             ({"jobs": 0}, "jobs 0: must be at least 1"),
             ({"model": "any-name"}, "either a checkpoint or a model"),
             ({"filename": "{track}.{ext}"}, "^filename '{track}.{ext}': needs {stem}"),
             ({"file_format": "flac", "bit_depth": "32f"}, "^bit depth 32f: FLAC stores integers only"),
             ({"file_format": "mp3", "bitrate": 8}, "^bitrate 8: mp3 takes 32 to 320 kbps"),
             ({"quantize": "int4"}, "^quantize int4: expected int8"),
             ({"device": "tpu"}, "^device tpu: expected")]
    for options, message in cases:
        with pytest.raises(BSMamba2Error, match=message) as raised:
            Separator(checkpoint, **{"device": "cpu", **options})
        assert "--" not in str(raised.value)  # in the API's words, not the command line's flags
    for template, message in [("{album}/{stem}.{ext}", "bad template"), ("../{stem}.{ext}", "relative path")]:
        with pytest.raises(BSMamba2Error, match=message):
            check_filename_template(template)


def test_a_one_stem_model_also_gives_what_it_leaves_of_the_mixture(tmp_path):
    config = tiny_config()
    config.model.stems = ["vocals"]
    checkpoint = save_tiny_checkpoint(tmp_path / "vocals.ckpt", config)
    wave = noise(2, 8000)
    stems = Separator(checkpoint, device="cpu").separate(wave, 44100)
    assert list(stems) == ["vocals", "no_vocals"]
    np.testing.assert_allclose(stems["vocals"] + stems["no_vocals"], wave, atol=1e-6)
    assert np.abs(stems["vocals"]).max() > 1e-3 and np.abs(stems["no_vocals"]).max() > 1e-3
    only = Separator(checkpoint, device="cpu", stems=["vocals"]).separate(wave, 44100)
    assert list(only) == ["vocals"]


def test_output_paths_stay_inside_the_output_folder(separator, tmp_path):
    out = tmp_path / "out"
    # the name of `...wav` without its extension is "..": as a track name, it would climb out of the folder
    assert separator.output_paths(tmp_path / "...wav", out) == {"vocals": out / "track" / "vocals.wav",
                                                                "drums": out / "track" / "drums.wav"}
    with pytest.raises(BSMamba2Error, match=f"^../../song/vocals.wav: refused, it would be written outside the "
                                            f"output folder {out}$"):
        separator.output_paths(tmp_path / "song.wav", out, folder="../..", filename="{folder}/{track}/{stem}.{ext}")
