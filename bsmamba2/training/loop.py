"""The training loop (the paper's recipe): AdamW, gradient accumulation and clipping, EMA, validation by uSDR,
atomic resumable checkpoints, one process or many (DistributedDataParallel under torchrun).

One step = `grad_accum_steps` micro-batches of `batch_size` examples on every process → clip → AdamW → EMA.
Everything a step depends on is in the checkpoint (weights, EMA, optimizer, schedule, RNG states, and how many
examples were drawn — the data stream is indexed by example), so a resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..apply import apply_model
from ..checkpoint import atomic_save, build_model, find_state_dict, load_model, read_checkpoint
from ..config import Config, apply_override, load_config
from ..data import StreamBatches, TrainingSegments, ValidationTracks, split_tracks
from ..errors import BSMamba2Error
from ..losses import MultiResolutionLoss
from ..metrics import usdr
from ..runtime import setup_process
from .distributed import Distributed
from .ema import EMA
from .outputs import BEST, LAST, MetricsLog, capture_rng, code_version, restore_rng, save_checkpoint, write_config
from .schedule import LearningRateSchedule

log = logging.getLogger("bsmamba2")

TRAINING_STATE_KEYS = ("config", "model", "optimizer", "scheduler", "step", "samples_seen", "rng")
# What shapes the weights and the optimizer's state: a run cannot resume under different values. Whole sections,
# then single keys (section, key).
FIXED_SECTIONS = ("audio", "model")
FIXED_KEYS = (("training", "freeze"), ("training", "lr_scales"))


def prepare_run(config_path: Optional[str], overrides: list[str], run_dir: Path,
                resume: bool) -> tuple[Config, Optional[dict]]:
    """The config and, when RUN_DIR holds last.ckpt, the checkpoint to continue from.

    Without --config a resumed run uses the config stored in its checkpoint (plus --set overrides).
    """
    last = run_dir / LAST
    if resume and not last.exists():
        raise BSMamba2Error(f"--resume: {last} does not exist (nothing to resume)")
    checkpoint = read_checkpoint(last) if last.exists() else None
    if checkpoint is not None:
        missing = [key for key in TRAINING_STATE_KEYS if key not in checkpoint]
        if missing:
            raise BSMamba2Error(f"checkpoint {last}: not a training checkpoint (no {missing[0]!r})")
    if config_path is not None:
        config = load_config(config_path, overrides)
    elif checkpoint is not None:
        values = copy.deepcopy(checkpoint["config"])
        for override in overrides:
            apply_override(values, override)
        config = Config.from_dict(values, source=f"config stored in {last}")
    else:
        raise BSMamba2Error(f"--config is required to start a new run ({last} does not exist)")
    if checkpoint is not None:
        stored, current = checkpoint["config"], config.to_dict()
        defaults = Config().to_dict()  # for a key the checkpoint's code did not have yet
        fixed = [(section, key) for section in FIXED_SECTIONS for key in current[section]] + list(FIXED_KEYS)
        for section, key in fixed:
            value, trained_with = current[section][key], stored[section].get(key, defaults[section][key])
            if trained_with != value:
                raise BSMamba2Error(f"{section}.{key} is {value!r} but the run in {run_dir} was trained with "
                                    f"{trained_with!r}; use another --out to start a new run")
    return config, checkpoint


# What `Trainer.train_step` reports to its `lap` callback as each phase ends (all but the last per micro-batch;
# "teacher" only with training.teacher).
STEP_PHASES = ("data", "teacher", "forward", "loss", "backward", "optimizer+ema")


def _no_lap(phase: str) -> None:
    pass


@dataclass
class StepResult:
    lr: float
    loss: float              # mean over the micro-batches and the ranks
    grad_norm: float         # before clipping
    updated: bool            # False: the step was skipped (non-finite loss or gradients)
    data_seconds: float      # this rank's wait for data
    stop_requested: bool     # some rank received SIGINT/SIGTERM


class Trainer:
    def __init__(self, config: Config, run_dir: Path, checkpoint: Optional[dict] = None, quiet: bool = False,
                 init_from: Optional[str] = None):
        self.config, self.run_dir, self.quiet = config, Path(run_dir), quiet
        training = config.training
        self.dist = Distributed(training.device)
        self.device = self.dist.device
        if self.device.type == "cpu":
            setup_process()  # as load_model does: a Trainer made in Python trains and validates at the CLI's speed
        if not self.dist.is_main:  # one account of the run (scan backend, progress): the other ranks only warn
            log.setLevel(logging.WARNING)
        seed_everything(training.seed)  # the same initial weights on every rank
        train_tracks, valid_tracks = split_tracks(config)
        self.train_set = TrainingSegments(train_tracks, config)
        self.valid_set = ValidationTracks(valid_tracks, config)

        self.model = build_model(config).to(self.device)
        if init_from is not None and checkpoint is None:  # a resumed run has its own weights
            self.model.load_state_dict(find_state_dict(read_checkpoint(init_from), self.model, init_from))
        freeze(self.model, training.freeze)
        self.ema = EMA(self.model, training.ema_decay) if training.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, training.lr_scales), lr=training.lr,
                                           betas=tuple(training.betas),
                                           weight_decay=training.weight_decay,
                                           # one fused kernel for all parameters: on the CPU a third of the
                                           # per-parameter loop's time for these models' hundreds of tensors
                                           fused=True if self.device.type in ("cuda", "cpu") else None)
        self.schedule = LearningRateSchedule(self.optimizer, training)
        self.autocast_dtype = autocast_dtype(training.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        self.loss = MultiResolutionLoss(training.loss, config.model.stems).to(self.device)
        self.teacher = Teacher(training.teacher, training.teacher_stems, config, self.device) if training.teacher \
            else None
        self.code_version = code_version()

        self.examples_per_step = training.batch_size * training.grad_accum_steps * self.dist.world_size
        self.step = 0
        self.samples_seen = 0  # examples drawn by all ranks: the position in the data stream
        self.best_score = -math.inf
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.network = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=device_ids)

    # ---------------------------------------------------------------------------------------------- the loop
    def run(self) -> int:
        """Train to `max_steps`; 0 when done, 128 + signal number when stopped (after saving) by SIGINT/SIGTERM."""
        training = self.config.training
        main = self.dist.is_main
        audio_seconds_per_step = self.examples_per_step * self.config.data.segment_seconds
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.config, self.run_dir)
            self._announce()
        metrics = MetricsLog(self.run_dir, self.step) if main else None
        batches = self.data_stream()
        stop = StopSignals()
        progress = tqdm(total=training.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=self.quiet or not main)
        window = LogWindow()
        try:
            while self.step < training.max_steps:
                result = self.train_step(batches, stop_requested=stop.received is not None)
                window.add(result.loss if result.updated else None, result.data_seconds)

                if self.step % training.log_every == 0 or self.step == training.max_steps:
                    record = window.record(self.step, result.lr, result.grad_norm, audio_seconds_per_step,
                                           self.nonfinite_total)
                    progress.set_postfix(loss=_short(record["loss"]), lr=f"{result.lr:.2e}", refresh=False)
                    if metrics is not None:
                        metrics.write(record)
                progress.update(1)
                if not result.updated:
                    self._stop_if_too_many_nonfinite(result.loss, result.grad_norm)
                if self.step % training.validate_every == 0 or self.step == training.max_steps:
                    self._validate_and_keep_best(metrics, progress)
                stop_votes = result.stop_requested
                if stop_votes or self.step % training.checkpoint_every == 0 or self.step == training.max_steps:
                    self._save_checkpoint()
                if stop_votes:
                    signum = stop.received or signal.SIGTERM
                    if main:
                        log.warning("%s: saved %s at step %d; run the same command again to resume",
                                    signal.Signals(signum).name, self.run_dir / LAST, self.step)
                    return 128 + signum
        finally:
            stop.restore()
            progress.close()
            if metrics is not None:
                metrics.close()
            del batches  # stops the loader's workers
            self.dist.close()
        if main:
            best = f"; best validation uSDR {self.best_score:.2f} dB" if math.isfinite(self.best_score) else ""
            log.info("finished %d steps: %s%s", self.step, self.run_dir / LAST, best)
            model = self.run_dir / (BEST if (self.run_dir / BEST).exists() else LAST)
            log.info("separate with it: bsmamba2 separate song.wav --checkpoint %s", model)
        return 0

    def train_step(self, batches, stop_requested: bool = False, lap: Callable[[str], None] = _no_lap) -> StepResult:
        """One optimizer step on the next micro-batches of `batches` (a `data_stream()`), advancing the step count.

        `lap(phase)` is called as each of STEP_PHASES ends ("optimizer+ema": clipping, the collective, AdamW and
        EMA), so a profiler times the phases of this very step (scripts/profile_train_step.py); `stop_requested`
        is this rank's vote to stop after the step.
        """
        lr = self.schedule.set_step(self.step)
        loss_sum, grad_norm, data_seconds = self._accumulate_gradients(batches, lap)
        # one collective per step: the loss summed over ranks and whether any rank was asked to stop
        loss_total, stop_votes = self.dist.sum(
            torch.stack([loss_sum.float(), torch.tensor(float(stop_requested), device=loss_sum.device)])).tolist()
        loss = loss_total / self.dist.world_size
        grad_norm = float(grad_norm)
        updated = self._update(loss, grad_norm)
        lap("optimizer+ema")
        self.step += 1
        self.samples_seen += self.examples_per_step
        self.nonfinite_in_a_row = 0 if updated else self.nonfinite_in_a_row + 1
        self.nonfinite_total += not updated
        return StepResult(lr, loss, grad_norm, updated, data_seconds, bool(stop_votes))

    def _accumulate_gradients(self, batches, lap: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward and backward over the step's micro-batches: (mean loss on this rank, gradient norm, seconds
        spent waiting for data). DDP synchronises gradients only after the last micro-batch."""
        training = self.config.training
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        data_seconds = 0.0
        for micro_batch in range(training.grad_accum_steps):
            started = time.perf_counter()
            mixture, targets = next(batches)
            mixture = mixture.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            data_seconds += time.perf_counter() - started
            lap("data")
            if self.teacher is not None:
                with self._autocast():
                    targets = self.teacher.targets(mixture, targets)
                lap("teacher")
            defer_sync = self.dist.world_size > 1 and micro_batch < training.grad_accum_steps - 1
            with self.network.no_sync() if defer_sync else contextlib.nullcontext():
                with self._autocast():
                    estimate = self.network(mixture)
                lap("forward")
                loss = self.loss(estimate, targets) / training.grad_accum_steps
                lap("loss")
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                lap("backward")
            loss_sum += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), training.grad_clip or math.inf)
        return loss_sum, grad_norm, data_seconds

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _update(self, loss: float, grad_norm: float) -> bool:
        """The optimizer and EMA step; False (nothing changed) when the loss or the gradients are not finite."""
        if not math.isfinite(loss):
            return False
        if self.scaler is not None:
            # fp16: gradients that overflow are the scaler's to skip (it then lowers its scale), not a failure
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            return False
        if self.ema is not None:
            self.ema.update(self.step)
        return True

    def _stop_if_too_many_nonfinite(self, loss: float, grad_norm: float) -> None:
        limit = self.config.training.max_nonfinite_steps
        if self.dist.is_main:
            log.warning("step %d skipped: loss %s, gradient norm %s", self.step, loss, grad_norm)
        if self.nonfinite_in_a_row >= limit:
            raise BSMamba2Error(
                f"stopped at step {self.step}: {limit} steps in a row had a non-finite loss or gradient "
                f"(training.max_nonfinite_steps); {self.run_dir / LAST} holds the last saved state — lower "
                f"training.lr or check the data")

    def data_stream(self):
        """The rest of this rank's data stream, from where the checkpoint left it."""
        training = self.config.training
        examples_per_micro_batch = training.batch_size * self.dist.world_size
        start = -(-self.samples_seen // examples_per_micro_batch)  # ceil: never repeat examples on resume
        sampler = StreamBatches(start, training.batch_size, self.dist.rank, self.dist.world_size)
        workers = training.num_workers
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=workers,
                            pin_memory=self.device.type == "cuda",
                            worker_init_fn=_ignore_interrupts if workers else None)
        return iter(loader)

    # ------------------------------------------------------------------------------------------- validation
    def _validate_and_keep_best(self, metrics: Optional[MetricsLog], progress: tqdm) -> None:
        started = time.perf_counter()
        scores = self.validate()
        defined = [value for value in scores.values() if value is not None]
        score = float(np.mean(defined)) if defined else -math.inf
        self.schedule.observe_validation(score)
        is_best = score > self.best_score
        if is_best:
            self.best_score = score
        if metrics is not None:
            metrics.write({"step": self.step, "usdr": scores, "usdr_mean": score if defined else None,
                           "best": is_best, "seconds": round(time.perf_counter() - started, 2)})
        if self.dist.is_main and not self.quiet:
            progress.write(f"step {self.step}: validation uSDR "
                           + ", ".join(f"{stem} {_short(value)} dB" for stem, value in scores.items()))
        if is_best:
            self._save_checkpoint(best=True)

    def validate(self) -> dict:
        """Mean uSDR per stem over the validation tracks ({stem: dB}, None where every reference is silent),
        with the EMA weights when there are any. Ranks share the tracks."""
        model = self.ema.model if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        inference = self.config.inference
        scores = []
        for position in range(self.dist.rank, len(self.valid_set), self.dist.world_size):
            item = self.valid_set[position]
            with self._autocast():
                estimate = np.concatenate(list(apply_model(
                    model, [item.mixture], chunk_seconds=inference.chunk_seconds, overlap=inference.overlap,
                    batch_size=inference.batch_size, device=self.device)), axis=-1)
            scores.append([usdr(reference, estimated) for reference, estimated in zip(item.targets, estimate)])
        model.train(was_training)
        per_track = np.array([track for rank_scores in self.dist.gather(scores) for track in rank_scores],
                             dtype=np.float64).reshape(-1, len(self.model.stems))
        return {stem: _nanmean(per_track[:, index]) for index, stem in enumerate(self.model.stems)}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, best: bool = False) -> None:
        rng = self.dist.gather(capture_rng())  # every rank's generators, for an exact resume
        if self.dist.is_main:
            payload = {
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "step": self.step,
                "samples_seen": self.samples_seen,
                "rng": rng,
                "best_usdr": self.best_score,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "nonfinite_total": self.nonfinite_total,
                "code_version": self.code_version,
            }
            if self.ema is not None:
                payload["ema"] = self.ema.state_dict()
            if self.scaler is not None:
                payload["scaler"] = self.scaler.state_dict()
            if best:
                atomic_save(payload, self.run_dir / BEST)
            else:
                save_checkpoint(payload, self.run_dir, self.config.training.keep_last)
        self.dist.barrier()

    def _restore(self, payload: dict) -> None:
        try:
            self.model.load_state_dict(payload["model"])
            if self.ema is not None:
                self.ema.load_state_dict(payload.get("ema", payload["model"]))
            self.optimizer.load_state_dict(payload["optimizer"])
            self.schedule.load_state_dict(payload["scheduler"])
            if self.scaler is not None and "scaler" in payload:
                self.scaler.load_state_dict(payload["scaler"])
        except (RuntimeError, KeyError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BSMamba2Error(f"{self.run_dir / LAST}: the saved training state does not fit this model "
                                f"({first_line})") from None
        self.step = payload["step"]
        self.samples_seen = payload["samples_seen"]
        self.best_score = payload.get("best_usdr", -math.inf)
        self.nonfinite_in_a_row = payload.get("nonfinite_in_a_row", 0)
        self.nonfinite_total = payload.get("nonfinite_total", 0)
        rng = payload["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        elif self.dist.is_main:
            log.warning("the checkpoint was written by %d processes, this run has %d: random generators are "
                        "reseeded, so the continuation is not bit-exact", len(rng), self.dist.world_size)

    def _announce(self) -> None:
        parameters = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        frozen = f" ({trained / 1e6:.2f} M trained)" if trained < parameters else ""
        action = f"resuming at step {self.step}" if self.step else "starting"
        log.info("%s %s: %.2f M parameters%s, %d training / %d validation tracks, %d process(es) on %s, "
                 "%d examples of %.1f s per step, precision %s",
                 action, self.run_dir, parameters / 1e6, frozen, len(self.train_set.tracks), len(self.valid_set),
                 self.dist.world_size, self.device, self.examples_per_step, self.config.data.segment_seconds,
                 str(self.autocast_dtype or torch.float32).replace("torch.", ""))


class LogWindow:
    """What happened since the last log line: mean loss of the updated steps, speed, time waiting for data."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.losses, self.steps, self.data_seconds = [], 0, 0.0
        self.started = time.perf_counter()

    def add(self, loss: Optional[float], data_seconds: float) -> None:
        self.steps += 1
        self.data_seconds += data_seconds
        if loss is not None:
            self.losses.append(loss)

    def record(self, step: int, lr: float, grad_norm: float, audio_seconds_per_step: float,
               nonfinite_total: int) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        steps_per_second = self.steps / elapsed
        record = {"step": step, "loss": float(np.mean(self.losses)) if self.losses else None, "lr": lr,
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                  "steps_per_s": round(steps_per_second, 4),
                  "audio_s_per_s": round(steps_per_second * audio_seconds_per_step, 3),
                  "data_s_per_step": round(self.data_seconds / self.steps, 4),
                  "nonfinite_steps": nonfinite_total}
        self._reset()
        return record


class StopSignals:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step; a second signal
    acts as it normally would (KeyboardInterrupt, termination)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class Teacher:
    """training.teacher: a trained model whose estimates are the targets of some stems (`teacher_stems`)."""

    def __init__(self, checkpoint: str, stems: list[str], config: Config, device: torch.device):
        self.model = load_model(checkpoint, device=device)
        for stem in stems:
            if stem not in self.model.stems:
                raise BSMamba2Error(f"training.teacher {checkpoint}: has no stem {stem!r} (it has "
                                    f"{', '.join(self.model.stems)})")
        ours = (config.audio.sample_rate, config.audio.channels)
        theirs = (self.model.sample_rate, self.model.audio_channels)
        if theirs != ours:
            raise BSMamba2Error(f"training.teacher {checkpoint}: {theirs[0]} Hz, {theirs[1]} channels; this run "
                                f"trains at {ours[0]} Hz, {ours[1]} channels")
        self.teacher_index = [self.model.stems.index(stem) for stem in stems]
        self.student_index = [config.model.stems.index(stem) for stem in stems]

    def targets(self, mixture: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`targets` (batch, stems, channels, samples) with the teacher's stems replaced by its estimates."""
        with torch.no_grad():
            estimate = self.model(mixture)
        targets = targets.clone()
        targets[:, self.student_index] = estimate[:, self.teacher_index].to(targets.dtype)
        return targets


def freeze(model: torch.nn.Module, prefixes: list[str]) -> None:
    """Stop training the parameters of the modules that `prefixes` name (training.freeze: e.g. "layers",
    "mask_estimators.0")."""
    check_module_prefixes(model, prefixes, "training.freeze")
    for name, parameter in model.named_parameters():
        if any(_inside(name, prefix) for prefix in prefixes):
            parameter.requires_grad_(False)


def parameter_groups(model: torch.nn.Module, lr_scales: dict[str, float]) -> list[dict]:
    """The trained parameters in one optimizer group per multiple of the rate (training.lr_scales: the longest
    prefix naming a parameter decides; 1 for the others). The schedule sets each group's rate from its `lr_scale`."""
    check_module_prefixes(model, list(lr_scales), "training.lr_scales")
    groups: dict[float, list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            prefixes = [prefix for prefix in lr_scales if _inside(name, prefix)]
            scale = lr_scales[max(prefixes, key=len)] if prefixes else 1.0
            groups.setdefault(scale, []).append(parameter)
    return [{"params": parameters, "lr_scale": scale} for scale, parameters in sorted(groups.items())]


def check_module_prefixes(model: torch.nn.Module, prefixes: list[str], key: str) -> None:
    """A one-line error for a prefix that names no parameter (a typo would otherwise silently do nothing)."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_inside(name, prefix) for name in names):
            raise BSMamba2Error(f"{key}: {prefix!r} names no parameter of the model (they start with "
                                f"{', '.join(sorted({name.split('.')[0] for name in names}))})")


def _inside(name: str, prefix: str) -> bool:
    """Whether parameter `name` belongs to the module `prefix` (whole dotted components: "layers.1" is not in
    "layers.10")."""
    return name == prefix or name.startswith(prefix + ".")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """None for fp32. `auto`: bf16 on CUDA where supported (else fp16); on a CPU, bf16 where it has bf16
    instructions (AVX512-BF16, AMX: oneDNN's bf16 matmuls, and half the memory traffic, make a training step much
    faster; docs/performance.md), else fp32 (emulated bf16 is slower than fp32); fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_bf16():
            precision = "bf16"
        else:
            return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (as oneDNN, torch's CPU matmul library, sees it)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process saves and stops, workers must keep serving.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _nanmean(values: np.ndarray) -> Optional[float]:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else None


def _short(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"
