"""SPIDER challenge instance metrics: Dice, detection rate and average symmetric surface
distance (ASD, mm) per structure, for masks in SPIDER numbering, in the scan's own geometry.

SPIDER numbering (van der Graaf et al., Scientific Data 2024): 0 background; 1-25 vertebrae
counted upward from L5 = 1; 100 spinal canal; 101-125 partially visible vertebrae; 201-225
intervertebral discs (201 = L5/S1).

Rules, as in DIAGNijmegen/SPIDER-Evaluation, evaluation.py (commit 052300bc, read for this
module; nothing is copied from it):
- Every reference label > 0 is matched, on its own, to the predicted label > 0 that covers most
  of its voxels (ties: the smallest predicted label). Background is never a match; a reference
  label that no predicted foreground touches has no match and Dice 0. Matching is not
  one-to-one: two reference vertebrae merged into one predicted label both match it.
- Dice per matched pair, over the whole volume: 2 |R & P| / (|R| + |P|).
- Vertebrae are the labels 1-99 and discs the labels above 200. A vertebra or disc with
  Dice < 0.1 counts as missed: it lowers the detection rate (detected / reference count) and
  stays out of the Dice mean. The Dice means are over detected instances only.
- The canal is label 100; its Dice has no threshold (0 when nothing overlaps it).
- Labels 101-125 (partially visible vertebrae) and 101-200 in general belong to no structure:
  the published script uses them only in its overall scores, which are not reported here.
- ASD per matched pair: borders are each mask minus its erosion by the full-connectivity
  3x3x3 structuring element, with everything outside the image counted as background; each
  border voxel's distance (voxel centre to nearest border-voxel centre of the other mask, mm)
  is pooled from both directions and averaged (so the larger border weighs more).

Deliberate differences from the published evaluation.py:
1. Spacing. The published script passes image.GetSpacing(), which is (x, y, z), as the sampling
   of a distance transform on the (z, y, x) array from GetArrayFromImage, so in anisotropic
   scans the slice spacing is applied to the wrong axis. Here every axis gets its own spacing:
   distances are computed by SimpleITK on images that carry the scan's spacing.
2. Which instances the ASD averages. The published script averages the ASD of every reference
   vertebra (disc) that any predicted label touches, including those with Dice < 0.1, and if
   one reference vertebra (disc) has no match at all its NaN makes that case's mean NaN (and
   the challenge's pandas mean then skips the whole case). By default (asd_over="detected")
   the ASD here is the mean over detected instances only, as the Dice is.
   asd_over="all" reproduces the published set (every reference instance, NaN when any has no
   match). The canal's ASD is computed whenever the canal has a match, as published.
3. Undefined values are NaN. The published script gives the canal Dice and ASD the sentinel
   999 when the reference has no canal, divides by zero for the detection rate when the
   reference has no vertebrae (discs), and warns on the mean of an empty list.
4. Geometry. The published script only prints a message when the shapes differ (and that
   print itself fails). Here a difference in size, spacing, origin or direction raises
   ValueError, as does a non-integer or negative mask.
5. Numerics. Borders by a separable numpy box erosion (identical to scipy's binary_erosion
   with the full structure), distances by SimpleITK's signed Maurer distance map (float32)
   instead of scipy's exact EDT (float64): the two agree to about 1e-6 mm. Distances are
   computed in the bounding box of the pair plus a one-voxel margin (clipped to the image):
   the margin keeps the erosion exact, and all border voxels lie inside the box, so the
   distances are exact too.
The overall scores (OveralDiceScore, OveralASD: means over all reference labels including the
canal and 101-200) are not reported.

Axis order: SimpleITK images are (x, y, z) with spacing in mm; numpy arrays from them are
(z, y, x). All distances are in mm.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
import SimpleITK as sitk

VERTEBRAE = "vertebrae"
DISCS = "discs"
CANAL = "canal"
STRUCTURES = (VERTEBRAE, DISCS, CANAL)
CANAL_LABEL = 100
PARTIAL_OFFSET = 100
DETECTION_THRESHOLD = 0.1  # Dice below this: the vertebra or disc counts as missed

_INTEGER_PIXEL_TYPES = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}
_SPACING_RTOL = 1e-6
_ORIGIN_ATOL_MM = 1e-4
_DIRECTION_ATOL = 1e-6


def structure_of(label: int) -> str | None:
    """The structure a SPIDER label counts towards under the challenge's rules:
    1-99 "vertebrae", 100 "canal", above 200 "discs"; None for 0 and 101-200 (partially
    visible vertebrae are in no structure's score)."""
    if 0 < label < CANAL_LABEL:
        return VERTEBRAE
    if label == CANAL_LABEL:
        return CANAL
    if label > 200:
        return DISCS
    return None


def check_same_geometry(reference: sitk.Image, prediction: sitk.Image) -> None:
    """Raise ValueError naming the first difference in dimension, size, spacing (relative
    1e-6), origin (1e-4 mm) or direction (1e-6) between the two images."""
    if reference.GetDimension() != prediction.GetDimension():
        raise ValueError(
            f"dimension differs: reference {reference.GetDimension()}-D, "
            f"prediction {prediction.GetDimension()}-D"
        )
    if reference.GetSize() != prediction.GetSize():
        raise ValueError(
            f"size (x, y, z) differs: reference {reference.GetSize()}, "
            f"prediction {prediction.GetSize()}"
        )
    checks = (  # name, reference, prediction, relative tolerance, absolute tolerance
        (
            "spacing (x, y, z) in mm",
            reference.GetSpacing(),
            prediction.GetSpacing(),
            _SPACING_RTOL,
            0,
        ),
        (
            "origin (x, y, z) in mm",
            reference.GetOrigin(),
            prediction.GetOrigin(),
            0,
            _ORIGIN_ATOL_MM,
        ),
        ("direction", reference.GetDirection(), prediction.GetDirection(), 0, _DIRECTION_ATOL),
    )
    for name, ref_value, pred_value, rtol, atol in checks:
        if not np.allclose(ref_value, pred_value, rtol=rtol, atol=atol):
            raise ValueError(f"{name} differs: reference {ref_value}, prediction {pred_value}")


def _label_array(image: sitk.Image, role: str) -> np.ndarray:
    """The image's (z, y, x) array view after checking it is a scalar, non-negative integer mask."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{role} mask has {image.GetNumberOfComponentsPerPixel()} components")
    if image.GetPixelID() not in _INTEGER_PIXEL_TYPES:
        raise ValueError(
            f"{role} mask has pixel type {image.GetPixelIDTypeAsString()}; integer labels needed"
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise ValueError(f"{role} mask has negative label {int(array.min())}")
    return array


def _label_boxes(image: sitk.Image) -> dict[int, tuple[int, tuple[slice, ...]]]:
    """label > 0 -> (voxel count, (z, y, x) slices of its bounding box); one pass."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.ComputePerimeterOff()
    stats.ComputeFeretDiameterOff()
    stats.ComputeOrientedBoundingBoxOff()
    stats.Execute(image)
    dimension = image.GetDimension()
    boxes = {}
    for label in stats.GetLabels():
        box = stats.GetBoundingBox(label)  # (x, y, z) start, then (x, y, z) size
        start, size = box[:dimension], box[dimension:]
        slices = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))[::-1]
        boxes[int(label)] = (int(stats.GetNumberOfPixels(label)), slices)
    return boxes


