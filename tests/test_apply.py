"""Chunked overlap-add (bsmamba2.apply) with stand-in models whose exact output is known."""
import numpy as np
import pytest
import torch

from bsmamba2.apply import PaddedChunks, apply_model, fade_window
from bsmamba2.errors import BSMamba2Error


class Identity(torch.nn.Module):
    """One stem equal to the input; records the shape of every batch it sees."""

    stems = ["mixture"]

    def __init__(self, sample_rate=1000, audio_channels=2):
        super().__init__()
        self.sample_rate, self.audio_channels = sample_rate, audio_channels
        self.seen = []

    def forward(self, x):
        assert x.shape[1] == self.audio_channels
        self.seen.append(tuple(x.shape))
        return x.unsqueeze(1).clone()


class GainAndSwap(Identity):
    """Two stems: 0.5 · input, and the input with its channels swapped (catches stem/channel mix-ups)."""

    stems = ["half", "swapped"]

    def forward(self, x):
        return torch.stack([0.5 * x, x.flip(1)], dim=1)


def blocks_of(wave, size):
    return [wave[:, start:start + size] for start in range(0, wave.shape[1], size)]


def run(model, wave, block=313, **options):
    options = {"chunk_seconds": 0.25, "overlap": 0.25, **options}
    return np.concatenate(list(apply_model(model, blocks_of(wave, block), **options)), axis=-1)


@pytest.mark.parametrize("samples", [1, 7, 249, 250, 251, 999, 4321])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
def test_identity_model_reproduces_the_input(samples, overlap):
    wave = np.random.default_rng(samples).standard_normal((2, samples)).astype(np.float32)
    for batch_size, block in [(1, 313), (3, 1000), (4, 17)]:
        out = run(Identity(), wave, block=block, overlap=overlap, batch_size=batch_size)
        assert out.shape == (1, 2, samples)
        np.testing.assert_allclose(out[0], wave, atol=1e-5, rtol=0)


def test_tta_of_identity_is_identity_and_uses_one_forward_per_batch():
    wave = np.random.default_rng(0).standard_normal((2, 2000)).astype(np.float32)
    model = Identity()
    out = run(model, wave, tta=True, batch_size=2)
    np.testing.assert_allclose(out[0], wave, atol=1e-5, rtol=0)
    # 3 views (original, polarity, channel swap) of at most 2 chunks each, all 250-sample chunks
    assert {shape[0] for shape in model.seen} <= {3, 6} and {shape[2] for shape in model.seen} == {250}


def test_tta_undoes_the_channel_swap_and_polarity():
    wave = np.random.default_rng(1).standard_normal((2, 1500)).astype(np.float32)
    out = run(GainAndSwap(), wave, tta=True)
    np.testing.assert_allclose(out[0], 0.5 * wave, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], wave[::-1], atol=1e-5, rtol=0)


def test_mono_input_through_a_stereo_model_and_stereo_through_a_mono_model():
    rng = np.random.default_rng(2)
    mono = rng.standard_normal((1, 900)).astype(np.float32)
    np.testing.assert_allclose(run(GainAndSwap(), mono)[:, 0], np.stack([0.5 * mono[0], mono[0]]), atol=1e-5)
    stereo = rng.standard_normal((2, 900)).astype(np.float32)
    mono_model = Identity(audio_channels=1)
    np.testing.assert_allclose(run(mono_model, stereo)[0], stereo, atol=1e-5)
    assert {shape[1] for shape in mono_model.seen} == {1}


@pytest.mark.parametrize("samples", [1, 74, 75, 76, 1000, 1234])
def test_window_weights_add_up_to_one_on_every_real_sample(samples):
    """The padding puts the first and last real samples where the chunks' raw weights already sum to one:
    no sample depends on the normalisation to lift a faded edge."""
    chunk, fade = 100, 25
    window = fade_window(chunk, fade)
    assert window[fade:chunk - fade].min() == 1.0 and 0 < window[0] < 0.01
    chunks = list(PaddedChunks(blocks_of(np.ones((1, samples), np.float32), 33), chunk, chunk - fade, fade))
    weight = np.zeros((len(chunks) - 1) * (chunk - fade) + chunk)
    for k, piece in enumerate(chunks):
        assert piece.shape == (1, chunk)
        weight[k * (chunk - fade):k * (chunk - fade) + chunk] += window
    np.testing.assert_allclose(weight[fade:fade + samples], 1.0, atol=1e-6)
    # and no chunk is wasted: the last one starts before the real signal ends
    assert (len(chunks) - 1) * (chunk - fade) < fade + samples


def test_memory_stays_bounded_while_streaming():
    """The input is pulled lazily: when the first output appears, only about one batch of chunks was read,
    and output keeps pace with input."""
    pulled = []
    wave = np.zeros((2, 100_000), np.float32)

    def source():
        for block in blocks_of(wave, 100):
            pulled.append(block.shape[1])
            yield block

    model = Identity()
    stream = apply_model(model, source(), chunk_seconds=0.25, overlap=0.25, batch_size=2)
    produced = next(stream).shape[-1]
    assert sum(pulled) <= 2 * 250 + 100
    for block in stream:
        produced += block.shape[-1]
        assert sum(pulled) - produced <= 2 * 250 + 100
    assert produced == 100_000


def test_non_finite_model_output_is_an_error():
    class Broken(Identity):
        def forward(self, x):
            return torch.full_like(x, float("nan")).unsqueeze(1)

    with pytest.raises(BSMamba2Error, match="NaN or Inf"):
        run(Broken(), np.ones((2, 100), np.float32))
