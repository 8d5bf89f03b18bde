import numpy as np
import pytest
import soundfile as sf

from bsmamba2.errors import BSMamba2Error
from bsmamba2.tracks import check_stems, has_stem, list_tracks, pick_tracks, read_stem, stem_info, stem_path

RATE = 8000


def write(path, audio, subtype="FLOAT", format="WAV"):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.T, RATE, subtype=subtype, format=format)


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for track in ("b song", "a song"):
        write(tmp_path / "test" / track / "mixture.wav", rng.uniform(-0.5, 0.5, (2, 1000)).astype(np.float32))
    (tmp_path / "test" / ".cache").mkdir()
    (tmp_path / "test" / "notes.txt").write_text("not a track")
    return tmp_path


def test_list_tracks_sorted_folders_only(root):
    assert [track.name for track in list_tracks(root, "test")] == ["a song", "b song"]


def test_list_tracks_errors(root, tmp_path):
    with pytest.raises(BSMamba2Error, match="is not a directory"):
        list_tracks(tmp_path / "nowhere", "test")
    with pytest.raises(BSMamba2Error, match=r"no subset 'train'.*found: test"):
        list_tracks(root, "train")
    (root / "empty").mkdir()
    with pytest.raises(BSMamba2Error, match="no track folders"):
        list_tracks(root, "empty")


def test_read_stem_reads_the_requested_frames(root):
    track = root / "test" / "a song"
    full, _ = sf.read(track / "mixture.wav", dtype="float32", always_2d=True)
    audio = read_stem(track, "mixture")
    assert audio.dtype == np.float32 and audio.shape == (2, 1000)
    np.testing.assert_array_equal(audio, full.T)
    np.testing.assert_array_equal(read_stem(track, "mixture", start=100, frames=250), full[100:350].T)
    np.testing.assert_array_equal(read_stem(track, "mixture", start=900), full[900:].T)
    assert read_stem(track, "mixture", start=5000, frames=10).shape == (2, 0)


def test_flac_and_mono_stems(root):
    track = root / "test" / "a song"
    vocals = (np.arange(600, dtype=np.float32)[None] % 200 - 100) / 256  # exact in 16-bit PCM
    write(track / "vocals.flac", vocals, subtype="PCM_16", format="FLAC")
    assert stem_path(track, "vocals").name == "vocals.flac"
    info = stem_info(track, "vocals")
    assert (info.sample_rate, info.frames, info.channels) == (RATE, 600, 1)
    np.testing.assert_array_equal(read_stem(track, "vocals", start=10, frames=20), vocals[:, 10:30])


def test_wav_is_preferred_to_flac(root):
    track = root / "test" / "a song"
    write(track / "bass.flac", np.zeros((2, 10), np.float32), subtype="PCM_16", format="FLAC")
    write(track / "bass.wav", np.zeros((2, 10), np.float32))
    assert stem_path(track, "bass").name == "bass.wav"


def test_missing_and_unreadable_stems(root):
    track = root / "test" / "a song"
    with pytest.raises(BSMamba2Error, match=r"a song: no drums stem \(drums.wav or drums.flac\)"):
        read_stem(track, "drums")
    (track / "other.wav").write_bytes(b"not audio at all")
    with pytest.raises(BSMamba2Error, match=r"other.wav: cannot read audio"):
        read_stem(track, "other")
    with pytest.raises(BSMamba2Error, match=r"other.wav: cannot read audio"):
        stem_info(track, "other")


def test_pick_tracks_by_name_once_each_in_the_order_given(root):
    tracks = list_tracks(root, "test")
    assert [t.name for t in pick_tracks(tracks, ["b song", "a song", "b song"], "here")] == ["b song", "a song"]
    with pytest.raises(BSMamba2Error, match=r"^here: no track named 'c song' \(nor 1 more\)$"):
        pick_tracks(tracks, ["a song", "c song", "d song"], "here")
    with pytest.raises(BSMamba2Error, match=r"^here: no track named 'c song'$"):
        pick_tracks(tracks, ["c song"], "here")


def test_check_stems_reads_headers_and_checks_rate_and_shape(root):
    track = root / "test" / "a song"
    write(track / "vocals.wav", np.zeros((2, 1000), np.float32))
    infos = check_stems(track, ["mixture", "vocals"], sample_rate=RATE, same_shape=True)
    assert [(i.path.name, i.sample_rate, i.channels, i.frames) for i in infos] == [
        ("mixture.wav", RATE, 2, 1000), ("vocals.wav", RATE, 2, 1000)]
    with pytest.raises(BSMamba2Error, match=r"mixture.wav: sample rate 8000 Hz, the config wants 44100 Hz"):
        check_stems(track, ["mixture", "vocals"], sample_rate=44100)
    write(track / "bass.wav", np.zeros((1, 900), np.float32))
    assert [i.frames for i in check_stems(track, ["mixture", "bass"], sample_rate=RATE)] == [1000, 900]
    with pytest.raises(BSMamba2Error, match=r"bass.wav: 8000 Hz, 1 channels, 900 samples, but the mixture has "
                                            r"8000 Hz, 2 channels, 1000 samples"):
        check_stems(track, ["mixture", "bass"], same_shape=True)
    with pytest.raises(BSMamba2Error, match=r"no drums stem"):
        check_stems(track, ["mixture", "drums"])
    assert has_stem(track, "bass") and not has_stem(track, "drums")
