"""Separate a song with a `bsmamba2 export` file and nothing but numpy, soundfile and onnxruntime.

    python examples/onnx_separate.py model.onnx song.wav out/      # writes out/<stem>.wav

Everything comes from the file's metadata: the STFT settings, the stems, the chunk the network takes. The song
must be at the model's sample rate. Chunks overlap and are cross-faded exactly as `bsmamba2 separate` does, so
the stems equal its stems up to float rounding.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import soundfile


def stft(x, n_fft, hop, window):
    """(channels, samples) → (channels, n_fft/2+1, frames) complex, centred: n_fft/2 samples reflected at each end."""
    x = np.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    starts = range(0, x.shape[1] - n_fft + 1, hop)
    return np.stack([np.fft.rfft(x[:, s:s + n_fft] * window) for s in starts], axis=-1)


def istft(spec, n_fft, hop, window, length):
    """The inverse of `stft`: overlap-add of the windowed frames, divided by the overlap-added squared window."""
    frames = spec.shape[-1]
    out = np.zeros(spec.shape[:-2] + (n_fft + hop * (frames - 1),))
    norm = np.zeros(out.shape[-1])
    for t in range(frames):
        out[..., t * hop:t * hop + n_fft] += np.fft.irfft(spec[..., t], n_fft) * window
        norm[t * hop:t * hop + n_fft] += window ** 2
    return (out / np.where(norm > 1e-11, norm, 1))[..., n_fft // 2:n_fft // 2 + length]


def separate(session, meta, wave):
    """(channels, samples) → (stems, channels, samples), chunk by chunk."""
    n_fft, hop, chunk = int(meta["n_fft"]), int(meta["hop_length"]), int(meta["chunk_samples"])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    fade = min(round(float(meta["overlap"]) * chunk), chunk - 1)
    step, samples = chunk - fade, wave.shape[1]
    ramp = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade) ** 2 if fade else np.ones(0)
    weight = np.ones(chunk)
    weight[:fade], weight[chunk - fade:] = ramp, ramp[::-1]
    starts = range(0, fade + samples, step)  # the song starts after `fade` zeros, at full weight
    padded = np.pad(wave, ((0, 0), (fade, starts[-1] + chunk - fade - samples)))
    total = np.zeros((len(json.loads(meta["stems"])), wave.shape[0], padded.shape[1]))
    weights = np.zeros(padded.shape[1])
    for start in starts:
        spec = stft(padded[:, start:start + chunk], n_fft, hop, window)
        spec = np.stack([spec.real, spec.imag], axis=-1)[None].astype(np.float32)
        stems = session.run(None, {"mixture_stft": spec})[0][0]        # (stems, channels, freqs, frames, 2)
        total[..., start:start + chunk] += istft(stems[..., 0] + 1j * stems[..., 1], n_fft, hop, window, chunk) * weight
        weights[start:start + chunk] += weight
    return (total / weights)[..., fade:fade + samples]


def main(model_path, song, out_dir):
    options = onnxruntime.SessionOptions()
    options.enable_mem_pattern = False  # far less peak memory for the larger models (docs/onnx.md)
    session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    wave, rate = soundfile.read(song, dtype="float32", always_2d=True)
    if rate != int(meta["sample_rate"]):
        sys.exit(f"{song}: {rate} Hz, the model wants {meta['sample_rate']} Hz (resample it first)")
    channels = int(meta["channels"])
    wave = wave.T if wave.shape[1] == channels else np.repeat(wave.T.mean(0, keepdims=True), channels, axis=0)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, stem in zip(json.loads(meta["stems"]), separate(session, meta, wave)):
        soundfile.write(Path(out_dir) / f"{name}.wav", stem.T, rate, subtype="FLOAT")
        print(Path(out_dir) / f"{name}.wav")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: " + __doc__.splitlines()[2].strip())
    main(*sys.argv[1:])
