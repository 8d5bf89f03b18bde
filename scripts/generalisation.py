#!/usr/bin/env python3
"""Does a model help on songs unlike its training songs, at every vocal level? For each song and each
vocal-to-accompaniment level, the SDR improvement over the mixture: the estimate's uSDR minus that of the untouched
mixture taken as the estimate, for the vocals and for the accompaniment (`no_vocals`, the mixture minus the vocals
estimate). A negative improvement means the model made that stem worse than doing nothing. Beside it, the vocal
level the model hears (its vocals estimate over its `no_vocals`, in dB): where that barely follows the true level, no
rule keyed on the model's own estimates can tell a loud voice it misses from a quiet one. Then each song's voice
alone and accompaniment alone as the whole mixture: the uSDR of that stem's estimate (a track that is all one stem
should come back nearly whole; 0 dB is as far off as silence), the voice alone 4 semitones lower and higher, and
which frequencies of the voice alone the model loses (the SNR of its estimate in each band).

    python scripts/generalisation.py --songs 8 --duration 15 --levels -6 0 6 12 --json results/generalisation.json
    python scripts/generalisation.py --model synth-4stem ...          # any --model / --checkpoint, as `separate`

The songs are tools/procedural_songs.py's `holdout` family (Karplus–Strong plucks, tuned percussion, voices spoken by
flite), made by methods no training song uses, with no reverb, rendered afresh from --seed. At each level the
vocals are scaled so that their energy over the accompaniment's is exactly that many dB, then the mixture is brought
to a peak of −1 dBFS. Needs Debian's flite.
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import soxr

from bsmamba2.errors import BSMamba2Error
from bsmamba2.metrics import band_snrs, usdr
from bsmamba2.separate import add_model_flags, load_separator

SONGS = Path(__file__).resolve().parents[1] / "tools" / "procedural_songs.py"
PEAK = 0.89  # every mixture's peak: −1 dBFS
REPITCH = (-4, 4)  # semitones: the voice alone, also played this much lower and higher
BAND_EDGES_HZ = (0, 150, 300, 600, 1200, 2400, 5000, 22050)  # the voice alone: the SNR of its estimate in each band


def load_songs_module():
    spec = importlib.util.spec_from_file_location("procedural_songs", SONGS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mix_at_level(stems: dict, level_db: float) -> tuple:
    """(vocals, accompaniment, mixture) with vocals over accompaniment at `level_db`, mixture peak at −1 dBFS."""
    accompaniment = sum(audio for stem, audio in stems.items() if stem != "vocals")
    gain = np.sqrt(10 ** (level_db / 10) * np.sum(accompaniment ** 2) / np.sum(stems["vocals"] ** 2))
    vocals = gain * stems["vocals"]
    scale = PEAK / np.max(np.abs(vocals + accompaniment))
    vocals, accompaniment = (scale * vocals).astype(np.float32), (scale * accompaniment).astype(np.float32)
    return vocals, accompaniment, vocals + accompaniment


def summary(values: list) -> dict:
    return {"mean": round(float(np.mean(values)), 2), "min": round(float(np.min(values)), 2),
            "tracks": [round(float(value), 2) for value in values]}


def heard_level_db(estimates: dict) -> float:
    """The vocal level the model hears: its vocals estimate's energy over its `no_vocals`', in dB."""
    return float(10 * np.log10(np.sum(estimates["vocals"] ** 2) / np.sum(estimates["no_vocals"] ** 2)))


def evaluate(separator, songs: list, levels: list, rate: int) -> dict:
    """{level: {"vocals": summary, "accompaniment": summary}} of the SDR improvements, the overall figures, and
    {level: summary} of the vocal level the model hears."""
    table, heard = {}, {}
    for level in levels:
        gains, heard_levels = {"vocals": [], "accompaniment": []}, []
        for stems in songs:
            vocals, accompaniment, mixture = mix_at_level(stems, level)
            estimates = separator.separate(mixture, rate)
            for name, reference, estimate in (("vocals", vocals, estimates["vocals"]),
                                              ("accompaniment", accompaniment, estimates["no_vocals"])):
                gains[name].append(usdr(reference, estimate) - usdr(reference, mixture))
            heard_levels.append(heard_level_db(estimates))
        table[f"{level:+g} dB"] = {name: summary(values) for name, values in gains.items()}
        heard[f"{level:+g} dB"] = summary(heard_levels)
    every = [value for row in table.values() for stem in row.values() for value in stem["tracks"]]
    return {"levels": table, "mean_improvement_db": round(float(np.mean(every)), 2),
            "min_improvement_db": round(float(np.min(every)), 2), "heard_level_db": heard}


def one_stem_alone(separator, songs: list, rate: int) -> dict:
    """{"vocals": summary, "accompaniment": summary} of the uSDR of the vocals estimate when the mixture is the voice
    alone, and of `no_vocals` when it is the accompaniment alone (each at a peak of −1 dBFS); and the same for the
    voice alone played REPITCH semitones lower and higher (pitch and tempo together), to show how far a voice's
    pitch decides whether the model takes it for a voice; and the voice alone's SNR per band ("vocals by band")."""
    scores = {"vocals": [], "accompaniment": [], **{f"vocals {shift:+g} st": [] for shift in REPITCH}}
    bands = []
    for stems in songs:
        accompaniment = sum(audio for stem, audio in stems.items() if stem != "vocals")
        alone = [("vocals", stems["vocals"], "vocals"), ("accompaniment", accompaniment, "no_vocals")]
        alone += [(f"vocals {shift:+g} st", repitch(stems["vocals"], shift, rate), "vocals") for shift in REPITCH]
        for name, audio, output in alone:
            audio = (PEAK / np.max(np.abs(audio)) * audio).astype(np.float32)
            estimate = separator.separate(audio, rate)[output]
            scores[name].append(usdr(audio, estimate))
            if name == "vocals":
                bands.append(band_snrs(audio, estimate, rate, BAND_EDGES_HZ))
    results = {name: summary(values) for name, values in scores.items()}
    results["vocals by band"] = {f"{low}-{high} Hz": summary(values)
                                 for low, high, values in zip(BAND_EDGES_HZ, BAND_EDGES_HZ[1:], zip(*bands))}
    return results


