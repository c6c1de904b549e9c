"""Testing as deployed: segment each raw scan, measure in its own geometry, export masks, figures.

Outputs in the run folder (output_dir):
    predictions/<case>.mha   uint8 class indices, exactly the scan's size/spacing/origin/direction
    test_metrics.csv         case_id, class, dice, hd95_mm, assd_mm (in the scan's geometry, mm),
                             reference/predicted voxel counts, reference_outside_crop
    test_summary.csv         class, n, Dice, HD95, ASSD means and the cases they leave out
    figures/<case>.png       central sagittal slice: image | reference | prediction (worst cases)
(pytest collects files named test_*.py: this module defines no test_* function on purpose.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from plan import plan_lookup, plan_settings
from store_plot_metrics import plot_overlay, write_csv
from train import build_model, fast_settings
from unet_model import UNet3D
from vertebraeseg import (
    CANONICAL,
    CaseError,
    atomic_write_image,
    check_same_geometry,
    grid_to_scan,
    labels_to_scan,
    map_labels,
    read_scan,
    to_grid,
)


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
    """One row per foreground class: class, dice, hd95_mm, assd_mm, reference_voxels,
    predicted_voxels (class-index masks of the same geometry)."""
    rows = []
    pred_counts = np.bincount(sitk.GetArrayViewFromImage(pred).ravel(), minlength=len(class_names))
    ref_counts = np.bincount(sitk.GetArrayViewFromImage(ref).ravel(), minlength=len(class_names))
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        scores = overlap_and_distances(
            sitk.Cast(pred == index, sitk.sitkUInt8), sitk.Cast(ref == index, sitk.sitkUInt8)
        )
        rows.append(
            {
                "class": name,
                **scores,
                "reference_voxels": int(ref_counts[index]),
                "predicted_voxels": int(pred_counts[index]),
            }
        )
    return rows


def precision_from_checkpoint(state: dict) -> str:
    """Inference precision: fp32 for a model trained with precision = fp32, else auto (bf16
    where this device computes it natively; a bf16-trained model also runs where it does not)."""
    return "fp32" if state["config"]["training"]["precision"] == "fp32" else "auto"


def model_from_checkpoint(state: dict, device: torch.device) -> UNet3D:
    """Rebuild the network from a checkpoint alone (its model_args and weights), in eval mode."""
    model = build_model(state["model_args"], device, fast_settings(device)[1])
    model.load_state_dict(state["model"])
    return model.eval()


def plan_from_checkpoint(state: dict) -> dict[str, object]:
    """The preprocessing plan the checkpoint's training data were made with."""
    if "plan" not in state:
        raise ValueError(
            "the checkpoint predates recorded preprocessing plans (no 'plan' in it): "
            "retrain it with this version of the project"
        )
    return state["plan"]


@dataclass(frozen=True)
class Predictor:
    """Everything that turns a raw scan into a mask, taken from one checkpoint: the network,
    the plan its data were made with, the device, and how probabilities go back to the scan."""

    model: UNet3D
    plan: dict
    device: torch.device
    precision: str = "auto"
    map_probabilities: bool = True

    @classmethod
    def from_checkpoint(
        cls, state: dict, device: torch.device, map_probabilities: bool = True
    ) -> Predictor:
        return cls(
            model_from_checkpoint(state, device),
            plan_from_checkpoint(state),
            device,
            precision_from_checkpoint(state),
            map_probabilities,
        )


@dataclass(frozen=True)
class Segmentation:
    """A scan's predicted class mask and the label-free crop it was predicted from."""

    classes: sitk.Image  # uint8 class indices, exactly the scan's geometry
    crop_index: tuple[int, int, int]  # in the PIR-reoriented scan, (x, y, z)
    crop_size: tuple[int, int, int]


@torch.no_grad()
def predict_probabilities(
    model: UNet3D, grid_image: sitk.Image, device: torch.device, precision: str = "auto"
) -> np.ndarray:
    """Softmax probabilities (classes, slices, height, width) float32 for one grid image.

    precision auto|bf16|fp32 as in [training]; with channels_last_3d (train.fast_settings).
    """
    array = sitk.GetArrayFromImage(grid_image).astype(np.float32)
    batch = torch.from_numpy(array)[None, None].to(device)
    amp_dtype, channels_last = fast_settings(device, precision)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    batch = batch.contiguous(memory_format=layout)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(batch)
    return logits[0].float().softmax(dim=0).cpu().numpy()


def back_to_scan(
    probabilities: np.ndarray, grid_image: sitk.Image, scan: sitk.Image, map_probabilities: bool
) -> sitk.Image:
    """Grid prediction -> uint8 class indices on the scan (probabilities or labels resampled)."""
    if map_probabilities:
        return grid_to_scan(probabilities, grid_image, scan)
    grid_labels = sitk.GetImageFromArray(probabilities.argmax(0).astype(np.uint8))
    grid_labels.CopyInformation(grid_image)
    return labels_to_scan(grid_labels, scan)


def segment_scan(predictor: Predictor, scan: sitk.Image) -> Segmentation:
    """A raw scan (any orientation; no mask is used) -> its class mask, in the scan's geometry.

    The one prediction path: predict_script.py and the test loop both call it, so a reported
    test number is what a user gets. Preprocessing follows the predictor's plan.
    """
    settings = plan_settings(predictor.plan)
    grid = to_grid(sitk.DICOMOrient(scan, CANONICAL), None, settings)
    probabilities = predict_probabilities(
        predictor.model, grid.image, predictor.device, predictor.precision
    )
    classes = back_to_scan(probabilities, grid.image, scan, predictor.map_probabilities)
    return Segmentation(classes, grid.crop_index, grid.crop_size)


