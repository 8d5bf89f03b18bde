"""The bundled models and example song: what README's first command runs."""
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
from bsmamba2 import hub
from bsmamba2.pretrained import EXAMPLE

# A small rendered set (4 train, 2 test songs of 12 s) in ../shared, the project's shared development folder
# beside the repository; `python tools/gen_multitrack.py DIR --subset test --tracks 2 --duration 12 --seed 2
# --p-instrumental 0` renders songs like its test ones (docs/training.md, "Synthetic data").
SYNTH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synth-dev"
# uSDR per stem that the default model reaches on every synth-dev test song (unseen in training; what it measures
# on the two songs: its model card, "Scores"), less a margin of about half a dB or more: a regression guard for the
# weights and the whole separation path.
MIN_USDR = {"vocals": 8.5, "drums": 3.5, "bass": 4.0, "other": 3.9}
FOUR_STEMS = ["vocals", "drums", "bass", "other"]


def test_bundled_models_are_small_and_the_default_gives_four_stems():
    bundled = {name: entry for name, entry in hub.registry().items() if entry.package_file is not None}
    assert set(bundled) >= {"synth-4stem", "synth-vocals"}
    for name, entry in bundled.items():
        assert hub.local_path(entry).stat().st_size <= 20 * 2 ** 20, name
        assert bsmamba2.load_model(hub.local_path(entry)).stems == list(entry.stems), name
    model = bsmamba2.load_model()
    assert hub.DEFAULT_MODEL == "synth-4stem" and model.stems == FOUR_STEMS and not model.training


@pytest.mark.slow
def test_separate_without_arguments_writes_every_stem_of_the_example(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    mixture, rate = sf.read(EXAMPLE, dtype="float32")
    folder = tmp_path / "separated" / "example"
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{stem}.wav" for stem in FOUR_STEMS)
    stems = {}
    for stem in FOUR_STEMS:
        stems[stem], stem_rate = sf.read(folder / f"{stem}.wav", dtype="float32")
        assert stem_rate == rate and stems[stem].shape == mixture.shape
        assert 0.005 < np.sqrt(np.mean(stems[stem] ** 2)) < np.sqrt(np.mean(mixture ** 2)), stem
    # the drums, bass and other share what the vocals leave: the four add back up to the song (24-bit files)
    np.testing.assert_allclose(sum(stems.values()), mixture, atol=1e-4)


@pytest.mark.slow
def test_two_stems_vocals_gives_vocals_and_the_rest(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", "--quiet", "--two-stems", "vocals"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    mixture, rate = sf.read(EXAMPLE, dtype="float32")
    folder = tmp_path / "separated" / "example"
    assert sorted(path.name for path in folder.iterdir()) == ["no_vocals.wav", "vocals.wav"]
    vocals, vocals_rate = sf.read(folder / "vocals.wav", dtype="float32")
    rest, _ = sf.read(folder / "no_vocals.wav", dtype="float32")
    assert vocals_rate == rate and vocals.shape == rest.shape == mixture.shape
    np.testing.assert_allclose(vocals + rest, mixture, atol=1e-4)  # 24-bit files
    assert 0.01 < np.sqrt(np.mean(vocals ** 2)) < np.sqrt(np.mean(mixture ** 2))


@pytest.mark.slow
@pytest.mark.skipif(not SYNTH_DEV.is_dir(), reason=f"{SYNTH_DEV} (rendered songs the model never heard) not present")
def test_default_model_separates_every_stem_of_unseen_songs(tmp_path):
    assert main(["evaluate", "--data", str(SYNTH_DEV), "--subset", "test", "-o", str(tmp_path), "--no-csdr",
                 "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for track in list_tracks(SYNTH_DEV, "test"):
        for stem, minimum in MIN_USDR.items():
            score = results["tracks"][track.name][stem]["usdr"]
            mixture_score = usdr(read_stem(track, stem), read_stem(track, "mixture"))
            assert score > max(minimum, mixture_score + 3), (track.name, stem, score, mixture_score)
