"""The synthetic data generator (tools/gen_multitrack.py) and its driver (scripts/render_synth.py), run as a user
runs them. Rendering needs a synthesis backend; the one that needs no system package is tinysoundfont with
pretty_midi's bundled General MIDI soundfont, so that test runs only where those two are installed."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
STEMS = ("vocals", "drums", "bass", "other")


def test_generator_help_runs_without_its_optional_dependencies():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_multitrack.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--tracks" in result.stdout and "--soundfont" in result.stdout


def pretty_midi_soundfont():
    spec = importlib.util.find_spec("pretty_midi")  # located, not imported: importing it needs mido
    if spec is None or importlib.util.find_spec("tinysoundfont") is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "TimGM6mb.sf2"
    return path if path.is_file() else None


@pytest.mark.skipif(pretty_midi_soundfont() is None, reason="needs tinysoundfont and pretty_midi (its soundfont)")
def test_render_synth_renders_a_musdb_style_song_with_the_in_repo_generator(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "render_synth.py"), str(tmp_path), "--tracks",
                             "1", "--duration", "3", "--seed", "5", "--vocals", "gm",
                             "--soundfont", str(pretty_midi_soundfont())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    song = tmp_path / "train" / "synth_0005_00000"
    assert "rendered 1 of 1" in result.stdout, result.stdout
    mixture, rate = sf.read(song / "mixture.wav", dtype="float32")
    assert rate == 44100 and mixture.shape == (3 * 44100, 2)
    stems = [sf.read(song / f"{stem}.wav", dtype="float32")[0] for stem in STEMS]
    np.testing.assert_allclose(sum(stems), mixture, atol=4 / 2 ** 15)  # 16-bit files, four roundings
    assert np.abs(mixture).max() > 0.01  # music, not silence
    assert json.loads((song / "meta.json").read_text())["name"] == song.name
