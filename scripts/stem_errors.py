#!/usr/bin/env python3
"""How a model's stems go wrong on a MUSDB18-HQ-style folder, to decide what to train next. For each stem, mean over
tracks: its uSDR; the estimate's level against the true stem's (far below 0 dB: the model gives much of the stem up);
what the error is made of, in dB against the true stem: each true stem's part (least squares over the true stems:
another stem leaking in, or, for the stem itself, the part of it missing) and the rest (artifacts); and the SNR of
the estimate in each band.

    python scripts/stem_errors.py data/synth-test --subset test [--model NAME | --checkpoint PATH] [--json F]

Tracks whose stem is digitally silent are left out of that stem's figures, as `bsmamba2 evaluate` does.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bsmamba2.config import DataConfig
from bsmamba2.errors import BSMamba2Error
from bsmamba2.metrics import band_snrs, usdr
from bsmamba2.separate import add_model_flags, load_separator
from bsmamba2.tracks import has_stem, list_tracks, read_stem, stem_info

BAND_EDGES_HZ = (0, 75, 150, 300, 600, 1200, 2400, 5000, 22050)


def relative_db(audio: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(max(np.sum(audio ** 2), 1e-12) / max(np.sum(reference ** 2), 1e-12)))


def stem_errors(references: dict, stem: str, estimate: np.ndarray, rate: int) -> dict:
    """The figures of one stem's estimate against the true stems `references` ({name: (channels, samples)})."""
    reference = references[stem].astype(np.float64)
    error = estimate - reference
    sources = np.stack([audio.ravel() for audio in references.values()], axis=1).astype(np.float64)
    weights = np.linalg.lstsq(sources, error.ravel(), rcond=None)[0]
    parts = {name: relative_db(weight * audio, reference) for (name, audio), weight in zip(references.items(), weights)}
    return {"usdr": usdr(reference, estimate), "level": relative_db(estimate, reference), "error": parts,
            "artifacts": relative_db(error.ravel() - sources @ weights, reference),
            "bands": band_snrs(reference, estimate, rate, BAND_EDGES_HZ)}


def mean_figures(rows: list) -> dict:
    """The mean over tracks of each figure (nested dicts and lists alike)."""
    first = rows[0]
    if isinstance(first, dict):
        return {key: mean_figures([row[key] for row in rows]) for key in first}
    if isinstance(first, list):
        return [mean_figures(list(column)) for column in zip(*rows)]
    return round(float(np.mean(rows)), 2)


def markdown(figures: dict) -> str:
    sources = list(next(iter(figures.values()))["error"])
    bands = [f"{low}-{high} Hz" for low, high in zip(BAND_EDGES_HZ, BAND_EDGES_HZ[1:])]
    lines = ["| stem | uSDR | level | " + " | ".join(f"error: {name}" for name in sources) + " | artifacts | "
             + " | ".join(bands) + " |", "|---" * (4 + len(sources) + len(bands)) + "|"]
    for stem, row in figures.items():
        cells = [row["usdr"], row["level"], *(row["error"][name] for name in sources), row["artifacts"], *row["bands"]]
        lines.append(f"| {stem} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a folder of track folders in subsets, MUSDB18-HQ style")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--json", help="write the per-track and mean figures here")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    try:
        tracks = list_tracks(args.root, args.subset)
        separator = load_separator(args)
    except BSMamba2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    per_track = {}
    for track in tracks:
        rate = stem_info(track, "mixture").sample_rate
        estimates = separator.separate(read_stem(track, "mixture"), rate)
        # the error is fitted over every true stem the track has, also those the model does not estimate
        sources = dict.fromkeys([*DataConfig().sources, *estimates])
        references = {stem: read_stem(track, stem) for stem in sources if has_stem(track, stem)}
        per_track[track.name] = {stem: stem_errors(references, stem, estimates[stem], rate)
                                 for stem in estimates if stem in references and np.any(references[stem])}
    stems = list(next(iter(per_track.values())))
    figures = {stem: mean_figures([row[stem] for row in per_track.values() if stem in row]) for stem in stems}
    print(markdown(figures))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"mean": figures, "tracks": per_track}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
