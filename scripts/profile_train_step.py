#!/usr/bin/env python3
"""Where a training step's time goes: data, forward, loss, backward, optimizer + EMA (seconds per step).

    python scripts/profile_train_step.py --config configs/small.yaml --steps 5

Builds the trainer `bsmamba2 train` builds (in a temporary run directory) and times the phases of its own
training step (`Trainer.train_step`, without gradient accumulation or validation), after `--warmup` untimed steps.
Wall-clock and process CPU seconds are both shown: on a machine shared with other jobs the wall clock stretches,
CPU seconds much less.
"""
import argparse
import os
import sys
import tempfile
import time

from bsmamba2 import runtime

runtime.prepare_openmp()  # as the bsmamba2 command does, before torch loads

import torch  # noqa: E402

from bsmamba2.config import load_config  # noqa: E402
from bsmamba2.training.loop import STEP_PHASES as PHASES, Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    runtime.setup_process()  # as `bsmamba2 train` does
    config = load_config(args.config, args.overrides + ["training.grad_accum_steps=1"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, quiet=True)
        stream = trainer.data_stream()
        wall, cpu = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0.0)
        for step in range(args.warmup + args.steps):
            times = time_step(trainer, stream)
            if step >= args.warmup:
                for phase in PHASES:
                    wall[phase] += times[phase][0] / args.steps
                    cpu[phase] += times[phase][1] / args.steps
    phases = [phase for phase in PHASES if phase != "teacher" or trainer.teacher is not None]
    step_wall, step_cpu = sum(wall.values()), sum(cpu.values())
    audio_seconds = config.training.batch_size * config.data.segment_seconds
    print(f"{args.config}: batch {config.training.batch_size} × {config.data.segment_seconds:g} s, "
          f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps, load average {os.getloadavg()[0]:.1f}")
    print(f"  {'phase':14s} {'wall s':>7s} {'share':>6s} {'CPU s':>7s}")
    for phase in phases:
        print(f"  {phase:14s} {wall[phase]:7.3f} {100 * wall[phase] / step_wall:5.1f}% {cpu[phase]:7.3f}")
    print(f"  {'step':14s} {step_wall:7.3f} {100.0:5.1f}% {step_cpu:7.3f}  → {1 / step_wall:.3f} steps/s, "
          f"{audio_seconds / step_wall:.2f} s of audio per second (wall clock)")
    return 0


def time_step(trainer: Trainer, stream) -> dict:
    """One `Trainer.train_step`, its phases timed: {phase: (wall seconds, CPU seconds)}."""
    times = dict.fromkeys(PHASES, (0.0, 0.0))
    started = _now(trainer.device)

    def lap(phase: str) -> None:
        nonlocal started
        now = _now(trainer.device)
        times[phase] = (times[phase][0] + now[0] - started[0], times[phase][1] + now[1] - started[1])
        started = now

    trainer.train_step(stream, lap=lap)
    return times


def _now(device: torch.device) -> tuple:
    if device.type == "cuda":  # kernels run asynchronously: a phase ends when its kernels have
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


if __name__ == "__main__":
    sys.exit(main())
