#!/usr/bin/env python3
"""The paper model's CPU inference speed from each entry point, side by side in one run, each in a fresh process
with nothing set up by hand (as a user runs it), and int8's output against float32.

    python scripts/cpu_inference_speed.py --threads 2 --seconds 4

Writes the paper model with random weights in the published checkpoints' layout to a temporary folder, then:
1. `bsmamba2.load_model(ckpt)` + `model(x)`: seconds per second of audio (median of --repeats forwards after a
   warm-up one) as loaded (glibc keeps freed memory), with BSMAMBA2_KEEP_FREED_MEMORY=0, and with quantize="int8";
   and with torch imported before bsmamba2 (too late for bsmamba2 to choose OpenMP's wait policy);
2. the same audio file through `Separator.separate_file` and through `bsmamba2 separate` (the time each takes
   for the file; the CLI's from its --json summary);
3. the int8 output against the float32 one, as SDR in dB.
Threads are set with OMP_NUM_THREADS in every child. Run it on an otherwise idle machine (the load average is
printed before and after).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FORWARD = """
from bsmamba2 import load_model
import json, sys, time, numpy as np, torch
model = load_model(sys.argv[1], quantize=sys.argv[2] or None)
wave = 0.1 * torch.randn(1, 2, round(float(sys.argv[3]) * model.sample_rate), generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for _ in range(int(sys.argv[4]) + 1):
        start = time.perf_counter()
        out = model(wave)
        times.append(time.perf_counter() - start)
np.save(sys.argv[5], out.numpy())
print(json.dumps({"seconds": sorted(times[1:])[len(times[1:]) // 2], "first": times[0]}))
"""

SEPARATOR = """
import json, sys, time
from bsmamba2 import Separator
separator = Separator(sys.argv[1], device="cpu")
start = time.perf_counter()
separator.separate_file(sys.argv[2], sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def child(code: str, *args, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"a measurement failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config of the model (default: the paper model)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per forward (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards after the warm-up (default: "
                        "%(default)s)")
    args = parser.parse_args()

    import soundfile as sf
    import torch

    from bsmamba2.checkpoint import build_model, save_model
    from bsmamba2.config import Config, load_config

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    for variable in ("BSMAMBA2_KEEP_FREED_MEMORY", "OMP_WAIT_POLICY"):
        env.pop(variable, None)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        checkpoint = folder / "model.ckpt"
        if args.config:
            save_model(build_model(load_config(args.config)), checkpoint)
        else:
            torch.save(build_model(Config()).state_dict(), checkpoint)  # the published layout: a bare state dict

        rows = {}
        for name, quantize, code, extra in (
                ("float32", "", FORWARD, {}),
                ("float32, BSMAMBA2_KEEP_FREED_MEMORY=0", "", FORWARD, {"BSMAMBA2_KEEP_FREED_MEMORY": "0"}),
                ("float32, torch imported before bsmamba2", "", "import torch" + FORWARD, {}),
                ("int8", "int8", FORWARD, {})):
            output = folder / f"{len(rows)}.npy"
            rows[name] = child(code, checkpoint, quantize, args.seconds, args.repeats, output, env={**env, **extra})
            rows[name]["output"] = np.load(output)

        song = folder / "song.wav"
        noise = np.random.default_rng(0).standard_normal((round(args.seconds * 44100), 2)).astype(np.float32)
        sf.write(song, 0.1 * noise, 44100)
        separator = child(SEPARATOR, checkpoint, song, folder / "api", env=env)["seconds"]
        done = subprocess.run([sys.executable, "-m", "bsmamba2", "separate", song, "--checkpoint", checkpoint,
                               "--device", "cpu", "--threads", str(args.threads), "--json", "-o", folder / "cli"],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"bsmamba2 separate failed:\n{done.stderr}")
        cli = json.loads(done.stdout)["inputs"][0]["wall_seconds"]

    reference = rows["float32"]["output"]
    error = reference - rows["int8"]["output"]
    sdr = 10 * np.log10(np.sum(reference ** 2) / np.sum(error ** 2))
    print(f"{args.config or 'paper model'} (random weights), {args.seconds:g} s of audio, {args.threads} threads, torch "
          f"{torch.__version__}, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{'load_model + forward, fresh process':<44}{'s per s audio':>14}{'vs float32':>12}{'first call':>12}")
    base = rows["float32"]["seconds"]
    for name, row in rows.items():
        print(f"{name:<44}{row['seconds'] / args.seconds:>14.2f}{row['seconds'] / base:>11.2f}x"
              f"{row['first'] / args.seconds:>12.2f}")
    print(f"separate_file on a {args.seconds:g} s file: Separator {separator:.1f} s, bsmamba2 separate {cli:.1f} s "
          f"(Separator / CLI {separator / cli:.2f})")
    print(f"int8 output against float32: SDR {sdr:.1f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
