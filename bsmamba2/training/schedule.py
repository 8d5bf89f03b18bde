"""Learning rate per step: optional linear warm-up, then constant (the paper), cosine decay, plateau decay, or
constant with a linear decay over the last `decay_steps` (`linear_tail`: a run can start before its length is
settled, and the steps before the tail are those of a constant-rate run).

The rate is a pure function of the step plus, for `plateau`, a scale that shrinks when validation stops
improving; `state_dict()` holds that scale, so a resumed run continues with the same rates.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer

from ..config import TrainingConfig


class LearningRateSchedule:
    def __init__(self, optimizer: Optimizer, training: TrainingConfig):
        self.optimizer = optimizer
        self.training = training
        self.plateau_scale = 1.0
        self.best_score = -math.inf
        self.validations_without_best = 0

    def factor(self, step: int) -> float:
        """The multiple of `lr` used for the optimizer step that makes step `step + 1`."""
        training = self.training
        warmup = min(1.0, (step + 1) / training.warmup_steps) if training.warmup_steps else 1.0
        floor = training.min_lr_ratio
        if training.scheduler == "cosine":
            span = max(1, training.max_steps - training.warmup_steps)
            progress = min(1.0, max(0, step - training.warmup_steps) / span)
            return warmup * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        if training.scheduler == "linear_tail":
            remaining = training.max_steps - step
            tail = min(1.0, remaining / training.decay_steps) if training.decay_steps else 1.0
            return warmup * (floor + (1 - floor) * tail)
        if training.scheduler == "plateau":
            return warmup * max(floor, self.plateau_scale)
        return warmup

    def set_step(self, step: int) -> float:
        lr = self.training.lr * self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # training.lr_scales (parameter_groups)
        return lr

    def observe_validation(self, score: float) -> None:
        """Plateau: after `plateau_patience` validations without a new best score, lr × `plateau_factor`."""
        if self.training.scheduler != "plateau":
            return
        if score > self.best_score:
            self.best_score, self.validations_without_best = score, 0
            return
        self.validations_without_best += 1
        if self.validations_without_best >= self.training.plateau_patience:
            self.plateau_scale *= self.training.plateau_factor
            self.validations_without_best = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best_score": self.best_score,
                "validations_without_best": self.validations_without_best}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_scale = state["plateau_scale"]
        self.best_score = state["best_score"]
        self.validations_without_best = state["validations_without_best"]
