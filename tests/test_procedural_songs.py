"""Songs synthesised with numpy (tools/procedural_songs.py) and the generalisation check built on its held-out
family (scripts/generalisation.py), run as a user runs them. The held-out voices need Debian's flite."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bsmamba2.metrics import usdr

REPO = Path(__file__).resolve().parents[1]
STEMS = ("vocals", "drums", "bass", "other")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


songs = load(REPO / "tools" / "procedural_songs.py")
generalisation = load(REPO / "scripts" / "generalisation.py")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite (apt-get install flite)")
# a song of the default voices ("mix") may be spoken by any festival speaker
needs_festival = pytest.mark.skipif(not all(map(songs.voice_installed, songs.FESTIVAL_VOICES)),
                                    reason="needs festival and the festvox packages in tools/procedural_songs.py")


@needs_festival
def test_renders_musdb_style_songs_whose_mixture_is_the_sum(tmp_path):
    command = [sys.executable, str(REPO / "tools" / "procedural_songs.py"), str(tmp_path), "--tracks", "2",
               "--duration", "3", "--seed", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    folders = sorted((tmp_path / "train").iterdir())
    assert [folder.name for folder in folders] == ["proc_synth_4_00000", "proc_synth_4_00001"]
    for folder in folders:
        audio = {stem: sf.read(folder / f"{stem}.wav", dtype="int16")[0].astype(np.int32)
                 for stem in (*STEMS, "mixture")}
        assert audio["mixture"].shape == (3 * songs.RATE, 2)
        assert np.array_equal(audio["mixture"], sum(audio[stem] for stem in STEMS))
        assert all(np.abs(audio[stem]).max() > 100 for stem in ("drums", "bass", "other"))
    # a second run skips finished songs and leaves them as they are
    before = (folders[0] / "mixture.wav").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == "" and (folders[0] / "mixture.wav").stat().st_mtime_ns == before


def test_a_song_is_a_function_of_its_seed_and_index():
    first, again = songs.render_song("synth", 3, 1, 2.0), songs.render_song("synth", 3, 1, 2.0)
    other = songs.render_song("synth", 3, 2, 2.0)
    assert all(np.array_equal(first[stem], again[stem]) for stem in STEMS)
    assert not np.array_equal(first["other"], other["other"])


def test_a_sung_song_is_the_same_whichever_vocals_option_chose_it():
    index = next(i for i in range(20) if np.random.default_rng([3, i, 7]).random() < 0.5)  # "mix" sings this one
    mixed, sung = songs.render_song("synth", 3, index, 2.0, "mix"), songs.render_song("synth", 3, index, 2.0, "sung")
    assert all(np.array_equal(mixed[stem], sung[stem]) for stem in STEMS)


@needs_festival
@needs_flite
@pytest.mark.parametrize("voice", ["ked_diphone", "kal"])
def test_spoken_phrases_at_the_song_rate(voice):
    phrase = songs.spoken_phrase(4, np.random.default_rng(0), voice)
    assert phrase.ndim == 1 and 0.5 * songs.RATE < phrase.size < 6 * songs.RATE
    assert np.sqrt(np.mean(phrase ** 2)) > 0.01


def fundamental_period(tone: np.ndarray) -> int:
    """The lag, in samples, of the autocorrelation's highest peak between 50 and 1000."""
    segment = tone[: songs.RATE // 4]
    return 50 + int(np.argmax([np.dot(segment[:-lag], segment[lag:]) for lag in range(50, 1000)]))


def test_karplus_strong_pluck_sounds_at_its_pitch():
    tone = songs.pluck(220.0, songs.RATE, np.random.default_rng(0))
    assert abs(fundamental_period(tone) - songs.RATE / 220) <= 1.5   # periodic at 220 Hz's period
    assert np.abs(tone[-1000:]).max() < 0.3 * np.abs(tone).max()  # it decays


@pytest.mark.parametrize("instrument", [songs.partials_bass, songs.swept_bass, songs.driven_bass, songs.pulse_bass])
def test_each_varied_bass_instrument_sounds_at_its_pitch(instrument):
    for seed in range(3):  # three draws of the instrument's settings
        tone = instrument(np.random.default_rng(seed))(110.0, songs.RATE // 2, np.random.default_rng(seed))
        assert np.isfinite(tone).all() and np.sqrt(np.mean(tone ** 2)) > 0.01
        assert abs(fundamental_period(tone) - songs.RATE / 110) <= 2


def test_varied_bass_lines_play_more_notes_than_the_roots():
    def pitches(bass: np.ndarray) -> set:  # the periods heard in each half-second that sounds
        halves = bass[0].reshape(-1, songs.RATE // 2)
        return {round(songs.RATE / fundamental_period(half)) for half in halves if np.abs(half).max() > 1e-3}
    roots = [pitches(songs.render_song("synth", 5, index, 8.0, "sung")["bass"]) for index in range(6)]
    varied = [pitches(songs.render_song("synth", 5, index, 8.0, "sung", "varied")["bass"]) for index in range(6)]
    assert sum(map(len, varied)) > sum(map(len, roots))
    with pytest.raises(ValueError, match="holdout"):
        songs.render_song("holdout", 5, 0, 2.0, bass="varied")


@pytest.mark.parametrize("instrument", [songs.keys, songs.mallet, songs.pad, songs.driven_guitar])
def test_each_varied_other_instrument_sounds_at_its_pitch(instrument):
    for seed in range(3):
        tone = instrument(np.random.default_rng(seed))(220.0, songs.RATE // 2, np.random.default_rng(seed))
        assert np.isfinite(tone).all() and np.sqrt(np.mean(tone ** 2)) > 0.01
        if instrument is songs.mallet:  # inharmonic modes: no period, but the lowest mode is the loudest
            spectrum = np.abs(np.fft.rfft(tone))
            assert np.argmax(spectrum) * songs.RATE / tone.size == pytest.approx(220, rel=0.02)
        else:
            assert abs(fundamental_period(tone) - songs.RATE / 220) <= 2


def band_share(sound: np.ndarray, low: float, high: float) -> float:
    power = np.abs(np.fft.rfft(sound)) ** 2
    frequencies = np.fft.rfftfreq(sound.size, 1 / songs.RATE)
    return power[(frequencies >= low) & (frequencies < high)].sum() / power.sum()


def test_a_varied_kit_sounds_like_drums():
    for seed in range(6):  # six kits, each of three takes a sound
        kit = songs.drum_kit(np.random.default_rng(seed))
        for name, takes in kit.items():
            assert len(takes) == 3 and not np.array_equal(takes[0], takes[1]), name
            for take in takes:  # struck: loudest near the start, nearly silent at the end
                assert np.isfinite(take).all() and np.argmax(np.abs(take)) < 0.1 * songs.RATE, name
                assert np.abs(take[-take.size // 10:]).max() < 0.1 * np.abs(take).max(), name
        assert min(band_share(take, 20, 300) for take in kit["kick"]) > 0.8
        assert min(band_share(take, 4000, 20000) for take in kit["hat"] + kit["open"]) > 0.8


def test_varied_other_and_drums_render_songs_of_the_synth_family_only():
    plain = songs.render_song("synth", 6, 1, 4.0, "sung", "varied")
    varied = songs.render_song("synth", 6, 1, 4.0, "sung", "varied", "varied", "varied")
    assert not np.array_equal(plain["other"], varied["other"]) and not np.array_equal(plain["drums"], varied["drums"])
    assert all(np.sqrt(np.mean(varied[stem] ** 2)) > 0.01 for stem in STEMS)
    for part in ("other", "drums"):
        with pytest.raises(ValueError, match="holdout"):
            songs.render_song("holdout", 5, 0, 2.0, **{part: "varied"})


def test_mix_at_level_sets_the_vocal_level_exactly():
    rng = np.random.default_rng(1)
    stems = {stem: rng.standard_normal((2, 4000)) * scale for stem, scale in zip(STEMS, (0.3, 0.1, 0.2, 0.05))}
    for level in (-6.0, 0.0, 12.0):
        vocals, accompaniment, mixture = generalisation.mix_at_level(stems, level)
        assert usdr(vocals, mixture) == pytest.approx(level, abs=0.01)   # the mixture as the vocals estimate
        assert np.abs(mixture).max() == pytest.approx(0.89, abs=1e-6)
        np.testing.assert_allclose(vocals + accompaniment, mixture, atol=1e-6)


def test_the_level_heard_is_the_true_level_for_a_perfect_estimate():
    rng = np.random.default_rng(2)
    stems = {stem: rng.standard_normal((2, 4000)) for stem in STEMS}
    vocals, accompaniment, _ = generalisation.mix_at_level(stems, 6.0)
    assert generalisation.heard_level_db({"vocals": vocals, "no_vocals": accompaniment}) == pytest.approx(6.0, abs=1e-3)


@pytest.mark.slow
@needs_flite
def test_generalisation_reports_the_improvement_per_level(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "generalisation.py"), "--songs", "1",
                             "--duration", "3", "--levels", "0", "12", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert list(results["levels"]) == ["+0 dB", "+12 dB"]
    at_zero = results["levels"]["+0 dB"]
    # at 0 dB both references have the same energy and share one error (no_vocals = mixture − vocals estimate)
    assert at_zero["vocals"]["tracks"] == pytest.approx(at_zero["accompaniment"]["tracks"], abs=0.02)
    every = [value for row in results["levels"].values() for stem in row.values() for value in stem["tracks"]]
    assert results["min_improvement_db"] == min(every) and np.isfinite(every).all()
    assert "| +12 dB |" in result.stdout
    heard = results["heard_level_db"]
    assert list(heard) == ["+0 dB", "+12 dB"] and all(len(row["tracks"]) == 1 for row in heard.values())
    assert heard["+12 dB"]["mean"] > heard["+0 dB"]["mean"]  # a louder voice is heard louder, if not by 12 dB
    # the voice alone (also repitched) and the accompaniment alone: a score per song for the estimate of that stem
    alone = ("vocals", "accompaniment", "vocals -4 st", "vocals +4 st")
    assert all(len(results["alone"][name]["tracks"]) == 1 and np.isfinite(results["alone"][name]["mean"])
               for name in alone)
    assert "One stem alone as the mixture" in result.stdout and "the voice repitched -4 semitones" in result.stdout
    bands = results["alone"]["vocals by band"]
    assert list(bands)[:2] == ["0-150 Hz", "150-300 Hz"] and len(bands) == len(generalisation.BAND_EDGES_HZ) - 1
    assert all(len(band["tracks"]) == 1 and np.isfinite(band["mean"]) for band in bands.values())
    assert "SNR of its estimate per band" in result.stdout


def test_generalisation_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "generalisation.py"), "--checkpoint",
                             str(tmp_path / "nothing.ckpt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
