import shutil
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bsmamba2.data as data_module
from bsmamba2.config import MUSDB18_VALID_TRACKS
from bsmamba2.data import (StreamBatches, TrainingSegments, ValidationTracks, open_tracks, random_eq,
                           split_tracks)
from bsmamba2.errors import BSMamba2Error

from training_fixtures import RATE, SOURCES, tiny_config, track_ratio, write_tracks

ALL_STEMS = {"model": {"stems": list(SOURCES)}}


def source_track(stem_audio: np.ndarray) -> int:
    """The track a (channels, samples) segment came from, read off its right/left ratio."""
    left, right = stem_audio
    ratio = float(np.dot(left, right) / np.dot(left, left))
    return min(range(20), key=lambda index: abs(abs(ratio) - track_ratio(index)))


def test_targets_are_exactly_the_scaled_stems_in_the_mixture(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.3})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    frames = round(config.data.segment_seconds * RATE)
    for index in range(20):
        mixture, targets = dataset[index]
        assert mixture.dtype == torch.float32 and mixture.shape == (2, frames)
        assert targets.shape == (4, 2, frames)
        torch.testing.assert_close(targets.sum(0), mixture, rtol=0, atol=1e-6)


def test_stems_come_from_different_tracks_with_gains_in_range(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "gain_range": [0.5, 1.5]})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    peaks = []
    for index in range(30):
        _, targets = dataset[index]
        tracks = [source_track(stem.numpy()) for stem in targets]
        assert sorted(tracks) == [0, 1, 2, 3]  # four stems, four training tracks: all different
        peaks.append(targets[2].abs().max().item() / 0.3)  # bass: a 0.3-peak sine on the left channel
    assert 0.5 <= min(peaks) < 0.7 and 1.3 < max(peaks) <= 1.5


def test_silence_probability_and_determinism(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.1})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    silent = [bool((stem == 0).all()) for index in range(150) for stem in dataset[index][1]]
    assert 0.04 < np.mean(silent) < 0.18
    first, again = dataset[7], dataset[7]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(dataset[8][0], first[0])


def test_aligned_segments_are_real_song_excerpts(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"mix_different_tracks": False, "silence_prob": 0.0,
                                                       "gain_range": [1.0, 1.0]})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    mixture, targets = dataset[3]
    assert len({source_track(stem.numpy()) for stem in targets}) == 1


def test_activity_filter_redraws_silent_stems(tmp_path):
    root = tmp_path / "data"
    write_tracks(root, "train", 2, silent=("vocals",))
    write_tracks(root, "train", 2, first=2)
    write_tracks(root, "test", 1, first=10)
    unfiltered = tiny_config(root, data={"silence_prob": 0.0})
    filtered = tiny_config(root, data={"silence_prob": 0.0, "min_activity_db": -40.0})
    silent = [bool((TrainingSegments(split_tracks(config)[0], config)[index][1] == 0).all())
              for config in (unfiltered, filtered) for index in range(40)]
    assert any(silent[:40])
    assert not any(silent[40:])


def test_channel_swap_and_polarity(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "channel_swap": True,
                                                       "polarity_flip": True})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    swapped, flipped = [], []
    for index in range(20):
        mixture, targets = dataset[index]
        torch.testing.assert_close(targets.sum(0), mixture, rtol=0, atol=1e-6)
        other = targets[3].numpy()  # a square wave plus a small positive offset, left louder than right
        swapped.append(np.abs(other[1]).sum() > np.abs(other[0]).sum())
        flipped.append(other.mean() < 0)
    assert 0 < sum(swapped) < 20 and 0 < sum(flipped) < 20


def test_gains_in_db_cover_the_range(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "gain_db_range": [-20, 10]})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    bass_db = [20 * np.log10(dataset[index][1][2].abs().max().item() / 0.3) for index in range(60)]
    assert -20 <= min(bass_db) < -15 and 5 < max(bass_db) <= 10


def test_solo_examples_keep_one_stem(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "solo_prob": 1.0})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    kept = []
    for index in range(24):
        mixture, targets = dataset[index]
        active = [bool(stem.abs().max() > 0) for stem in targets]
        assert sum(active) == 1
        torch.testing.assert_close(targets.sum(0), mixture, rtol=0, atol=1e-6)
        kept.append(active.index(True))
    assert set(kept) == {0, 1, 2, 3}


