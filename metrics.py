"""Metrics during training: a confusion matrix accumulated on the device (no per-voxel
transfer to the host), turned into accuracy, macro F1 and per-class Dice once per epoch
(EpochTotals sums a pass, across torchrun ranks too).
(Surface metrics in the scan's own geometry, in mm, are in test_unet.py.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from devices import Distributed


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted; any shape, same device."""
    flat = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.zeros(num_classes**2, dtype=torch.int64, device=flat.device)
    # scatter_add_ rather than bincount: bincount syncs with the host on CUDA to size its output
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, object]:
    """accuracy (all voxels), f1_macro (mean F1 over all classes present in truth or
    prediction) and dice per class (a class absent from both: NaN)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    denominator = support + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denominator > 0, 2 * true_positive / denominator, np.nan)
    total = confusion.sum()
    return {
        "accuracy": float(true_positive.sum() / total) if total else math.nan,
        "f1_macro": float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan,
        "dice": dice,
    }


@dataclass
class EpochTotals:
    """Sums over one pass (on the device until `scores`): no per-batch host synchronisation."""

    loss_sum: torch.Tensor
    volumes: torch.Tensor
    confusion: torch.Tensor
    first_bad_batch: torch.Tensor  # -1: every loss finite

    @classmethod
    def zeros(cls, classes: int, device: torch.device) -> EpochTotals:
        return cls(
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64, device=device),
            torch.zeros(classes, classes, dtype=torch.int64, device=device),
            torch.full((), -1, dtype=torch.int64, device=device),
        )

    def add(
        self, loss: torch.Tensor, volumes: int, pred: torch.Tensor, target: torch.Tensor, step: int
    ) -> None:
        """One batch: its mean loss over `volumes` volumes, and predicted/true class indices."""
        finite = torch.isfinite(loss.detach())
        self.first_bad_batch = torch.where(
            (self.first_bad_batch < 0) & ~finite, step, self.first_bad_batch
        )
        self.loss_sum += torch.where(finite, loss.detach(), 0.0) * volumes
        self.volumes += volumes
        self.confusion += confusion_matrix(pred, target, self.confusion.shape[0])

    def scores(self, dist_info: Distributed) -> dict[str, object]:
        packed = torch.cat(
            [self.loss_sum.reshape(1), self.volumes.reshape(1), self.confusion.reshape(-1)]
        ).double()
        packed = dist_info.sum(packed).cpu().numpy()
        bad = self.first_bad_batch.clone()
        if dist_info.active:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        classes = self.confusion.shape[0]
        scores = scores_from_confusion(packed[2:].reshape(classes, classes))
        volumes = packed[1]
        scores["loss"] = float(packed[0] / volumes) if volumes else math.nan
        scores["first_bad_batch"] = int(bad.item())
        return scores