def repitch(audio: np.ndarray, semitones: float, rate: int) -> np.ndarray:
    """(channels, samples) played 2^(semitones/12) times faster."""
    return soxr.resample(audio.T, rate * 2 ** (semitones / 12), rate, quality="HQ").T


def markdown(results: dict) -> str:
    lines = ["| vocal level | vocals: mean (min) | accompaniment: mean (min) | level heard: mean (min to max) |",
             "|---|---|---|---|"]
    for level, row in results["levels"].items():
        heard = results["heard_level_db"][level]
        lines.append(f"| {level} | {row['vocals']['mean']:+.2f} ({row['vocals']['min']:+.2f}) | "
                     f"{row['accompaniment']['mean']:+.2f} ({row['accompaniment']['min']:+.2f}) | "
                     f"{heard['mean']:+.1f} ({heard['min']:+.1f} to {max(heard['tracks']):+.1f}) |")
    lines.append(f"\nSDR improvement over the mixture (dB), mean over every track and stem "
                 f"{results['mean_improvement_db']:+.2f}, lowest {results['min_improvement_db']:+.2f}.")
    alone = results["alone"]
    lines.append(f"One stem alone as the mixture, uSDR of its estimate (dB): the voice {alone['vocals']['mean']:.2f} "
                 f"(lowest {alone['vocals']['min']:.2f}), the accompaniment {alone['accompaniment']['mean']:.2f} "
                 f"(lowest {alone['accompaniment']['min']:.2f}); the voice repitched "
                 + ", ".join(f"{shift:+g} semitones {alone[f'vocals {shift:+g} st']['mean']:.2f}" for shift in REPITCH)
                 + ".")
    lines.append("The voice alone, SNR of its estimate per band, mean (lowest) in dB: " + ", ".join(
        f"{band} {row['mean']:.1f} ({row['min']:.1f})" for band, row in alone["vocals by band"].items()) + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per song")
    parser.add_argument("--levels", type=float, nargs="+", default=[-6, 0, 6, 12],
                        help="vocal-to-accompaniment levels in dB")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", help="write the results here")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    try:
        separator = load_separator(args, two_stems="vocals")
    except BSMamba2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    songs_module = load_songs_module()
    songs = [songs_module.render_song("holdout", args.seed, index, args.duration) for index in range(args.songs)]
    results = {"command": " ".join(["python scripts/generalisation.py", *(argv if argv is not None else sys.argv[1:])]),
               "songs": args.songs, "duration_seconds": args.duration, "seed": args.seed,
               **evaluate(separator, songs, args.levels, songs_module.RATE),
               "alone": one_stem_alone(separator, songs, songs_module.RATE)}
    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
