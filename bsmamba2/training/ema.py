"""Exponential moving average of a model's weights (decay 0.999 in "Mamba2 Meets Silence"), used for validation
and saved."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of the model whose floating-point parameters track `decay·ema + (1 − decay)·current`.

    The decay warms up as min(decay, (1 + step) / (10 + step)) (TensorFlow's `num_updates`): with 0.999 from
    the start, the average would still be 78% random initial weights after 250 steps, 37% after 1000.

    Buffers are copied as they are. `model` is the copy itself, in eval mode: validate and save it directly;
    its `state_dict()` has the raw model's keys, so a checkpoint's "ema" entry loads into a fresh model.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = [(ema, current) for ema, current in zip(self.model.parameters(), model.parameters())
                 if current.dtype.is_floating_point]
        self._ema_parameters = [ema for ema, _ in pairs]
        self._parameters = [current for _, current in pairs]
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current weights after optimizer update `step` (0 for the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._ema_parameters, self._parameters, 1.0 - decay)
        for ema_buffer, buffer in self._buffers:
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
