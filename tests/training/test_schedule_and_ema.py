import math

import pytest
import torch
from torch import nn

from bsmamba2.config import ModelConfig, TrainingConfig
from bsmamba2.training.ema import EMA
from bsmamba2.training.schedule import LearningRateSchedule


def schedule(**values) -> LearningRateSchedule:
    training = TrainingConfig(lr=1e-3, max_steps=110, **values)
    training.validate(ModelConfig())
    optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=training.lr)
    return LearningRateSchedule(optimizer, training)


def test_constant_rate_is_the_paper_default():
    lr = schedule()
    assert {lr.set_step(step) for step in (0, 50, 109)} == {1e-3}
    assert lr.optimizer.param_groups[0]["lr"] == 1e-3


def test_warmup_then_cosine_to_the_floor():
    lr = schedule(scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr.set_step(0) == pytest.approx(1e-4)  # the first update uses 1/10 of the rate
    assert lr.set_step(9) == pytest.approx(1e-3)
    assert lr.set_step(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way through the decay
    assert lr.set_step(110) == pytest.approx(1e-4)


def test_linear_tail_is_constant_then_decays_linearly_to_the_floor():
    lr = schedule(scheduler="linear_tail", decay_steps=40, min_lr_ratio=0.0)
    assert {lr.set_step(step) for step in (0, 35, 70)} == {1e-3}
    assert lr.set_step(90) == pytest.approx(0.5e-3)
    assert lr.set_step(109) == pytest.approx(1e-3 / 40)  # the last update still moves the weights
    with pytest.raises(ValueError, match="training.decay_steps"):
        schedule(scheduler="linear_tail", decay_steps=200)


def test_plateau_decays_after_patience_and_resumes_from_its_state():
    lr = schedule(scheduler="plateau", plateau_patience=2, plateau_factor=0.5)
    for score in (1.0, 2.0, 1.5, 1.9):  # a new best, then two validations without one
        lr.observe_validation(score)
    assert lr.set_step(5) == pytest.approx(5e-4)
    resumed = schedule(scheduler="plateau", plateau_patience=2, plateau_factor=0.5)
    resumed.load_state_dict(lr.state_dict())
    resumed.observe_validation(1.0)
    resumed.observe_validation(1.0)
    assert resumed.set_step(6) == pytest.approx(2.5e-4)
    assert schedule(scheduler="plateau").best_score == -math.inf


def test_ema_tracks_parameters_and_copies_buffers():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema.update(step=1000)
    torch.testing.assert_close(ema.model.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    torch.testing.assert_close(ema.model.running_mean, torch.full((3,), 5.0))
    assert not ema.model.training and not ema.model.weight.requires_grad
    assert set(ema.state_dict()) == set(model.state_dict())


def test_ema_decay_warms_up_so_early_averages_are_not_the_initial_weights():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.model.weight.fill_(0.0)
    ema.update(step=0)  # decay 1/10
    torch.testing.assert_close(ema.model.weight, torch.full((1, 1), 0.9))
    ema.update(step=10**6)  # decay 0.999 once warm
    torch.testing.assert_close(ema.model.weight, torch.full((1, 1), 0.9 + 0.001 * 0.1))
