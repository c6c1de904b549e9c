"""Testing: predict on the grid, map back onto each scan, measure there, export masks and figures.

Outputs in the run folder (output_dir):
    predictions/<case>.mha   uint8 class indices, exactly the scan's size/spacing/origin/direction
    test_metrics.csv         case_id, class, dice, hd95_mm, assd_mm (in the scan's geometry, mm)
    test_summary.csv         class, n, dice_mean, dice_std, hd95_mm_mean, assd_mm_mean
    figures/<case>.png       central sagittal slice: image | reference | prediction (worst cases)
(pytest collects files named test_*.py: this module defines no test_* function on purpose.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from config import PreprocessingConfig
from store_plot_metrics import plot_overlay, write_csv
from train import build_model, fast_settings
from unet_model import UNet3D
from vertebraeseg import (
    CANONICAL,
    atomic_write_image,
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


def precision_from_checkpoint(state: dict) -> str:
    """Inference precision: fp32 for a model trained with precision = fp32, else auto (bf16
    where this device computes it natively; a bf16-trained model also runs where it does not)."""
    return "fp32" if state["config"]["training"]["precision"] == "fp32" else "auto"


def model_from_checkpoint(state: dict, device: torch.device) -> UNet3D:
    """Rebuild the network from a checkpoint alone (its model_args and weights), in eval mode."""
    model = build_model(state["model_args"], device, fast_settings(device)[1])
    model.load_state_dict(state["model"])
    return model.eval()


def preprocessing_from_checkpoint(state: dict) -> PreprocessingConfig:
    """The preprocessing settings the model was trained with (so new scans get the same grid)."""
    values = dict(state["config"]["preprocessing"])
    for key in ("grid", "clip_percentiles"):
        values[key] = tuple(values[key])
    return PreprocessingConfig(**values)


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


def segment_scan(
    model: UNet3D,
    scan: sitk.Image,
    settings: PreprocessingConfig,
    device: torch.device,
    map_probabilities: bool = True,
    precision: str = "auto",
) -> sitk.Image:
    """A scan without mask (any orientation) -> its uint8 class-index mask, same geometry."""
    grid = to_grid(sitk.DICOMOrient(scan, CANONICAL), None, settings)
    probabilities = predict_probabilities(model, grid.image, device, precision)
    return back_to_scan(probabilities, grid.image, scan, map_probabilities)


def summarise(metrics: pd.DataFrame, class_names: tuple[str, ...]) -> pd.DataFrame:
    """Per class: n, dice mean/std, HD95 and ASSD means (NaN distances left out)."""
    grouped = metrics.groupby("class", sort=False)
    summary = pd.DataFrame(
        {
            "n": grouped["dice"].size(),
            "dice_mean": grouped["dice"].mean(),
            "dice_std": grouped["dice"].std(ddof=0),
            "hd95_mm_mean": grouped["hd95_mm"].mean(),
            "assd_mm_mean": grouped["assd_mm"].mean(),
        }
    )
    order = [name for name in class_names[1:] if name in summary.index]
    return summary.loc[order].rename_axis("class").reset_index()


def evaluate_checkpoint(
    state: dict,
    cases: pd.DataFrame,
    run_dir: Path,
    lookup: dict[int, int],
    device: torch.device,
    map_probabilities: bool = True,
    figures: int = 4,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test a checkpoint on preprocessed, labelled cases (manifest rows: case_id, image_path,
    mask_path, out_image). Writes predictions, test_metrics.csv, test_summary.csv and figures
    of the `figures` cases with the lowest mean Dice. Predicts at the checkpoint's precision.
    Returns (metrics, summary)."""
    model = model_from_checkpoint(state, device)
    precision = precision_from_checkpoint(state)
    class_names = tuple(state["class_names"])
    rows, shown = [], []
    for case in tqdm(cases.itertuples(), total=len(cases), desc="test", disable=not progress):
        scan = read_scan(Path(case.image_path), "image")
        raw_mask = read_scan(Path(case.mask_path), "mask")
        reference = sitk.GetImageFromArray(map_labels(sitk.GetArrayFromImage(raw_mask), lookup))
        reference.CopyInformation(scan)
        grid_image = sitk.ReadImage(str(case.out_image))
        probabilities = predict_probabilities(model, grid_image, device, precision)
        prediction = back_to_scan(probabilities, grid_image, scan, map_probabilities)
        atomic_write_image(prediction, run_dir / "predictions" / f"{case.case_id}.mha")
        case_rows = [
            {"case_id": case.case_id, **row}
            for row in case_metrics(prediction, reference, class_names)
        ]
        rows += case_rows
        mean_dice = float(np.mean([row["dice"] for row in case_rows]))
        shown.append((mean_dice, case.case_id, scan, reference, prediction))
        shown = sorted(shown, key=lambda item: item[0])[:figures]  # keep only the worst
    metrics = pd.DataFrame(rows, columns=["case_id", "class", "dice", "hd95_mm", "assd_mm"])
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
