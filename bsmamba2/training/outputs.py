"""What a run writes in RUN_DIR: checkpoints, `metrics.jsonl`, `config.yaml`, TensorBoard events (if installed).

    last.ckpt            every `checkpoint_every` steps, at the end, and on SIGINT/SIGTERM (resume point)
    step_<8 digits>.ckpt the last `keep_last` of those (hard links to the same bytes where the disk allows)
    best.ckpt            the state with the best mean validation uSDR
    metrics.jsonl        one JSON object per logged step ({"step", "loss", "lr", ...}) or validation
                         ({"step", "usdr": {stem: dB}, ...})
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import __version__
from ..checkpoint import atomic_save
from ..config import Config
from ..files import temporary_path, write_text_atomic

log = logging.getLogger("bsmamba2")

LAST = "last.ckpt"
BEST = "best.ckpt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


def step_checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.ckpt"


def save_checkpoint(payload: dict, run_dir: Path, keep_last: int) -> None:
    """Write last.ckpt atomically, keep it as step_N.ckpt too, and delete step checkpoints beyond `keep_last`."""
    last = run_dir / LAST
    atomic_save(payload, last)
    _copy_atomically(last, run_dir / step_checkpoint_name(payload["step"]))
    for old in sorted(run_dir.glob("step_*.ckpt"))[:-keep_last]:
        old.unlink()


def _copy_atomically(source: Path, destination: Path) -> None:
    temporary = temporary_path(destination)
    try:
        os.link(source, temporary)  # no second copy of the bytes
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, destination)


def write_config(config: Config, run_dir: Path) -> None:
    write_text_atomic(run_dir / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))


def capture_rng() -> dict:
    """Python, numpy and torch generator states as plain values (what `read_checkpoint` rebuilds: no numpy arrays)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def code_version() -> dict:
    """The package version and, when run from a git checkout, its commit."""
    version = {"bsmamba2": __version__, "torch": str(torch.__version__)}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return version


class MetricsLog:
    """Appends records to metrics.jsonl (and TensorBoard when installed); a resumed run first drops the
    records of steps after its checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resumed_step: int):
        self.path = run_dir / METRICS
        self._keep_records_until(resumed_step)
        self.file = open(self.path, "a", buffering=1)
        self.tensorboard = _tensorboard_writer(run_dir / "tensorboard", resumed_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in _scalars(record, "valid/" if "usdr" in record else "train/"):
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _keep_records_until(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _record_step(line) is not None and _record_step(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def _record_step(line: str):
    try:
        return json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None  # a line cut short by a kill


def _scalars(record: dict, prefix: str):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield prefix + key, value


def _tensorboard_writer(directory: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed: metrics go to %s only", METRICS)
        return None
    return SummaryWriter(str(directory), purge_step=purge_step or None)