@pytest.mark.parametrize("mix_different_tracks", [True, False])
def test_repitch_changes_speed_within_range(data_root, mix_different_tracks):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "gain_range": [1.0, 1.0],
                                                       "repitch_semitones": 3.0,
                                                       "mix_different_tracks": mix_different_tracks})
    ratios = bass_repitch_semitones(config)
    assert -3.1 < min(ratios) < -1 and 1 < max(ratios) < 3.1


def bass_repitch_semitones(config, examples: int = 20) -> list[float]:
    """How far the bass stem (a sine of 55 + 5·track Hz) was repitched in each example, in semitones."""
    dataset = TrainingSegments(split_tracks(config)[0], config)
    frames = round(config.data.segment_seconds * RATE)
    ratios = []
    for index in range(examples):
        mixture, targets = dataset[index]
        assert targets.shape == (4, 2, frames)
        torch.testing.assert_close(targets.sum(0), mixture, rtol=0, atol=1e-6)
        bass = targets[2, 0].numpy()
        spectrum = np.abs(np.fft.rfft(bass * np.hanning(frames), n=16 * frames))
        peak_hz = np.argmax(spectrum) * RATE / (16 * frames)
        ratios.append(12 * np.log2(peak_hz / (55 + 5 * source_track(targets[2].numpy()))))
    return ratios


def test_a_stem_can_have_a_repitch_range_of_its_own(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "gain_range": [1.0, 1.0],
                                                       "repitch_semitones": 1.0,
                                                       "stem_repitch_semitones": {"bass": [-6.0, -4.0]}})
    ratios = bass_repitch_semitones(config)
    assert -6.1 < min(ratios) and max(ratios) < -3.9 and max(ratios) - min(ratios) > 0.8
    for stems, message in (({"guitar": [-1, 1]}, "'guitar' is not one of data.sources"),
                           ({"bass": [2, -2]}, "bass: must be")):
        with pytest.raises(BSMamba2Error, match=message):
            tiny_config(data_root, **ALL_STEMS, data={"stem_repitch_semitones": stems})
    with pytest.raises(BSMamba2Error, match="needs data.mix_different_tracks"):
        tiny_config(data_root, **ALL_STEMS, data={"stem_repitch_semitones": {"bass": [-1, 1]},
                                                  "mix_different_tracks": False})


def test_random_eq_is_a_bounded_zero_phase_gain():
    tone = np.stack([np.sin(2 * np.pi * 1000 * np.arange(RATE) / RATE)] * 2)  # whole cycles: one FFT bin
    rng = np.random.default_rng(0)
    gains_db = []
    for _ in range(20):
        equalized = random_eq(tone, rng, 6.0, RATE)
        gain = float(np.dot(equalized[0], tone[0]) / np.dot(tone[0], tone[0]))
        np.testing.assert_allclose(equalized, gain * tone, atol=1e-5)  # same phase, only scaled
        gains_db.append(20 * np.log10(gain))
    assert -6.0 <= min(gains_db) and max(gains_db) <= 6.0 and np.std(gains_db) > 1.0


def test_eq_changes_each_stem_and_keeps_the_mixture_their_sum(data_root):
    config = tiny_config(data_root, **ALL_STEMS, data={"silence_prob": 0.0, "gain_range": [1.0, 1.0], "eq_db": 6.0})
    dataset = TrainingSegments(split_tracks(config)[0], config)
    peaks = []
    for index in range(20):
        mixture, targets = dataset[index]
        torch.testing.assert_close(targets.sum(0), mixture, rtol=0, atol=1e-6)
        peaks.append(targets[2].abs().max().item() / 0.3)  # bass: a 0.3-peak sine, now through a random EQ
    assert 0.45 < min(peaks) < 0.9 and 1.1 < max(peaks) < 2.1


def test_reads_only_the_segment(data_root, monkeypatch):
    config = tiny_config(data_root)
    dataset = TrainingSegments(split_tracks(config)[0], config)
    reads = []
    original = data_module.read_stem
    monkeypatch.setattr(data_module, "read_stem", lambda *args: reads.append(args[2:]) or original(*args))
    dataset[0]
    frames = round(config.data.segment_seconds * RATE)
    assert len(reads) == 4 and all(count == frames and 0 <= start <= 2 * RATE - frames for start, count in reads)