def _match(
    ref: np.ndarray, pred: np.ndarray, ref_labels: np.ndarray, pred_labels: np.ndarray
) -> dict[int, tuple[int, int]]:
    """reference label -> (matched predicted label, overlap voxels), for every reference label
    that predicted foreground touches; the predicted label covering most of it wins, ties
    going to the smallest label. One pass over the foreground voxels."""
    both = (ref > 0) & (pred > 0)
    ref_index = np.searchsorted(ref_labels, ref[both])
    pred_index = np.searchsorted(pred_labels, pred[both])
    counts = np.bincount(
        ref_index.astype(np.int64) * len(pred_labels) + pred_index,
        minlength=len(ref_labels) * len(pred_labels),
    ).reshape(len(ref_labels), len(pred_labels))
    matches = {}
    for row, ref_label in enumerate(ref_labels):
        if counts[row].any():
            column = int(counts[row].argmax())  # first maximum: smallest label
            matches[int(ref_label)] = (int(pred_labels[column]), int(counts[row, column]))
    return matches


def _border(mask: np.ndarray) -> np.ndarray:
    """Border voxels: the mask minus its erosion by the full 3x3x3 (3x3 in 2-D) neighbourhood,
    with everything outside the array counted as background. The box erosion is separable:
    one 3-wide minimum per axis."""
    eroded = np.pad(mask, 1, constant_values=False)
    for axis in range(mask.ndim):
        length = eroded.shape[axis]
        eroded = (
            eroded.take(range(0, length - 2), axis=axis)
            & eroded.take(range(1, length - 1), axis=axis)
            & eroded.take(range(2, length), axis=axis)
        )
    return mask & ~eroded


