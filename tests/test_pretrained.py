"""The bundled default model and example song: what README's first command runs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import bsmamba2
from bsmamba2.cli import main
from bsmamba2.metrics import usdr
from bsmamba2.tracks import list_tracks, read_stem
from bsmamba2.pretrained import CHECKPOINT, EXAMPLE

# A small rendered set (4 train, 2 test songs of 12 s) in ../shared, the project's shared development folder
# beside the repository; `python tools/gen_multitrack.py DIR --subset test --tracks 2 --duration 12 --seed 2
# --p-instrumental 0` renders songs like its test ones (docs/training.md, "Synthetic data").
SYNTH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synth-dev"
# Vocals uSDR that the shipped weights reach on every synth-dev test song (unseen in training; measured
# 9.5 and 9.3 dB): a regression guard for the weights and the whole separation path.
MIN_VOCALS_USDR = 7.5


def test_bundled_model_is_the_default_and_small():
    assert CHECKPOINT.stat().st_size <= 20 * 2 ** 20
    model = bsmamba2.load_model()
    assert model.stems == ["vocals"] and not model.training


@pytest.mark.slow
def test_separate_without_arguments_separates_the_example(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    mixture, rate = sf.read(EXAMPLE, dtype="float32")
    vocals, vocals_rate = sf.read(tmp_path / "separated" / "example" / "vocals.wav", dtype="float32")
    rest, _ = sf.read(tmp_path / "separated" / "example" / "no_vocals.wav", dtype="float32")
    assert vocals_rate == rate and vocals.shape == rest.shape == mixture.shape
    np.testing.assert_allclose(vocals + rest, mixture, atol=1e-4)  # 24-bit files
    assert 0.01 < np.sqrt(np.mean(vocals ** 2)) < np.sqrt(np.mean(mixture ** 2))


@pytest.mark.slow
@pytest.mark.skipif(not SYNTH_DEV.is_dir(), reason=f"{SYNTH_DEV} (rendered songs the model never heard) not present")
def test_bundled_model_separates_vocals_of_unseen_songs(tmp_path):
    assert main(["evaluate", "--data", str(SYNTH_DEV), "--subset", "test", "-o", str(tmp_path), "--no-csdr",
                 "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for track in list_tracks(SYNTH_DEV, "test"):
        score = results["tracks"][track.name]["vocals"]["usdr"]
        mixture_score = usdr(read_stem(track, "vocals"), read_stem(track, "mixture"))
        assert score > max(MIN_VOCALS_USDR, mixture_score + 6), (track.name, score, mixture_score)