def test_workers_and_ranks_see_the_same_examples(data_root):
    config = tiny_config(data_root)
    dataset = TrainingSegments(split_tracks(config)[0], config)

    def batches(start, batch_size, rank=0, world_size=1, workers=0, count=3):
        loader = DataLoader(dataset, batch_sampler=StreamBatches(start, batch_size, rank, world_size),
                            num_workers=workers)
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    single = batches(0, 4)
    with_workers = batches(0, 4, workers=2)
    rank0, rank1 = batches(0, 2, 0, 2), batches(0, 2, 1, 2)
    resumed = batches(1, 4, count=2)
    for k in range(3):
        assert torch.equal(single[k][0], with_workers[k][0]) and torch.equal(single[k][1], with_workers[k][1])
        assert torch.equal(single[k][0], torch.cat([rank0[k][0], rank1[k][0]]))
    assert torch.equal(single[1][0], resumed[0][0])


def test_validation_tracks_are_fixed_middle_segments(data_root):
    config = tiny_config(data_root, data={"valid_segment_seconds": 1.0})
    train, valid = split_tracks(config)
    assert [t.name for t in train] == ["track0", "track1", "track2", "track3"]
    assert [t.name for t in valid] == ["track10", "track11"]
    item = ValidationTracks(valid, config)[0]
    assert item.mixture.shape == (2, RATE) and item.targets.shape == (1, 2, RATE)
    expected = valid[0].read("vocals", RATE // 2, RATE)
    np.testing.assert_array_equal(item.targets[0], expected)
    whole = ValidationTracks(valid, tiny_config(data_root, data={"valid_segment_seconds": 0.0}))[1]
    assert whole.mixture.shape == (2, 2 * RATE)


def test_validation_split_by_track_names(data_root):
    config = tiny_config(data_root, data={"valid_subset": "train", "valid_tracks": ["track2"]})
    train, valid = split_tracks(config)
    assert [t.name for t in valid] == ["track2"] and "track2" not in [t.name for t in train]
    musdb_default = tiny_config(data_root, data={"valid_subset": "train", "valid_tracks": MUSDB18_VALID_TRACKS})
    missing = r"data.valid_tracks: .*train: no track named 'Actions - One Minute Smile' \(nor 13 more\)"
    with pytest.raises(BSMamba2Error, match=missing):
        split_tracks(musdb_default)


def test_data_errors_name_the_problem(data_root, tmp_path):
    with pytest.raises(BSMamba2Error, match="data.root: not set"):
        split_tracks(tiny_config(data_root, data={"root": None}))
    with pytest.raises(BSMamba2Error, match=r"sample rate 8000 Hz, the config wants 44100 Hz"):
        open_tracks(data_root, "train", list(SOURCES), 44100)
    shutil.rmtree(data_root / "train" / "track1")
    (data_root / "train" / "track1").mkdir()
    with pytest.raises(BSMamba2Error, match=r"track1: no vocals stem"):
        split_tracks(tiny_config(data_root))


def test_mono_model_gets_mono_examples(data_root):
    config = tiny_config(data_root, audio={"channels": 1})
    mixture, targets = TrainingSegments(split_tracks(config)[0], config)[0]
    assert mixture.shape[0] == 1 and targets.shape[1] == 1


def test_stem_mp4_needs_musdb(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "song.stem.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "musdb", None)
    with pytest.raises(BSMamba2Error, match=r"\.stem\.mp4 files, which need the optional `musdb` package"):
        open_tracks(tmp_path, "train", list(SOURCES), 44100)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is needed to write and read .stem.mp4")
def test_stem_mp4_segments_through_musdb(tmp_path):
    stempeg = pytest.importorskip("stempeg")
    pytest.importorskip("musdb")
    rate = 44100
    t = np.arange(2 * rate) / rate
    # musdb's stream order: mixture, drums, bass, other, vocals
    stems = np.stack([np.stack([0.2 * np.sin(2 * np.pi * f * t)] * 2, axis=1) for f in (0, 110, 220, 330, 440)])
    stems[0] = stems[1:].sum(0)
    (tmp_path / "train").mkdir()
    stempeg.write_stems(str(tmp_path / "train" / "song.stem.mp4"), stems, sample_rate=rate,
                        writer=stempeg.StreamsWriter(codec="aac", bitrate=256000))
    [track] = open_tracks(tmp_path, "train", list(SOURCES), rate)
    assert track.name == "song" and abs(track.frames - 2 * rate) < 2048
    segment = track.read("vocals", rate // 2, rate // 4)
    assert segment.shape == (2, rate // 4) and segment.dtype == np.float32
    expected = stems[4, rate // 2: rate // 2 + rate // 4].T
    correlation = np.dot(segment[0], expected[0]) / np.linalg.norm(segment[0]) / np.linalg.norm(expected[0])
    assert correlation > 0.98  # AAC is lossy; a wrong stream or offset gives ~0
