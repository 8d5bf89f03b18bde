#!/usr/bin/env python3
"""The floor and the ceiling of a mask model's uSDR on a MUSDB18-HQ-style folder, to read its scores against.

    python scripts/oracle_baselines.py data/synth-test --subset test --stem vocals

Per track and as a mean over tracks: the mixture itself as the estimate (what doing nothing scores), and the
oracle ideal ratio mask |S| / (|S| + |rest|) on the model's STFT (the `audio` config's n_fft and hop, Hann; what
a real-valued mask could at best reach there). Tracks whose stem is digitally silent are left out, as
`bsmamba2 evaluate` does.
"""
import argparse

import numpy as np
import torch

from bsmamba2.config import AudioConfig
from bsmamba2.metrics import usdr
from bsmamba2.tracks import list_tracks, read_stem

N_FFT, HOP = AudioConfig.n_fft, AudioConfig.hop_length


def ideal_ratio_mask_estimate(stem: np.ndarray, mixture: np.ndarray) -> np.ndarray:
    window = torch.hann_window(N_FFT)

    def stft(audio: np.ndarray) -> torch.Tensor:
        return torch.stft(torch.from_numpy(audio), N_FFT, HOP, window=window, return_complex=True)

    target, rest = stft(stem), stft(mixture - stem)
    mask = target.abs() / (target.abs() + rest.abs()).clamp_min(1e-8)
    estimate = torch.istft(mask * stft(mixture), N_FFT, HOP, window=window, length=mixture.shape[-1])
    return estimate.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--stem", default="vocals")
    args = parser.parse_args()
    rows = []
    print(f"{'track':<24} {'mixture':>8} {'IRM':>8}   (uSDR {args.stem}, dB)")
    for track in list_tracks(args.root, args.subset):
        stem, mixture = read_stem(track, args.stem), read_stem(track, "mixture")
        if not np.any(stem):
            continue
        rows.append((usdr(stem, mixture), usdr(stem, ideal_ratio_mask_estimate(stem, mixture))))
        print(f"{track.name:<24} {rows[-1][0]:>8.2f} {rows[-1][1]:>8.2f}")
    means = np.mean(rows, axis=0)
    print(f"{'mean of ' + str(len(rows)) + ' tracks':<24} {means[0]:>8.2f} {means[1]:>8.2f}")


if __name__ == "__main__":
    main()