def _distance_to(border: np.ndarray, spacing_xyz: tuple[float, ...]) -> np.ndarray:
    """(z, y, x) array of each voxel centre's distance in mm to the nearest border voxel centre."""
    image = sitk.GetImageFromArray(border.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return np.where(border, 0.0, sitk.GetArrayViewFromImage(distance).astype(np.float64))


def _symmetric_asd(
    ref_mask: np.ndarray, pred_mask: np.ndarray, spacing_xyz: tuple[float, ...]
) -> float:
    """ASD in mm: mean over the border voxels of both masks of the distance to the other
    mask's border (distances of both directions pooled, not two means averaged)."""
    ref_border = _border(ref_mask)
    pred_border = _border(pred_mask)
    pooled = np.concatenate(
        (
            _distance_to(ref_border, spacing_xyz)[pred_border],
            _distance_to(pred_border, spacing_xyz)[ref_border],
        )
    )
    return float(pooled.mean())


def _union_box(
    first: tuple[slice, ...], second: tuple[slice, ...], shape: tuple[int, ...], margin: int = 1
) -> tuple[slice, ...]:
    return tuple(
        slice(max(min(a.start, b.start) - margin, 0), min(max(a.stop, b.stop) + margin, n))
        for a, b, n in zip(first, second, shape, strict=True)
    )


def spider_instances(reference: sitk.Image, prediction: sitk.Image) -> pd.DataFrame:
    """One row per reference label > 0 under the challenge's matching.

    reference, prediction: integer instance masks (any integer pixel type, labels >= 0) with
    the same size, spacing, origin and direction (ValueError otherwise). The reference is in
    SPIDER numbering; the prediction's label values need not be (matching is by overlap).

    Columns: label (reference), structure ("vertebrae" / "discs" / "canal"; missing, which
    pandas shows as None or NaN, for labels in no structure),
    matched_label (predicted label covering most of it, 0 when none), dice (0 when unmatched),
    detected (dice >= 0.1; the challenge applies it to vertebrae and discs only), asd_mm
    (symmetric ASD in mm with per-axis spacing; NaN when unmatched), same_level (the matched
    label names the reference's level: equal labels, with a partially visible vertebra
    100 + k counting as vertebra k; not one of the challenge's rules).
    """
    check_same_geometry(reference, prediction)
    ref = _label_array(reference, "reference")
    pred = _label_array(prediction, "prediction")
    ref_boxes = _label_boxes(reference)
    pred_boxes = _label_boxes(prediction)
    ref_labels = np.array(sorted(ref_boxes), dtype=np.int64)
    pred_labels = np.array(sorted(pred_boxes), dtype=np.int64)
    matches = _match(ref, pred, ref_labels, pred_labels) if len(pred_labels) else {}
    spacing_xyz = tuple(reference.GetSpacing())

    rows = []
    for ref_label in ref_labels.tolist():
        ref_count, ref_box = ref_boxes[ref_label]
        matched_label, dice, asd_mm = 0, 0.0, math.nan
        if ref_label in matches:
            matched_label, overlap = matches[ref_label]
            pred_count, pred_box = pred_boxes[matched_label]
            dice = 2.0 * overlap / (ref_count + pred_count)
            box = _union_box(ref_box, pred_box, ref.shape)
            asd_mm = _symmetric_asd(ref[box] == ref_label, pred[box] == matched_label, spacing_xyz)
        rows.append(
            {
                "label": ref_label,
                "structure": structure_of(ref_label),
                "matched_label": matched_label,
                "dice": dice,
                "detected": dice >= DETECTION_THRESHOLD,
                "asd_mm": asd_mm,
                "same_level": _level_key(matched_label) == _level_key(ref_label),
            }
        )
    columns = ["label", "structure", "matched_label", "dice", "detected", "asd_mm", "same_level"]
    return pd.DataFrame(rows, columns=columns)


def disc_components_reference(
    mask: sitk.Image, disc_values: tuple[int, ...], min_mm3: float
) -> sitk.Image:
    """An instance reference for the discs of a semantic mask (one value for every disc, as
    in the real slabs): the connected components (full connectivity) of disc_values, those
    smaller than min_mm3 left out (label noise), numbered 201, 202, ... upward from the
    most inferior centroid (the physical S-I axis), so that the lowest is L5/S1 wherever the
    field of view holds the sacrum. Same geometry as mask, uint16."""
    in_discs = np.isin(sitk.GetArrayFromImage(mask), disc_values).astype(np.uint8)
    discs = sitk.GetImageFromArray(in_discs)
    discs.CopyInformation(mask)
    components = sitk.RelabelComponent(
        sitk.ConnectedComponent(discs, True),
        minimumObjectSize=int(np.ceil(min_mm3 / np.prod(mask.GetSpacing()))),
    )
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(components)
    height = {label: shapes.GetCentroid(label)[2] for label in shapes.GetLabels()}  # LPS z
    lookup = np.zeros(len(height) + 1, np.uint16)
    for rank, label in enumerate(sorted(height, key=height.get)):  # most inferior first
        lookup[label] = 201 + rank
    result = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(components)])
    result.CopyInformation(mask)
    return result


