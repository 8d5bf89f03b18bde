#!/usr/bin/env python3
"""Render a synthetic MUSDB18-HQ-style set with tools/gen_multitrack.py, one track at a time.

The generator stops a whole batch when one track fails (a vocal note that starts after the song's end raises
in its `render`), and a few seeds never finish; this driver calls its `make_track` per track with a time limit,
skips the failures and reports them, so a long render survives. Track names and seeds are the generator's own (`synth_<seed>_<index>`, seed*100003+index).

  python scripts/render_synth.py OUT --tracks 240 --duration 30 --seed 10 --workers 2 \
      --soundfont /usr/share/sounds/sf2/FluidR3_GM.sf2

The generator's Debian and PyPI dependencies are listed in docs/training.md, "Synthetic data".
"""
import argparse
import importlib.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor


def load_generator(path):
    spec = importlib.util.spec_from_file_location("gen_multitrack", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_GENERATORS = {}  # per worker process: the generator keeps its loaded soundfonts between tracks


def _out_of_time(signum, frame):
    raise TimeoutError("the track took longer than --timeout")


def render_one(job):
    generator_path, timeout, args = job
    if generator_path not in _GENERATORS:
        _GENERATORS[generator_path] = load_generator(generator_path)
    generator = _GENERATORS[generator_path]
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(timeout)
    try:
        generator.make_track(args)
        return args[1], None
    except Exception as error:  # one bad track must not stop the set
        return args[1], f"{type(error).__name__}: {error}"
    finally:
        signal.alarm(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--generator", default=os.path.join(os.path.dirname(__file__), "..", "tools",
                                                            "gen_multitrack.py"))
    parser.add_argument("--tracks", type=int, default=4)
    parser.add_argument("--first", type=int, default=0, help="index of the first track (to extend a set)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--subset", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocals", default="mix")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--soundfont", nargs="+", required=True)
    parser.add_argument("--no-avl", action="store_true")
    parser.add_argument("--p-instrumental", type=float, default=0.05)
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per track")
    args = parser.parse_args()

    generator = load_generator(args.generator)
    avl = [] if args.no_avl else [p for p in generator.AVL_KITS if os.path.exists(p)]
    out_dir = os.path.join(args.out, args.subset)
    jobs = []
    for i in range(args.first, args.first + args.tracks):
        name = f"synth_{args.seed:04d}_{i:05d}"
        if os.path.exists(os.path.join(out_dir, name, "meta.json")):
            continue  # already rendered: lets an interrupted render resume
        jobs.append((args.generator, args.timeout, (out_dir, name, args.seed * 100003 + i, args.duration, args.vocals,
                                      args.soundfont, avl, "auto", False, args.p_instrumental, False)))
    failures = []
    with ProcessPoolExecutor(args.workers) as pool:
        for name, error in pool.map(render_one, jobs):
            print(f"{name}: {'ok' if error is None else 'skipped: ' + error}", flush=True)
            if error is not None:
                failures.append(name)
    print(f"rendered {len(jobs) - len(failures)} of {len(jobs)} tracks into {out_dir}; skipped {failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
