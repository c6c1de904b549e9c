"""Segmentation metrics.

On the grid, during training: a confusion matrix accumulated on the device (no per-voxel
transfer), turned into accuracy, macro F1 and per-class Dice once per epoch.
On the scan, at test time: Dice, 95th-percentile Hausdorff distance and average symmetric
surface distance in mm, from SimpleITK distance maps in the scan's own geometry.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted; any shape, same device."""
    flat = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


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


def _surface_distances(surface: sitk.Image, other: sitk.Image) -> np.ndarray:
    """Distances in mm from each surface voxel of one mask to the surface of `other`."""
    distance = sitk.Abs(
        sitk.SignedMaurerDistanceMap(other, squaredDistance=False, useImageSpacing=True)
    )
    points = sitk.GetArrayViewFromImage(surface) > 0
    return sitk.GetArrayViewFromImage(distance)[points]


def overlap_and_distances(pred: sitk.Image, ref: sitk.Image) -> dict[str, float]:
    """Dice, HD95 (mm) and ASSD (mm) of two binary uint8 masks with the same geometry.

    Surfaces are the masks' boundary voxels (sitk.LabelContour); a surface voxel's distance is
    the absolute signed Maurer distance to the other mask's boundary, in mm. HD95 is the larger
    of the two directed 95th percentiles; ASSD averages both directions together.
    Both empty: dice 1, distances 0. Exactly one empty: dice 0, distances NaN (undefined).
    """
    pred_array = sitk.GetArrayViewFromImage(pred) > 0
    ref_array = sitk.GetArrayViewFromImage(ref) > 0
    n_pred, n_ref = int(pred_array.sum()), int(ref_array.sum())
    if n_pred == 0 and n_ref == 0:
        return {"dice": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    dice = 2.0 * float(np.logical_and(pred_array, ref_array).sum()) / (n_pred + n_ref)
    if n_pred == 0 or n_ref == 0:
        return {"dice": dice, "hd95_mm": math.nan, "assd_mm": math.nan}
    pred_surface = sitk.LabelContour(pred, fullyConnected=False)
    ref_surface = sitk.LabelContour(ref, fullyConnected=False)
    pred_to_ref = _surface_distances(pred_surface, ref)
    ref_to_pred = _surface_distances(ref_surface, pred)
    hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
    assd = float(np.concatenate([pred_to_ref, ref_to_pred]).mean())
    return {"dice": dice, "hd95_mm": float(hd95), "assd_mm": assd}


def case_metrics(
    pred: sitk.Image, ref: sitk.Image, class_names: tuple[str, ...]
) -> list[dict[str, object]]:
    """One row per foreground class: class, dice, hd95_mm, assd_mm (class-index masks)."""
    rows = []
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        scores = overlap_and_distances(
            sitk.Cast(pred == index, sitk.sitkUInt8), sitk.Cast(ref == index, sitk.sitkUInt8)
        )
        rows.append({"class": name, **scores})
    return rows