def outside_crop_fraction(
    reference: sitk.Image, crop_index: tuple[int, ...], crop_size: tuple[int, ...], label: int
) -> float:
    """Share of the reference's `label` voxels that lie outside the crop box (0.0: none lost,
    and 0.0 when the reference has no such voxel). reference: class indices in the scan's
    geometry; the box is in the PIR-reoriented scan's (x, y, z) index space."""
    array = sitk.GetArrayFromImage(sitk.DICOMOrient(reference, CANONICAL)) == label
    total = int(np.count_nonzero(array))
    if total == 0:
        return 0.0
    (x, y, z), (sx, sy, sz) = crop_index, crop_size
    inside = int(np.count_nonzero(array[z : z + sz, y : y + sy, x : x + sx]))
    return 1.0 - inside / total


def summarise(metrics: pd.DataFrame, class_names: tuple[str, ...]) -> pd.DataFrame:
    """Per class: n cases, Dice mean/std, HD95 and ASSD means, and what those means leave out.

    n_hd95 / n_assd: the cases behind the distance means (a distance is undefined, NaN, when
    the reference or the prediction lacks the class); n_missed: the reference has the class
    and the prediction none; n_false: the prediction has it and the reference none.
    """
    grouped = metrics.groupby("class", sort=False)
    has_ref = metrics["reference_voxels"] > 0
    has_pred = metrics["predicted_voxels"] > 0
    summary = pd.DataFrame(
        {
            "n": grouped["dice"].size(),
            "dice_mean": grouped["dice"].mean(),
            "dice_std": grouped["dice"].std(ddof=0),
            "hd95_mm_mean": grouped["hd95_mm"].mean(),
            "n_hd95": grouped["hd95_mm"].count(),
            "assd_mm_mean": grouped["assd_mm"].mean(),
            "n_assd": grouped["assd_mm"].count(),
            "n_missed": (has_ref & ~has_pred).groupby(metrics["class"], sort=False).sum(),
            "n_false": (~has_ref & has_pred).groupby(metrics["class"], sort=False).sum(),
        }
    )
    order = [name for name in class_names[1:] if name in summary.index]
    return summary.loc[order].rename_axis("class").reset_index()


METRIC_COLUMNS = [
    "case_id",
    "class",
    "dice",
    "hd95_mm",
    "assd_mm",
    "reference_voxels",
    "predicted_voxels",
    "reference_outside_crop",
]


def read_reference(
    image_path: Path, mask_path: Path, lookup: dict[int, int]
) -> tuple[sitk.Image, sitk.Image]:
    """(scan, class-index reference in the scan's geometry); CaseError names file and problem."""
    scan = read_scan(image_path, "image")
    raw_mask = read_scan(mask_path, "mask")
    check_same_geometry(scan, raw_mask)
    reference = sitk.GetImageFromArray(map_labels(sitk.GetArrayFromImage(raw_mask), lookup))
    reference.CopyInformation(scan)
    return scan, reference


def evaluate_checkpoint(
    state: dict,
    cases: pd.DataFrame,
    run_dir: Path,
    device: torch.device,
    map_probabilities: bool = True,
    figures: int = 4,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test a checkpoint as deployed: every case is segmented from its RAW scan by
    segment_scan (the path predict_script.py takes), following the checkpoint's plan; the
    reference (mapped with the plan's label map) is read only for the metrics.

    cases: rows with case_id, image_path, mask_path (raw files). Writes predictions/<case>.mha,
    test_metrics.csv (one row per case and class, METRIC_COLUMNS), test_summary.csv and
    figures of the `figures` cases with the lowest mean Dice. A case that cannot be read is
    reported and skipped. Returns (metrics, summary).
    """
    predictor = Predictor.from_checkpoint(state, device, map_probabilities)
    lookup = plan_lookup(predictor.plan)
    class_names = tuple(state["class_names"])
    rows, shown = [], []
    for case in tqdm(cases.itertuples(), total=len(cases), desc="test", disable=not progress):
        try:
            scan, reference = read_reference(Path(case.image_path), Path(case.mask_path), lookup)
        except CaseError as err:
            tqdm.write(f"test case {case.case_id} skipped: {err}")
            continue
        segmentation = segment_scan(predictor, scan)
        prediction = segmentation.classes
        atomic_write_image(prediction, run_dir / "predictions" / f"{case.case_id}.mha")
        case_rows = []
        for index, row in enumerate(case_metrics(prediction, reference, class_names), start=1):
            lost = outside_crop_fraction(
                reference, segmentation.crop_index, segmentation.crop_size, index
            )
            case_rows.append({"case_id": case.case_id, **row, "reference_outside_crop": lost})
        rows += case_rows
        mean_dice = float(np.mean([row["dice"] for row in case_rows]))
        shown.append((mean_dice, case.case_id, scan, reference, prediction))
        shown = sorted(shown, key=lambda item: item[0])[:figures]  # keep only the worst
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    summary = summarise(metrics, class_names)
    write_csv(metrics, run_dir / "test_metrics.csv")
    write_csv(summary, run_dir / "test_summary.csv")
    for mean_dice, case_id, scan, reference, prediction in shown:
        arrays = [
            sitk.GetArrayFromImage(sitk.DICOMOrient(image, CANONICAL))
            for image in (scan, reference, prediction)
        ]
        plot_overlay(
            *arrays,
            title=f"{case_id}: mean Dice {mean_dice:.3f}",
            path=run_dir / "figures" / f"{case_id}.png",
        )
    return metrics, summary
