"""scripts/stem_errors.py: where a model's stems go wrong (level, leakage, artifacts, bands), run as a user runs it."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from separation_fixtures import noise, save_tiny_checkpoint, write_audio

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "stem_errors.py"
spec = importlib.util.spec_from_file_location("stem_errors", SCRIPT)
stem_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stem_errors)


def test_the_error_is_split_into_the_part_missing_the_leaks_and_the_rest():
    references = {"vocals": noise(2, 44100, seed=1), "drums": noise(2, 44100, seed=2)}
    artifacts = noise(2, 44100, seed=3, scale=0.01)
    estimate = 0.5 * references["vocals"] + 0.1 * references["drums"] + artifacts
    figures = stem_errors.stem_errors(references, "vocals", estimate, 44100)
    assert figures["error"]["vocals"] == pytest.approx(20 * np.log10(0.5), abs=0.1)   # half of the voice missing
    assert figures["error"]["drums"] == pytest.approx(20 * np.log10(0.1), abs=0.1)    # a tenth of the drums in it
    assert figures["artifacts"] == pytest.approx(20 * np.log10(0.1), abs=0.1)         # noise at a tenth the level
    assert figures["level"] == pytest.approx(10 * np.log10(0.25 + 0.01 + 0.01), abs=0.1)
    assert figures["usdr"] == pytest.approx(-10 * np.log10(0.25 + 0.01 + 0.01), abs=0.1)
    assert len(figures["bands"]) == len(stem_errors.BAND_EDGES_HZ) - 1


def test_reports_each_stem_of_a_folder_and_refuses_a_missing_one(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.ckpt")
    for index in range(2):
        track = tmp_path / "data" / "test" / f"song{index}"
        track.mkdir(parents=True)
        stems = {"vocals": noise(2, 22050, seed=10 + index), "drums": noise(2, 22050, seed=20 + index, scale=0.05),
                 "bass": noise(2, 22050, seed=30 + index, scale=0.05)}  # a stem the tiny model does not estimate
        for name, audio in {**stems, "mixture": sum(stems.values())}.items():
            write_audio(track / f"{name}.wav", audio, 44100)
    command = [sys.executable, str(SCRIPT), str(tmp_path / "data"), "--checkpoint", str(checkpoint), "--json",
               str(tmp_path / "errors.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line.split(" | ")[0] for line in done.stdout.splitlines()[2:]] == ["| vocals", "| drums"]
    figures = json.loads((tmp_path / "errors.json").read_text())
    assert sorted(figures["tracks"]) == ["song0", "song1"]
    assert list(figures["mean"]["vocals"]["error"]) == ["vocals", "drums", "bass"]   # the bass's leak is its own
    assert figures["mean"]["drums"]["usdr"] == pytest.approx(
        np.mean([track["drums"]["usdr"] for track in figures["tracks"].values()]), abs=0.01)
    missing = subprocess.run([*command[:2], str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error: data root")
