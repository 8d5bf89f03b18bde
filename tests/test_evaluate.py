import csv
import json
import math
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from bsmamba2 import build_model
from bsmamba2.checkpoint import save_model
from bsmamba2.cli import main
from bsmamba2.config import Config
from bsmamba2.metrics import score_track, usdr
from bsmamba2.tracks import read_stem

RATE = 8000
STEMS = ["vocals", "drums"]
TRACKS = ["song a", "song b"]  # song b has silent drums: its drums scores are undefined


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An untrained tiny two-stem model and a two-track MUSDB18-HQ-style test set at 8 kHz."""
    root = tmp_path_factory.mktemp("evaluate")
    config = Config.from_dict({
        "audio": {"sample_rate": RATE, "n_fft": 32, "hop_length": 8},
        "model": {"stems": STEMS, "dim": 16, "depth": 1, "band_widths": [4, 4, 9], "d_state": 16, "headdim": 16,
                  "expand": 2, "mask_hidden_factor": 2},
        "inference": {"chunk_seconds": 1.0, "batch_size": 4},
    })
    torch.manual_seed(0)
    save_model(build_model(config), root / "tiny.ckpt")
    rng = np.random.default_rng(0)
    for index, track in enumerate(TRACKS):
        frames = int((2.5 + 0.5 * index) * RATE)
        sources = {name: rng.uniform(-0.2, 0.2, (2, frames)) for name in ("vocals", "drums", "bass")}
        if track == "song b":
            sources["drums"][:] = 0.0
        sources["mixture"] = sum(sources.values())
        for name, audio in sources.items():
            path = root / "data" / "test" / track / f"{name}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, audio.T, RATE, subtype="PCM_16")
    return root


def evaluate(workspace, *options):
    return main(["evaluate", "--checkpoint", str(workspace / "tiny.ckpt"), "--data", str(workspace / "data"),
                 "--device", "cpu", "--quiet", *options])


@pytest.fixture(scope="module")
def evaluated(workspace):
    pytest.importorskip("museval")
    out = workspace / "results"
    assert evaluate(workspace, "-o", str(out), "--save-estimates") == 0
    return out


def test_results_json_holds_each_track_and_stem_as_the_metrics_compute_them(workspace, evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    assert set(results) == {"tracks", "aggregate"}
    assert list(results["tracks"]) == TRACKS
    for track in TRACKS:
        track_dir = workspace / "data" / "test" / track
        estimates_dir = evaluated / "estimates" / "test" / track
        references = {stem: read_stem(track_dir, stem) for stem in STEMS}
        estimates = {stem: read_stem(estimates_dir, stem) for stem in STEMS}
        assert all(estimates[stem].shape == references[stem].shape for stem in STEMS)
        expected = score_track(references, estimates, read_stem(track_dir, "mixture"), RATE)
        for stem in STEMS:
            scores = results["tracks"][track][stem]
            assert set(scores) == {"usdr", "csdr"}
            for metric in ("usdr", "csdr"):
                value = expected[stem][metric]
                assert scores[metric] == (None if math.isnan(value) else value)
            if scores["usdr"] is not None:
                assert scores["usdr"] == usdr(references[stem], estimates[stem])
    assert results["tracks"]["song b"]["drums"] == {"usdr": None, "csdr": None}
    assert all(results["tracks"][track]["vocals"]["csdr"] is not None for track in TRACKS)


def test_aggregates_are_over_the_defined_scores(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    for stem, counted in (("vocals", TRACKS), ("drums", ["song a"])):
        for metric in ("usdr", "csdr"):
            values = [results["tracks"][track][stem][metric] for track in counted]
            assert results["aggregate"][stem][metric] == pytest.approx(
                {"mean": np.mean(values), "median": np.median(values), "std": np.std(values),
                 "count": len(values)}, rel=1e-12)


def test_csv_has_one_row_per_track_and_stem(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    with open(evaluated / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["track"], row["stem"]) for row in rows] == [(t, s) for t in TRACKS for s in STEMS]
    for row in rows:
        for metric in ("usdr", "csdr"):
            value = results["tracks"][row["track"]][row["stem"]][metric]
            assert (row[metric] == "") if value is None else float(row[metric]) == pytest.approx(value, abs=1e-6)


def test_table_is_printed_and_results_are_not_overwritten(workspace, evaluated, capsys):
    capsys.readouterr()
    assert evaluate(workspace, "-o", str(evaluated), "--no-csdr") == 2
    assert "results.json already exists (use --force to overwrite)" in capsys.readouterr().err
    assert evaluate(workspace, "-o", str(evaluated), "--no-csdr", "--force", "--tracks", "song a") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["track", "uSDR", "vocals", "cSDR", "vocals", "uSDR", "drums", "cSDR", "drums"]
    rerun = json.loads((evaluated / "results.json").read_text())
    assert list(rerun["tracks"]) == ["song a"]
    assert rerun["tracks"]["song a"]["vocals"]["csdr"] is None
    assert rerun["aggregate"]["vocals"]["csdr"] == {"mean": None, "median": None, "std": None, "count": 0}
    song_a = rerun["tracks"]["song a"]
    assert table[1].split() == ["song", "a", f"{song_a['vocals']['usdr']:.2f}", "n/a",
                                f"{song_a['drums']['usdr']:.2f}", "n/a"]
    assert [line.split()[0] for line in table[3:]] == ["mean", "median"]


def test_missing_museval_is_reported_once_and_usdr_still_computed(workspace, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "museval", None)  # makes `import museval` fail
    assert evaluate(workspace, "-o", str(tmp_path), "--tracks", "song a") == 0
    warnings = [record.getMessage() for record in caplog.records if "cSDR unavailable" in record.getMessage()]
    assert len(warnings) == 1 and "museval is not installed" in warnings[0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tracks"]["song a"]["vocals"]["csdr"] is None
    assert results["tracks"]["song a"]["vocals"]["usdr"] is not None


@pytest.mark.parametrize("options, message", [
    (["--data", "{root}/nowhere"], "nowhere is not a directory"),
    (["--subset", "train"], "no subset 'train'"),
    (["--tracks", "song a", "song z"], "no track named 'song z'"),
])
def test_bad_data_arguments_fail_with_one_line(workspace, tmp_path, capsys, options, message):
    options = [option.replace("{root}", str(workspace)) for option in options]
    assert evaluate(workspace, "-o", str(tmp_path), *options) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and error.startswith("bsmamba2 evaluate: error:")
    assert not (tmp_path / "results.json").exists()


def test_an_unusable_output_folder_fails_with_one_line(workspace, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert evaluate(workspace, "-o", str(tmp_path / "taken"), "--no-csdr") == 2
    error = capsys.readouterr().err.strip()
    assert f"cannot create the output folder {tmp_path / 'taken'}" in error and len(error.splitlines()) == 1


def test_a_track_without_a_model_stem_fails_before_separating(workspace, tmp_path, capsys):
    broken = tmp_path / "data" / "test" / "song c"
    broken.mkdir(parents=True)
    for name in ("mixture", "vocals"):
        sf.write(broken / f"{name}.wav", np.zeros((RATE, 2)), RATE)
    assert main(["evaluate", "--checkpoint", str(workspace / "tiny.ckpt"), "--data", str(tmp_path / "data"),
                 "-o", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "song c: no drums stem (drums.wav or drums.flac)" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
