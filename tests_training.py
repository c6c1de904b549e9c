"""The learning-rate schedule by its properties, and as the optimizer applies it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from config import TrainingConfig
from devices import Distributed
from train import learning_rate_factor, make_model_and_optimizer

EPOCHS, WARMUP = 20, 3


def test_warm_up_rises_to_the_base_rate_then_the_cosine_falls_to_two_percent():
    factors = [learning_rate_factor(e, EPOCHS, WARMUP, "cosine") for e in range(EPOCHS)]
    warm, after = factors[:WARMUP], factors[WARMUP:]
    assert np.all(np.diff(warm) > 0) and warm[0] > 0 and warm[-1] < 1
    assert after[0] == pytest.approx(1.0)  # the first epoch after the warm-up: the base rate
    # a straight ramp from 0 that reaches the base rate at the end of the warm-up
    steps = np.diff([0.0, *warm, after[0]])
    np.testing.assert_allclose(steps, steps[0])
    assert np.all(np.diff(after) < 0)  # falls every epoch
    # half-way through the cosine part the factor is half-way between 1 and the floor 0.02
    assert learning_rate_factor(WARMUP + (EPOCHS - WARMUP) / 2, EPOCHS, WARMUP, "cosine") == (
        pytest.approx((1 + 0.02) / 2)
    )
    assert 0.02 < after[-1] < 0.05  # the last epoch ends near the floor, above it
    assert learning_rate_factor(EPOCHS, EPOCHS, WARMUP, "cosine") == pytest.approx(0.02)
    # one epoch after the warm-up: the base rate, and the floor where the schedule would end
    assert learning_rate_factor(WARMUP, WARMUP + 1, WARMUP, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(WARMUP + 1, WARMUP + 1, WARMUP, "cosine") == pytest.approx(0.02)
    flat = [learning_rate_factor(e, EPOCHS, WARMUP, "none") for e in range(WARMUP, EPOCHS)]
    assert flat == [1.0] * (EPOCHS - WARMUP)


def test_the_optimizer_follows_the_schedule_epoch_by_epoch():
    settings = TrainingConfig(epochs=EPOCHS, warmup_epochs=WARMUP, learning_rate=0.01)
    args = {"in_channels": 1, "num_classes": 2, "base_channels": 2, "depth": 2, "norm": "instance"}
    _, optimizer, scheduler = make_model_and_optimizer(
        args, "instance", settings, torch.device("cpu"), False, Distributed()
    )
    rates = []
    for _ in range(EPOCHS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(0.01) and rates.index(max(rates)) == WARMUP
    assert rates[-1] < 0.05 * 0.01 and all(math.isfinite(r) for r in rates)
    assert np.all(np.diff(rates[WARMUP:]) < 0)
