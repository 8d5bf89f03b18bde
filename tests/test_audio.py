"""Audio reading, resampling and atomic writing (bsmamba2.audio) on files generated here."""
import logging

import numpy as np
import pytest
import soundfile as sf
import soxr

from bsmamba2.audio import AudioReader, AudioWriter, resample_blocks
from bsmamba2.errors import BSMamba2Error
from separation_fixtures import FORMATS, noise, write_audio as write


@pytest.mark.parametrize("ext", list(FORMATS))
@pytest.mark.parametrize("rate,channels", [(22050, 1), (44100, 2), (48000, 2)])
def test_reader_streams_what_soundfile_decodes(tmp_path, ext, rate, channels):
    path = write(tmp_path / f"x.{ext}", noise(channels, rate // 2), rate)
    expected, _ = sf.read(path, dtype="float32", always_2d=True)
    with AudioReader(path) as reader:
        assert (reader.sample_rate, reader.channels, reader.frames) == (rate, channels, rate // 2)
        blocks = list(reader.blocks(frames=4000))
    assert all(block.shape[0] == channels and block.dtype == np.float32 for block in blocks)
    np.testing.assert_allclose(np.concatenate(blocks, axis=1), expected.T, atol=1e-6, rtol=0)  # mp3: float decoder


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("ext", list(FORMATS))
def test_truncated_files_are_reported(tmp_path, ext):
    path = truncate(write(tmp_path / f"cut.{ext}", noise(2, 44100), 44100))
    with pytest.raises(BSMamba2Error, match=r"cut\.%s: truncated" % ext):
        with AudioReader(path) as reader:
            for _ in reader.blocks():
                pass


def test_unusable_files_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "empty.wav").touch()
    (tmp_path / "text.wav").write_text("this is not audio\n" * 20)
    sf.write(tmp_path / "three.wav", noise(3, 100).T, 44100)
    sf.write(tmp_path / "none.wav", np.zeros((0, 2)), 44100)
    cases = {"missing.wav": "no such file", "empty.wav": "empty file", "text.wav": "not an audio file",
             "three.wav": "has 3 channels", "none.wav": "no audio samples", ".": "is a folder"}
    for name, problem in cases.items():
        with pytest.raises(BSMamba2Error, match=problem) as error:
            AudioReader(tmp_path / name)
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)


def test_non_finite_samples_become_silence_with_a_warning(tmp_path, caplog):
    wave = noise(2, 1000)
    wave[0, 10], wave[1, 20], wave[1, 30] = np.nan, np.inf, -np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, wave.T, 44100, subtype="FLOAT")
    with caplog.at_level(logging.WARNING, logger="bsmamba2"), AudioReader(path) as reader:
        out = np.concatenate(list(reader.blocks()), axis=1)
    assert np.isfinite(out).all() and out[0, 10] == out[1, 20] == out[1, 30] == 0
    np.testing.assert_array_equal(out[0, :10], wave[0, :10])
    assert "3 NaN/Inf samples" in caplog.text


@pytest.mark.parametrize("rates", [(48000, 44100), (22050, 44100), (44100, 44100)])
def test_streamed_resampling_equals_resampling_at_once(rates):
    wave = noise(2, 30011, seed=3)
    stems = np.stack([wave, -wave])  # (stems, channels, samples): leading dimensions are kept
    blocks = [stems[..., start:start + 4096] for start in range(0, stems.shape[-1], 4096)]
    streamed = np.concatenate(list(resample_blocks(blocks, *rates)), axis=-1)
    whole = soxr.resample(wave.T, *rates, quality="VHQ").T
    assert streamed.shape == (2, 2, whole.shape[1])
    np.testing.assert_allclose(streamed[0], whole, atol=1e-6)
    np.testing.assert_allclose(streamed[1], -whole, atol=1e-6)


def test_writer_renames_into_place_only_on_commit(tmp_path):
    final = tmp_path / "out" / "vocals.wav"
    writer = AudioWriter(final, 44100, 2, "wav", "32f")
    writer.write(noise(2, 500))
    assert not final.exists() and writer.temporary.exists() and writer.temporary.parent == final.parent
    writer.commit()
    assert final.exists() and not writer.temporary.exists()
    assert sf.info(final).frames == 500

    dropped = AudioWriter(tmp_path / "out" / "drums.flac", 44100, 1, "flac", "16")
    dropped.write(noise(1, 500))
    dropped.discard()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vocals.wav"]


def test_integer_formats_clip_with_a_warning_and_float_keeps_the_peaks(tmp_path, caplog):
    wave = np.array([[0.5, 1.5, -2.0, 0.25]], np.float32)
    with caplog.at_level(logging.WARNING, logger="bsmamba2"):
        for depth in ("16", "32f"):
            writer = AudioWriter(tmp_path / f"{depth}.wav", 8000, 1, "wav", depth)
            writer.write(wave)
            writer.commit()
    np.testing.assert_allclose(sf.read(tmp_path / "16.wav")[0], [0.5, 1.0, -1.0, 0.25], atol=1e-4)
    np.testing.assert_array_equal(sf.read(tmp_path / "32f.wav", dtype="float32")[0], wave[0])
    assert "16.wav: 2 samples clipped" in caplog.text and "32f.wav" not in caplog.text


def test_writer_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.touch()
    with pytest.raises(BSMamba2Error, match="cannot write to .*file"):
        AudioWriter(blocker / "vocals.wav", 44100, 2)
    with pytest.raises(BSMamba2Error, match="FLAC stores integers only"):
        AudioWriter(tmp_path / "x.flac", 44100, 2, "flac", "32f")
