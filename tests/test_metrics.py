import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from bsmamba2.errors import BSMamba2Error
from bsmamba2.metrics import band_snrs, csdr, score_track, usdr

RATE = 8000  # cSDR frames are 1 s = RATE samples; a low rate keeps museval fast


def test_usdr_matches_a_hand_computation():
    reference = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    estimate = np.array([[0.5, -2.0, 1.0], [0.25, 2.0, -1.0]])
    signal = 1 + 4 + 0.25 + 0 + 9 + 1  # Σ s²
    error = 0.25 + 0 + 0.25 + 0.0625 + 1 + 0  # Σ (s − ŝ)²
    expected = 10 * math.log10((signal + 1e-7) / (error + 1e-7))
    assert usdr(reference, estimate) == pytest.approx(expected, rel=1e-12)
    assert usdr(reference.astype(np.float32), estimate.astype(np.float32)) == pytest.approx(expected, rel=1e-6)


def test_usdr_of_a_perfect_and_a_zero_estimate():
    reference = np.array([[0.1, 0.2], [0.3, 0.4]])
    assert usdr(reference, reference) == pytest.approx(10 * math.log10((0.3 + 1e-7) / 1e-7))
    assert usdr(reference, np.zeros_like(reference)) == pytest.approx(0.0, abs=1e-5)


def test_usdr_is_undefined_for_a_silent_reference():
    assert math.isnan(usdr(np.zeros((2, 100)), np.ones((2, 100))))
    assert math.isnan(usdr(np.zeros((2, 100)), np.zeros((2, 100))))


def test_usdr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        usdr(np.ones((2, 10)), np.ones((2, 11)))


