"""Peak memory of `bsmamba2 separate` on a short and a long input: streaming means they must be about equal.

    python scripts/memory_check.py                      # 2 and 20 minutes, configs/small.yaml
    python scripts/memory_check.py --minutes 2 60 --config configs/bsmamba2_vocals.yaml

Generates 44.1 kHz stereo noise files of the given lengths and an untrained checkpoint for the config (the
weights do not change the memory), runs the real command line on each file in a fresh process, and reads that
process's peak resident set size from the kernel (`os.wait4`). Exits 1 if the peaks differ by 15 % or more.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bsmamba2 import build_model, load_config
from bsmamba2.checkpoint import save_model
from bsmamba2.sizes import MB

SMALL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "small.yaml"
RATE = 44100
TOLERANCE = 0.15


def write_noise(path: Path, minutes: float) -> None:
    """A long file written block by block, so this script's own memory stays small."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=RATE, channels=2, subtype="PCM_16") as file:
        for start in range(0, int(minutes * 60 * RATE), 60 * RATE):
            frames = min(60 * RATE, int(minutes * 60 * RATE) - start)
            file.write((0.1 * rng.standard_normal((frames, 2))).astype(np.float32))


def peak_memory(command: list[str]) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of one run of `command`."""
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit status {process.returncode}")
    return usage.ru_maxrss * 1024 / MB, time.perf_counter() - started  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs=2, default=[2, 20], metavar=("SHORT", "LONG"))
    parser.add_argument("--config", default=SMALL_CONFIG, help="YAML config of the model (default: %(default)s)")
    parser.add_argument("--workdir", help="keep the inputs and outputs here (default: a temporary folder)")
    args = parser.parse_args()

    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint = workdir / "model.ckpt"
        save_model(build_model(config), checkpoint)
        results = []
        for minutes in args.minutes:
            audio = workdir / f"noise_{minutes:g}min.wav"
            if not audio.exists():
                write_noise(audio, minutes)
            command = [sys.executable, "-m", "bsmamba2", "separate", str(audio), "--checkpoint", str(checkpoint),
                       "-o", str(workdir / "out"), "--force", "--quiet"]
            peak, wall = peak_memory(command)
            results.append((minutes, peak, wall))
            print("$ " + " ".join(command), flush=True)
            print(f"{minutes:g} min input: peak RSS {peak:.0f} MB, wall {wall:.0f} s "
                  f"(real-time factor {wall / (minutes * 60):.3f})", flush=True)
    (_, short_peak, _), (_, long_peak, _) = results
    difference = abs(long_peak - short_peak) / short_peak
    print(f"difference {100 * difference:.1f} % (limit {100 * TOLERANCE:.0f} %)")
    return 0 if difference < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
