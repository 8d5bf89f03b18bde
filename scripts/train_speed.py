#!/usr/bin/env python3
"""Training throughput of two versions of the code, side by side in one run: steps per second of `train.py`.

    python scripts/train_speed.py --baseline 4d217ec --config configs/synth_4stem.yaml --steps 30 --rounds 2

Each version (the commit `--baseline`, taken out with `git archive`, and this working tree) trains from scratch
with its own copy of `--config`, as the config's recipe runs it (`--nproc` single-threaded processes through
torchrun, DDP over gloo), for `--steps` steps; the first `--log-every` steps (start-up, warm-up) are not timed.
The versions alternate round by round, so a machine that is busier at one moment penalises both. Speed is read
from each run's own log (`metrics.jsonl`: steps per second, seconds per step spent waiting for data).
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the git commit to compare the working tree with")
    parser.add_argument("--config", default="configs/synth_4stem.yaml", help="path inside each version")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both versions (e.g. data.root=...)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5, help="steps per timed window (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every windows (the first is not timed)")

    with tempfile.TemporaryDirectory() as scratch:
        baseline_tree = Path(scratch) / "baseline"
        export_commit(args.baseline, baseline_tree)
        versions = {f"baseline {args.baseline}": baseline_tree, "working tree": REPO}
        runs = {name: [] for name in versions}
        for round_index in range(args.rounds):
            for name, tree in versions.items():
                run_dir = Path(scratch) / f"run-{round_index}-{len(runs[name])}-{tree.name}"
                runs[name].append(train_and_time(tree, run_dir, args))
                speed, data = runs[name][-1]
                print(f"round {round_index + 1}, {name}: {speed:.3f} steps/s, {data:.3f} s/step waiting for data",
                      flush=True)

    speeds = {name: sum(speed for speed, _ in results) / len(results) for name, results in runs.items()}
    baseline, current = speeds.values()
    print(f"{args.config}, {args.nproc} processes, {args.steps} steps × {args.rounds} rounds: "
          f"baseline {baseline:.3f} steps/s, working tree {current:.3f} steps/s, ratio {current / baseline:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "config": args.config,
            "nproc": args.nproc, "cpus": os.cpu_count(),
            "runs": {name: [{"steps_per_s": s, "data_s_per_step": d} for s, d in results]
                     for name, results in runs.items()},
            "steps_per_s": speeds, "ratio": current / baseline}, indent=2) + "\n")
    return 0


def export_commit(commit: str, destination: Path) -> None:
    """The commit's files (no .git): what that version of the code was."""
    destination.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                             check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as file:
        file.write(archive)
        file.seek(0)
        with tarfile.open(fileobj=file) as tar:
            tar.extractall(destination, filter="data")


def train_and_time(tree: Path, run_dir: Path, args) -> tuple[float, float]:
    """Train `tree`'s code for `args.steps` steps; (steps per second, data seconds per step) past the first window."""
    overrides = [f"training.max_steps={args.steps}", f"training.log_every={args.log_every}",
                 f"training.checkpoint_every={args.steps}", f"training.validate_every={10 * args.steps}",
                 "training.warmup_steps=0", "training.decay_steps=0",
                 "data.valid_tracks=[]", *args.overrides]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(tree / "train.py"), "--config", str(tree / args.config), "--out", str(run_dir), "--quiet"]
    for override in overrides:
        command += ["--set", override]
    # the version's own package first on the path, whatever is installed; its config's data paths resolve here
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"{tree}: train.py failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [record for record in records if "steps_per_s" in record][1:]
    seconds = sum(args.log_every / record["steps_per_s"] for record in timed)
    data_seconds = sum(args.log_every * record["data_s_per_step"] for record in timed)
    steps = args.log_every * len(timed)
    return steps / seconds, data_seconds / steps


if __name__ == "__main__":
    sys.exit(main())