def noisy_sources(snr_db, seconds=3, sources=2, seed=0):
    """Coloured (music-like) stereo references and estimates = reference + white noise at `snr_db` (one value,
    or one per source)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((sources, 2, seconds * RATE))
    kernel = np.exp(-np.arange(32) / 6.0)
    references = np.apply_along_axis(lambda x: np.convolve(x, kernel, mode="same"), -1, white)
    noise = rng.standard_normal(references.shape)
    noise *= np.sqrt(np.sum(references ** 2, axis=(1, 2), keepdims=True) / np.sum(noise ** 2, axis=(1, 2),
                                                                                   keepdims=True))
    gain = 10 ** (-np.broadcast_to(np.asarray(snr_db, dtype=np.float64), (sources,)) / 20)
    return references, references + noise * gain[:, None, None]


@pytest.mark.slow
def test_csdr_equals_museval_and_the_snr_of_white_noise():
    museval = pytest.importorskip("museval")
    snr_db = [5.0, 15.0]
    references, estimates = noisy_sources(snr_db)
    scores = csdr(references, estimates, RATE)
    framewise, _, _, _ = museval.evaluate(references.transpose(0, 2, 1), estimates.transpose(0, 2, 1),
                                          win=RATE, hop=RATE)
    assert framewise.shape == (2, 3)
    np.testing.assert_array_equal(scores, np.nanmedian(framewise, axis=1))
    # 512-tap filters may explain only a sliver of white noise: the score stays close to the SNR.
    np.testing.assert_allclose(scores, snr_db, atol=0.3)


def test_csdr_leaves_out_silent_sources():
    museval = pytest.importorskip("museval")
    references, estimates = noisy_sources(10.0, sources=3)
    references[1] = 0.0  # a silent reference stem
    estimates[2] = 0.0   # a silent estimate
    scores = csdr(references, estimates, RATE)
    assert math.isnan(scores[1]) and math.isnan(scores[2])
    alone, _, _, _ = museval.evaluate(references[:1].transpose(0, 2, 1), estimates[:1].transpose(0, 2, 1),
                                      win=RATE, hop=RATE)
    assert scores[0] == np.nanmedian(alone)
    assert np.isnan(csdr(np.zeros((1, 2, RATE)), np.ones((1, 2, RATE)), RATE)).all()


@pytest.mark.slow
def test_csdr_ignores_silent_frames_and_is_undefined_without_any_frame():
    museval = pytest.importorskip("museval")
    references, estimates = noisy_sources(10.0)
    references[0, :, RATE:] = 0.0  # source 0 sounds only in the first second: frames 2 and 3 are undefined
    framewise, _, _, _ = museval.evaluate(references.transpose(0, 2, 1), estimates.transpose(0, 2, 1),
                                          win=RATE, hop=RATE)
    assert np.isnan(framewise[:, 1:]).all() and np.isfinite(framewise[:, 0]).all()
    np.testing.assert_array_equal(csdr(references, estimates, RATE), framewise[:, 0])
    references[1, :, :RATE] = 0.0  # source 1 silent where source 0 sounds: no frame is defined
    assert np.isnan(csdr(references, estimates, RATE)).all()


def test_csdr_without_museval_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "museval", None)  # makes `import museval` raise ImportError
    with pytest.raises(BSMamba2Error, match=r"cSDR unavailable: museval is not installed.*bsmamba2\[eval\]"):
        csdr(np.ones((1, 2, RATE)), np.ones((1, 2, RATE)), RATE)


@pytest.mark.slow
def test_score_track_pairs_a_single_stem_with_its_complement():
    pytest.importorskip("museval")
    references, estimates = noisy_sources(8.0)
    mixture = references.sum(axis=0)
    scores = score_track({"vocals": references[0]}, {"vocals": estimates[0]}, mixture, RATE)
    assert list(scores) == ["vocals"]
    assert scores["vocals"]["usdr"] == usdr(references[0], estimates[0])
    complement = np.stack([references[0], mixture - references[0]]), np.stack([estimates[0], mixture - estimates[0]])
    assert scores["vocals"]["csdr"] == csdr(*complement, RATE)[0]


@pytest.mark.slow
def test_score_track_evaluates_several_stems_together():
    pytest.importorskip("museval")
    references, estimates = noisy_sources(12.0)
    stems = ["vocals", "drums"]
    scores = score_track(dict(zip(stems, references)), dict(zip(stems, estimates)), references.sum(axis=0), RATE)
    together = csdr(references, estimates, RATE)
    for index, stem in enumerate(stems):
        assert scores[stem] == {"usdr": usdr(references[index], estimates[index]), "csdr": together[index]}
    without_csdr = score_track(dict(zip(stems, references)), dict(zip(stems, estimates)), references.sum(axis=0),
                               RATE, with_csdr=False)
    assert all(math.isnan(without_csdr[stem]["csdr"]) for stem in stems)


def test_museval_without_ffmpeg_is_reported_not_raised(tmp_path):
    pytest.importorskip("museval")
    script = "from bsmamba2.metrics import museval_missing_reason; print(museval_missing_reason())"
    # An empty PATH hides ffmpeg, which museval's musdb → stempeg imports refuse to start without.
    result = subprocess.run([sys.executable, "-c", script], env={"PATH": str(tmp_path)}, capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("museval cannot be imported: ffmpeg or ffprobe could not be found")


@pytest.mark.slow
def test_a_single_stem_scores_as_musdb_scores_vocals_with_accompaniment(tmp_path):
    museval = pytest.importorskip("museval")
    musdb = pytest.importorskip("musdb")
    rng = np.random.default_rng(3)
    stems = {name: rng.uniform(-0.2, 0.2, (2, 3 * RATE)) for name in ("vocals", "drums", "bass", "other")}
    for name in ("drums", "bass", "other"):
        stems[name][:, :RATE] = 0.0  # an a-cappella first second: with the accompaniment, that frame is undefined
    stems["mixture"] = sum(stems.values())
    track_dir = tmp_path / "test" / "song"
    track_dir.mkdir(parents=True)
    for name, audio in stems.items():
        sf.write(track_dir / f"{name}.wav", audio.T, RATE, subtype="FLOAT")
    track = musdb.DB(root=str(tmp_path), subsets="test", is_wav=True).tracks[0]
    vocals = track.targets["vocals"].audio.T
    noise_per_second = np.repeat([0.1, 0.5, 1.0], RATE)
    estimate = vocals + noise_per_second * rng.standard_normal(vocals.shape) * vocals.std()
    ours = score_track({"vocals": vocals}, {"vocals": estimate}, track.audio.T, RATE)["vocals"]["csdr"]
    assert ours != pytest.approx(csdr(vocals[None], estimate[None], RATE)[0], abs=0.5)  # vocals alone: 3 frames
    store = museval.eval_mus_track(track, {"vocals": estimate.T, "accompaniment": track.audio - estimate.T})
    frames = next(target["frames"] for target in store.scores["targets"] if target["name"] == "vocals")
    assert len(frames) == 3
    assert ours == pytest.approx(float(np.nanmedian([float(f["metrics"]["SDR"]) for f in frames])), abs=1e-4)


def test_band_snrs_say_which_frequencies_an_estimate_lost():
    rate = 44100
    t = np.arange(rate) / rate
    low, high = np.sin(2 * np.pi * 100 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)
    reference = np.stack([low + high, low + high])
    estimate = np.stack([0.5 * low + high, 0.5 * low + high])  # half of the low tone's amplitude lost
    below_150, _, around_1000, _ = band_snrs(reference, estimate, rate, (0, 150, 600, 1200, 22050))
    assert below_150 == pytest.approx(20 * np.log10(2), abs=0.01)   # the error is half the tone
    assert around_1000 > 60                                         # kept exactly
