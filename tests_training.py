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


# ---------------------------------------------------------------- the loss


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """1 - the mean over volumes and foreground classes of (2 |P.T| + 1) / (|P| + |T| + 1)."""
    p = torch.softmax(logits.double(), 1)
    t = torch.nn.functional.one_hot(target, classes).movedim(-1, 1).double()
    dice = (2 * (p * t).sum((2, 3, 4)) + 1) / (p.sum((2, 3, 4)) + t.sum((2, 3, 4)) + 1)
    return float(1 - dice[:, 1:].mean())


def test_the_default_loss_is_cross_entropy_plus_soft_dice():
    from steps import SegmentationLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, 6, generator=generator)
    target = torch.randint(0, 3, (2, 4, 6, 6), generator=generator)
    ce = float(torch.nn.functional.cross_entropy(logits.double(), target))
    expected = ce + _soft_dice_loss(logits, target, 3)
    assert SegmentationLoss(3)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_deep_supervision_weighs_each_level_against_its_own_target():
    """Level l weighs 0.5^l, normalised to a sum of 1 (nnU-Net's); with centres, each
    coarse level is scored against the target taken at those centres; a count of centres that
    does not match the coarse outputs is refused by name."""
    from steps import SegmentationLoss, resize_labels

    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (1, 8, 8, 8), generator=generator)
    flat = torch.zeros(1, 3, 8, 8, 8)
    coarse_flat = torch.zeros(1, 3, 4, 4, 4)
    single = SegmentationLoss(3)(flat, target).item()
    coarse_single = SegmentationLoss(3)(coarse_flat, resize_labels(target, (4, 4, 4))).item()
    assert SegmentationLoss(3)([flat, coarse_flat], target).item() == pytest.approx(
        (single + 0.5 * coarse_single) / 1.5, rel=1e-5
    )
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator)
    centre = (0.0, 0.0, 0.0)  # the first voxel of each 2-voxel box, not nearest-exact's
    loss = SegmentationLoss(3, centres=[centre])([flat, coarse], target).item()
    at_centres = SegmentationLoss(3)(coarse, resize_labels(target, (4, 4, 4), centre)).item()
    assert loss == pytest.approx((single + 0.5 * at_centres) / 1.5, rel=1e-5)
    nearest = SegmentationLoss(3)([flat, coarse], target).item()
    assert nearest != pytest.approx(loss, rel=1e-3)  # the centres changed the target
    with pytest.raises(ValueError, match="2 coarse outputs, 1 centres"):
        SegmentationLoss(3, centres=[centre])([flat, coarse, coarse[:, :, :2, :2, :2]], target)
