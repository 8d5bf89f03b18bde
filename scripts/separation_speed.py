#!/usr/bin/env python3
"""Models' separation speed side by side: `bsmamba2 separate` on one song, each run a fresh process, the models
taking turns (A, B, A, B, ...) so that load from other jobs falls on all alike; the median wall time of each (from
the command's --json summary, the model's load excluded) and its ratio to the first model's.

    python scripts/separation_speed.py runs/old.ckpt synth-4stem \
        --song data/synth-test/test/synth_0777_00000/mixture.wav

A model is a registry name (`bsmamba2 models`) or a checkpoint file. Default song: the bundled example (10 s).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bsmamba2.pretrained import example_song


def separate_seconds(model: str, song: Path, threads: int, folder: Path) -> float:
    choice = ["--checkpoint", model] if Path(model).is_file() else ["--model", model]
    done = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", str(song), *choice, "--device", "cpu",
                           "--threads", str(threads), "--json", "--quiet", "--force", "-o", str(folder)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        sys.exit(f"separate with {model}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)["inputs"][0]["wall_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="registry names or checkpoint files; the first is the baseline")
    parser.add_argument("--song", type=Path, help="the audio file (default: the bundled example)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    song = args.song or example_song()
    times = {model: [] for model in args.models}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for model in args.models:
                times[model].append(separate_seconds(model, song, args.threads, Path(folder)))
    baseline = statistics.median(times[args.models[0]])
    print(f"{song.name}, {args.threads} threads, median of {args.repeats} runs each (taking turns):")
    for model, seconds in times.items():
        print(f"  {model}: {statistics.median(seconds):.2f} s ({statistics.median(seconds) / baseline:.2f}x the first)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
