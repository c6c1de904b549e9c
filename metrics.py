"""Grid metrics during training: a confusion matrix accumulated on the device (no per-voxel
transfer to the host), turned into accuracy, macro F1 and per-class Dice once per epoch.
(Surface metrics in the scan's own geometry, in mm, are in test_unet.py.)
"""

from __future__ import annotations

import math

import numpy as np
import torch


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