def _level_key(label: int) -> int:
    """A SPIDER label's level: a partially visible vertebra 100 + k is vertebra k's."""
    return label - PARTIAL_OFFSET if PARTIAL_OFFSET < label <= PARTIAL_OFFSET + 25 else label


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def spider_scores(
    reference: sitk.Image,
    prediction: sitk.Image,
    asd_over: Literal["detected", "all"] = "detected",
) -> dict[str, float]:
    """The challenge's per-case scores (see the module docstring for the rules).

    reference, prediction: integer instance masks in SPIDER numbering with the same size,
    spacing, origin and direction (ValueError naming the difference otherwise).
    asd_over: "detected" (default) averages vertebra / disc ASD over detected instances;
    "all" over every reference instance as published (NaN if any has no match).

    Returns: vertebrae_dice, discs_dice (mean over detected instances; NaN when none),
    canal_dice (0 when nothing overlaps the canal; NaN when the reference has none),
    vertebrae_detection, discs_detection (detected / reference count; NaN when the reference
    has none), vertebrae_asd_mm, discs_asd_mm, canal_asd_mm (mm; NaN where undefined),
    vertebrae_level_agreement, discs_level_agreement (the share of detected instances whose
    matched label names the same level; NaN when none is detected; this project's measure of
    the level names, not one of the challenge's), and the counts vertebrae_n, discs_n,
    vertebrae_detected, discs_detected, vertebrae_named, discs_named (detected and named right).
    """
    if asd_over not in ("detected", "all"):
        raise ValueError(f"asd_over must be 'detected' or 'all', got {asd_over!r}")
    instances = spider_instances(reference, prediction)
    scores: dict[str, float] = {}
    for structure in (VERTEBRAE, DISCS):
        rows = instances[instances["structure"] == structure]
        detected = rows[rows["detected"]]
        asd_rows = detected if asd_over == "detected" else rows
        scores[f"{structure}_dice"] = _mean(detected["dice"])
        scores[f"{structure}_detection"] = len(detected) / len(rows) if len(rows) else math.nan
        scores[f"{structure}_asd_mm"] = (
            math.nan if asd_rows["asd_mm"].isna().any() else _mean(asd_rows["asd_mm"])
        )
        named = int(detected["same_level"].sum())
        scores[f"{structure}_level_agreement"] = (
            named / len(detected) if len(detected) else math.nan
        )
        scores[f"{structure}_n"] = len(rows)
        scores[f"{structure}_detected"] = len(detected)
        scores[f"{structure}_named"] = named
    canal = instances[instances["structure"] == CANAL]
    scores["canal_dice"] = float(canal["dice"].iloc[0]) if len(canal) else math.nan
    scores["canal_asd_mm"] = float(canal["asd_mm"].iloc[0]) if len(canal) else math.nan
    order = [
        "vertebrae_dice",
        "discs_dice",
        "canal_dice",
        "vertebrae_detection",
        "discs_detection",
        "vertebrae_asd_mm",
        "discs_asd_mm",
        "canal_asd_mm",
        "vertebrae_level_agreement",
        "discs_level_agreement",
        "vertebrae_n",
        "discs_n",
        "vertebrae_detected",
        "discs_detected",
        "vertebrae_named",
        "discs_named",
    ]
    return {key: scores[key] for key in order}


def summarise_spider(per_case: pd.DataFrame) -> pd.DataFrame:
    """Across cases: one row per structure (vertebrae, discs, canal).

    per_case: one row per case with the columns of spider_scores (extra columns ignored;
    the level agreement columns may be absent, which gives NaN).
    Returns columns structure, n_cases (rows in per_case), then for dice, detection, asd_mm
    and level_agreement: <metric>_mean, <metric>_std (sample std, ddof=1, as the challenge's
    pandas std) and <metric>_n (the cases behind the mean: NaN cases are skipped). The canal
    has no detection rate or level agreement (NaN, n 0).
    """
    metrics = ("dice", "detection", "asd_mm", "level_agreement")
    needed = [
        f"{structure}_{metric}"
        for structure in STRUCTURES
        for metric in ("dice", "detection", "asd_mm")
        if (structure, metric) != (CANAL, "detection")
    ]
    missing = [column for column in needed if column not in per_case.columns]
    if missing:
        raise ValueError(f"per_case lacks columns {missing}")
    rows = []
    for structure in STRUCTURES:
        row: dict[str, object] = {"structure": structure, "n_cases": len(per_case)}
        for metric in metrics:
            column = f"{structure}_{metric}"
            if column in per_case.columns:
                values = pd.to_numeric(per_case[column], errors="raise").astype(float).dropna()
            else:  # the canal's detection rate and level agreement
                values = pd.Series(dtype=float)
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std()) if len(values) > 1 else math.nan
            row[f"{metric}_n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows)
