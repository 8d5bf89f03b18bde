"""`bsmamba2 evaluate`: separate every track of a MUSDB18-HQ-style folder and score each stem (uSDR, cSDR).

    bsmamba2 evaluate --checkpoint model.ckpt --data MUSDB18HQ [--subset test] [--tracks NAME ...] [-o results]

Writes OUT/results.json ({"tracks": {track: {stem: {"usdr", "csdr"}}}, "aggregate": {stem: {"usdr": {"mean",
"median", "std", "count"}, "csdr": {...}}}}, undefined scores as null, aggregates over the defined ones),
OUT/results.csv (one row per track and stem) and prints a table. Both files are rewritten after every track, so
an interrupted run keeps the tracks done so far. `--save-estimates` keeps the separated stems as float32 WAV in
OUT/estimates/<subset>/<track>/<stem>.wav (museval's estimates layout; float, so the scores can be recomputed
exactly).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .audio import AudioWriter
from .errors import BSMamba2Error
from .files import refuse_overwrite, write_text_atomic
from .metrics import museval_missing_reason, score_track
from .runtime import setup_process
from .separate import add_model_flags, load_separator
from .tracks import check_stems, list_tracks, pick_tracks, read_stem

log = logging.getLogger("bsmamba2")

METRICS = ("usdr", "csdr")
RESULT_FILES = ("results.json", "results.csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="ROOT",
                        help="MUSDB18-HQ-style folder: ROOT/<subset>/<track>/{mixture,<stem>}.wav|flac")
    parser.add_argument("--subset", default="test", help="subset folder under ROOT (default: test)")
    parser.add_argument("--tracks", nargs="+", metavar="NAME", help="evaluate only these tracks (folder names)")
    parser.add_argument("-o", "--out", default="results", metavar="DIR", help="output folder (default: results)")
    parser.add_argument("--save-estimates", action="store_true",
                        help="keep the separated stems in OUT/estimates/<subset>/<track>/<stem>.wav")
    parser.add_argument("--no-csdr", action="store_true",
                        help="skip cSDR (museval; slow on long tracks): report uSDR only")
    parser.add_argument("--force", action="store_true", help="overwrite existing results and estimates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines (the table is printed)")
    add_model_flags(parser)


def run(args: argparse.Namespace) -> int:
    setup_process()
    tracks = select_tracks(args.data, args.subset, args.tracks)
    out = Path(args.out)
    estimates_dir = out / "estimates" / args.subset
    for path in [out / name for name in RESULT_FILES] + ([estimates_dir] if args.save_estimates else []):
        refuse_overwrite(path, args.force)

    with_csdr = not args.no_csdr
    if with_csdr and (reason := museval_missing_reason()):
        log.warning("cSDR unavailable, reporting uSDR only: %s", reason)
        with_csdr = False

    separator = load_separator(args)
    stems = separator.model.stems  # scored; a one-stem model's complement (no_<stem>) is not
    for track_dir in tracks:  # fail before hours of separation, not in the middle
        check_stems(track_dir, ["mixture", *stems], same_shape=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BSMamba2Error(f"cannot create the output folder {out}: {error.strerror or error}") from None

    results: dict = {}
    started = time.perf_counter()
    progress = tqdm(tracks, desc="evaluate", unit="track", disable=args.quiet)
    for track_dir in progress:
        mixture, references, sample_rate = read_track(track_dir, stems)
        separated = separator.separate(mixture, sample_rate)
        estimates = {stem: separated[stem] for stem in stems}
        if args.save_estimates:
            for stem, audio in estimates.items():
                writer = AudioWriter(estimates_dir / track_dir.name / f"{stem}.wav", sample_rate, len(audio),
                                     "wav", "32f")
                writer.write(audio)
                writer.commit()
        results[track_dir.name] = score_track(references, estimates, mixture, sample_rate, with_csdr)
        write_results(out, results)
        progress.set_postfix_str(", ".join(f"{stem} uSDR {results[track_dir.name][stem]['usdr']:.2f}"
                                           for stem in stems))
    progress.close()
    log.info("evaluated %d tracks in %.0f s; results in %s", len(tracks), time.perf_counter() - started, out)
    print(format_table(results, stems))
    return 0


def select_tracks(root, subset: str, names) -> list[Path]:
    """The track folders to evaluate: all of ROOT/subset, or the named ones (each must exist)."""
    tracks = list_tracks(root, subset)
    return pick_tracks(tracks, names, str(Path(root) / subset)) if names else tracks


def read_track(track_dir: Path, stems: list) -> tuple:
    """The mixture, the reference stems and the sample rate of a track, checking that all files agree."""
    mixture_info = check_stems(track_dir, ["mixture", *stems], same_shape=True)[0]
    references = {stem: read_stem(track_dir, stem) for stem in stems}
    return read_stem(track_dir, "mixture"), references, mixture_info.sample_rate


def aggregate(results: dict, stems: list) -> dict:
    """Mean, median, population std and count over the tracks where a score is defined (None when none is)."""
    summary = {}
    for stem in stems:
        summary[stem] = {}
        for metric in METRICS:
            values = np.array([scores[stem][metric] for scores in results.values()
                               if not math.isnan(scores[stem][metric])])
            defined = len(values) > 0
            summary[stem][metric] = {
                "mean": float(np.mean(values)) if defined else None,
                "median": float(np.median(values)) if defined else None,
                "std": float(np.std(values)) if defined else None,
                "count": len(values),
            }
    return summary


def write_results(out: Path, results: dict) -> None:
    """OUT/results.json and OUT/results.csv for the tracks scored so far."""
    stems = list(next(iter(results.values())))
    document = {
        "tracks": {track: {stem: {metric: _defined(value) for metric, value in scores.items()}
                           for stem, scores in track_scores.items()}
                   for track, track_scores in results.items()},
        "aggregate": aggregate(results, stems),
    }
    write_text_atomic(out / "results.json", json.dumps(document, indent=2) + "\n")

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["track", "stem", *METRICS])
    for track, track_scores in results.items():
        for stem, scores in track_scores.items():
            writer.writerow([track, stem, *("" if math.isnan(scores[m]) else f"{scores[m]:.6f}" for m in METRICS)])
    write_text_atomic(out / "results.csv", table.getvalue())


def format_table(results: dict, stems: list) -> str:
    """Per-track scores in dB, then the mean and median over tracks."""
    columns = [f"{metric[0]}SDR {stem}" for stem in stems for metric in METRICS]
    rows = [(track, [scores[stem][metric] for stem in stems for metric in METRICS])
            for track, scores in results.items()]
    summary = aggregate(results, stems)
    for statistic in ("mean", "median"):
        rows.append((statistic, [summary[stem][metric][statistic] for stem in stems for metric in METRICS]))
    name_width = max(len(name) for name, _ in rows + [("track", None)])
    width = max(8, *(len(column) for column in columns))
    lines = ["  ".join(["track".ljust(name_width), *(column.rjust(width) for column in columns)])]
    for index, (name, values) in enumerate(rows):
        if index == len(results):
            lines.append("-" * len(lines[0]))
        cells = ["n/a" if _defined(value) is None else f"{value:.2f}" for value in values]
        lines.append("  ".join([name.ljust(name_width), *(cell.rjust(width) for cell in cells)]))
    return "\n".join(lines)


def _defined(value):
    return None if value is None or math.isnan(value) else value
