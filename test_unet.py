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
from torch import nn
from tqdm import tqdm

from config import TestingConfig
from devices import autocast_dtype, fast_settings
from instances import (
    CANAL_LABEL,
    INSTANCE_CLASSES,
    discs_only,
    instance_classes,
    level_name,
    level_note,
    separate_instances,
    write_instances,
)
from patches import model_predictor, window_probabilities
from plan import canonical_settings, plan_lookup, plan_settings
from spider_metrics import disc_components_reference, spider_scores, summarise_spider
from store_plot_metrics import plot_overlay, write_csv
from train import build_model
from vertebraeseg import (
    CANONICAL,
    CaseError,
    atomic_write_image,
    check_same_geometry,
    grid_to_scan,
    labels_to_scan,
    map_labels,
    predictions_to_scan,
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

    Surfaces are the masks' boundary voxels (sitk.LabelContour: a voxel with a background face
    neighbour); a surface voxel's distance is the absolute signed Maurer distance to the other
    mask's boundary (a voxel with any background neighbour, as the Maurer map takes it), mm.
    HD95 is the larger of the two directed 95th percentiles; ASSD averages both directions
    together.
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


def inference_layout(state: dict, device: torch.device) -> bool:
    """Whether a checkpoint's network runs in channels_last_3d on device (fast_settings, for
    the network's norm)."""
    return fast_settings(device, "auto", True, state["model_args"]["norm"])[1]


def model_from_checkpoint(state: dict, device: torch.device) -> nn.Module:
    """Rebuild the network from a checkpoint alone (its model_args and weights), in eval mode."""
    model = build_model(state["model_args"], device, inference_layout(state, device))
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


def uses_spider_numbering(plan: dict) -> bool:
    """Whether the plan's reference masks carry SPIDER's instance numbering: vertebrae among
    1-25/101-125, discs among 201-225 and the canal 100 (a semantic export such as the real
    slabs' 76/29/150 does not)."""
    names = plan["class_names"]
    if any(name not in names for name in INSTANCE_CLASSES):
        return False
    values: dict[str, set[int]] = {name: set() for name in names}
    for raw, index in plan_lookup(plan).items():
        values[names[index]].add(raw)
    vertebrae, discs, canal = (values[name] for name in INSTANCE_CLASSES)
    allowed = set(range(1, 26)) | set(range(101, 126))
    return (
        len(vertebrae) > 1
        and vertebrae <= allowed
        and len(discs) > 1
        and discs <= set(range(201, 226))
        and canal == {100}
    )


def testing_from_checkpoint(state: dict) -> TestingConfig:
    """The [testing] settings the checkpoint's run was configured with (defaults for keys an
    older run did not have)."""
    saved = state["config"].get("testing", {})
    known = TestingConfig.__dataclass_fields__
    return TestingConfig(**{key: value for key, value in saved.items() if key in known})


@dataclass(frozen=True)
class Predictor:
    """Everything that turns a raw scan into masks: the network (or the members of an ensemble,
    whose class probabilities are averaged), the plan its data were made with, the device and
    precision, and the [testing] settings of the way back (probabilities or labels,
    sliding-window overlap, flip TTA, small-component removal, the instance step)."""

    models: tuple[nn.Module, ...]
    plan: dict
    device: torch.device
    precision: str = "auto"
    testing: TestingConfig = TestingConfig()
    window_batch: int = 1  # sliding windows predicted at once (spacing mode)
    channels_last: bool = False  # the networks' memory layout (inference_layout)

    @classmethod
    def from_checkpoint(
        cls,
        states: dict | list[dict],
        device: torch.device,
        testing: TestingConfig | None = None,
    ) -> Predictor:
        """states: one checkpoint, or several for an ensemble (same plan and classes, or a
        ValueError that names the differing key: check_same_plans). testing: None for the
        first checkpoint run's own [testing] settings."""
        states = [states] if isinstance(states, dict) else list(states)
        check_same_plans(states)
        plan = plan_from_checkpoint(states[0])
        testing = testing or testing_from_checkpoint(states[0])
        if testing.instances:
            instance_classes(tuple(plan["class_names"]))  # fail before any scan is read
        models = tuple(model_from_checkpoint(state, device) for state in states)
        check_plan_fits(plan, models)  # before any scan is read, not once per scan
        return cls(
            models,
            plan,
            device,
            precision_from_checkpoint(states[0]),
            testing,
            min(window_batch_size(state) for state in states),
            inference_layout(states[0], device),
        )


def check_plan_fits(plan: dict, models: tuple[nn.Module, ...]) -> None:
    """ValueError unless every network takes the plan's input: the grid (grid mode) or the
    patch (spacing mode), in (height, width, slices), a multiple of the network's divisor."""
    key = "patch_size" if plan.get("mode") == "spacing" else "grid"
    height, width, slices = plan[key]
    for model in models:
        divisor = model.divisor  # (slices, height, width)
        if any(size % d for size, d in zip((slices, height, width), divisor, strict=True)):
            raise ValueError(
                f"the checkpoint's plan {key} {height}, {width}, {slices} (height, width, "
                f"slices) does not fit its network, which needs multiples of "
                f"{divisor[1]}, {divisor[2]}, {divisor[0]}: the checkpoint is inconsistent"
            )


def check_same_plans(states: list[dict], names: list[str] | None = None) -> None:
    """ValueError unless every checkpoint has the first one's plan (every key: preprocessing,
    label map, grid or spacing and patch) and class names; the message names the key and both
    values. names: how to call the checkpoints in the message (default #1, #2, ...)."""
    names = names or [f"#{i + 1}" for i in range(len(states))]

    def plan_and_classes(state: dict) -> dict:  # settings compared as values: canonical_settings
        return {
            **canonical_settings(plan_from_checkpoint(state)),
            "class_names": state["class_names"],
        }

    first = plan_and_classes(states[0])
    for name, state in zip(names[1:], states[1:], strict=True):
        other = plan_and_classes(state)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"checkpoints {names[0]} and {name} differ in {key}: "
                    f"{first.get(key)!r} against {other.get(key)!r}; an ensemble needs one plan"
                )


def window_batch_size(state: dict) -> int:
    """Sliding windows predicted at once: the run's training batch_size, a batch of patches
    that the training's device held with gradients, so inference (without them) fits too."""
    return max(1, int(state["config"]["training"]["batch_size"]))


@dataclass(frozen=True)
class Segmentation:
    """A scan's predicted masks and the label-free crop they were predicted from."""

    classes: sitk.Image  # uint8 class indices, exactly the scan's geometry
    crop_index: tuple[int, int, int]  # in the PIR-reoriented scan, (x, y, z)
    crop_size: tuple[int, int, int]
    instances: sitk.Image | None = None  # SPIDER-numbered instances (the instance step)
    confidence: sitk.Image | None = None  # largest class probability per voxel, on the scan

    def write(
        self, folder: Path, name: str, scan: sitk.Image | None = None
    ) -> tuple[list[Path], pd.DataFrame | None, dict | None]:
        """folder/<name>.mha, and with instances the scan's report (instances.write_instances:
        <name>_instances.mha and .csv with the measurements per level, <name>_qc.json,
        <name>_levels.png on `scan`). Atomic writes. Returns (the paths, the instances CSV's
        table and the quality flags; both None without instances)."""
        paths = [folder / f"{name}.mha"]
        atomic_write_image(self.classes, paths[0])
        if self.instances is None:
            return paths, None, None
        written, table, qc = write_instances(self.instances, folder, name, scan, self.confidence)
        return paths + written, table, qc


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    grid_image: sitk.Image,
    device: torch.device,
    precision: str = "auto",
    patch_size: tuple[int, int, int] | None = None,
    overlap: float = 0.5,
    flip: bool = False,
    window_batch: int = 1,
    channels_last: bool = False,
) -> np.ndarray:
    """Softmax probabilities (classes, slices, height, width) float32 for one image.

    precision auto|bf16|fp32 as in [training]; channels_last: feed channels_last_3d input (the
    layout of a network built by model_from_checkpoint, inference_layout).
    patch_size None: the whole image in one pass (grid mode); else (slices, height, width) and
    a Gaussian-weighted sliding window with `overlap` (spacing mode, patches.py). flip: the mean
    with the prediction of the left-right flipped image (test-time augmentation). window_batch:
    sliding windows predicted at once.
    """
    array = sitk.GetArrayFromImage(grid_image).astype(np.float32)
    image = torch.from_numpy(array)[None].to(device)
    amp_dtype = autocast_dtype(device, precision)
    predict = model_predictor(model, amp_dtype, channels_last)
    if patch_size is None:
        probabilities = predict(image[None])[0].softmax(dim=0)
        if flip:
            flipped = predict(image.flip(1)[None])[0].softmax(dim=0)
            probabilities = (probabilities + flipped.flip(1)) / 2
    else:
        classes = model.arguments["num_classes"]
        probabilities = window_probabilities(
            predict, image, patch_size, overlap, classes, flip_slices=flip, batch_size=window_batch
        )
    return probabilities.float().cpu().numpy()


def back_to_scan(
    probabilities: np.ndarray,
    grid_image: sitk.Image,
    scan: sitk.Image,
    map_probabilities: bool,
    map_log: bool = False,
) -> sitk.Image:
    """Grid prediction -> uint8 class indices on the scan (probabilities, their logarithms with
    map_log, or labels resampled)."""
    if map_probabilities:
        return grid_to_scan(probabilities, grid_image, scan, log=map_log)
    grid_labels = sitk.GetImageFromArray(probabilities.argmax(0).astype(np.uint8))
    grid_labels.CopyInformation(grid_image)
    return labels_to_scan(grid_labels, scan)


def ensemble_probabilities(
    predictor: Predictor,
    grid_image: sitk.Image,
    patch: tuple[int, int, int] | None,
    flip: bool | None = None,
) -> np.ndarray:
    """Class probabilities (classes, slices, height, width) of the predictor's networks on one
    preprocessed image: their mean (one network: its own), each as predict_probabilities
    gives them with the predictor's settings (flip: None for [testing] tta_flip)."""
    testing = predictor.testing
    flip = testing.tta_flip if flip is None else flip
    total = None
    for model in predictor.models:
        probabilities = predict_probabilities(
            model,
            grid_image,
            predictor.device,
            predictor.precision,
            patch,
            testing.overlap,
            flip,
            predictor.window_batch,
            predictor.channels_last,
        )
        total = probabilities if total is None else total + probabilities
    return total / len(predictor.models)


def mirrored(image: sitk.Image) -> sitk.Image:
    """A PIR grid image mirrored left-right (its slices, the array's first axis, in reverse
    order) with the same geometry: the input of a flipped pass."""
    result = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)[::-1]))
    result.CopyInformation(image)
    return result


def segment_scan(predictor: Predictor, scan: sitk.Image) -> Segmentation:
    """A raw scan (any orientation; no mask is used) -> its class mask, in the scan's geometry.

    The one prediction path: predict_script.py and the test loop both call it, so a reported
    test number is what a user gets. Preprocessing follows the predictor's plan; the instance
    step (instances.separate_instances) runs on the scan when the predictor asks for it.
    With [testing] tta_shift the scan is predicted on two grids half a voxel apart in-plane
    (the flipped pass of tta_flip on the shifted one) and the two meet on the scan; the
    confidence map comes from the unshifted grid.
    """
    settings, testing = plan_settings(predictor.plan), predictor.testing
    grid = to_grid(sitk.DICOMOrient(scan, CANONICAL), None, settings, testing.tta_shift)
    patch = None
    if settings.mode == "spacing":
        height, width, slices = predictor.plan["patch_size"]
        patch = (slices, height, width)
    if testing.tta_shift:
        shifted = grid.shifted_image
        probabilities = ensemble_probabilities(predictor, grid.image, patch, flip=False)
        if testing.tta_flip:  # the mirrored scan's prediction alone, mirrored back
            second = ensemble_probabilities(predictor, mirrored(shifted), patch, False)
            second = np.ascontiguousarray(second[:, ::-1])
        else:
            second = ensemble_probabilities(predictor, shifted, patch, False)
        predictions = [(probabilities, grid.image), (second, shifted)]
        classes = predictions_to_scan(predictions, scan, testing.map_log)
    else:
        probabilities = ensemble_probabilities(predictor, grid.image, patch)
        classes = back_to_scan(
            probabilities, grid.image, scan, testing.map_probabilities, testing.map_log
        )
    if testing.min_component_mm3 > 0:
        classes = remove_small_components(classes, testing.min_component_mm3)
    instances = confidence = None
    if testing.instances:
        vertebra, disc, canal = instance_classes(tuple(predictor.plan["class_names"]))
        instances = separate_instances(classes, vertebra, disc, canal, testing.min_instance_mm3)
        confidence = confidence_on_scan(probabilities, grid.image, scan)
    return Segmentation(classes, grid.crop_index, grid.crop_size, instances, confidence)


def confidence_on_scan(
    probabilities: np.ndarray, grid_image: sitk.Image, scan: sitk.Image
) -> sitk.Image:
    """The largest class probability per voxel (float32), resampled linearly from the grid
    onto the scan (1 outside the crop, which is certain background); for the quality flags."""
    largest = sitk.GetImageFromArray(probabilities.max(axis=0).astype(np.float32))
    largest.CopyInformation(grid_image)
    return sitk.Resample(largest, scan, sitk.Transform(), sitk.sitkLinear, 1.0)


def remove_small_components(classes: sitk.Image, min_mm3: float) -> sitk.Image:
    """Post-processing: connected components (26-connected) of each foreground class smaller
    than min_mm3 become background. classes: uint8 class indices; geometry kept."""
    array = sitk.GetArrayFromImage(classes)
    voxel_mm3 = float(np.prod(classes.GetSpacing()))
    for label in np.unique(array):
        if label == 0:
            continue
        components = sitk.ConnectedComponent(classes == int(label), True)
        sizes = sitk.GetArrayFromImage(components)
        counts = np.bincount(sizes.ravel())
        small = np.flatnonzero(counts * voxel_mm3 < min_mm3)
        small = small[small > 0]
        array[np.isin(sizes, small)] = 0
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(classes)
    return result


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
) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(scan, class-index reference, raw reference as uint16), both references in the scan's
    geometry; CaseError names the file and the problem."""
    scan = read_scan(image_path, "image")
    raw_mask = read_scan(mask_path, "mask")
    check_same_geometry(scan, raw_mask)
    raw = sitk.GetArrayFromImage(raw_mask)
    if not raw.any():
        raise CaseError(f"mask {Path(mask_path).name} is empty: no labelled voxel to test against")
    reference = sitk.GetImageFromArray(map_labels(raw, lookup))
    reference.CopyInformation(scan)
    raw_reference = sitk.GetImageFromArray(raw.astype(np.uint16))
    raw_reference.CopyInformation(scan)
    return scan, reference, raw_reference


def score_case_instances(
    raw_reference: sitk.Image,
    instances: sitk.Image,
    spider_references: bool,
    disc_values: tuple[int, ...],
    testing: TestingConfig,
) -> dict[str, float]:
    """spider_scores of a case's predicted instances (SPIDER numbering), with the level
    agreement. References in SPIDER numbering are scored whole; a semantic reference (one
    value for all discs, as the real slabs) only for its discs, against their connected
    components numbered upward from L5/S1 (spider_metrics.disc_components_reference; the
    vertebra and canal scores are then NaN)."""
    if spider_references:
        return spider_scores(raw_reference, instances)
    reference = disc_components_reference(raw_reference, disc_values, testing.min_instance_mm3)
    return spider_scores(reference, discs_only(instances))


def measurement_differences(
    case_id: str, predicted: sitk.Image, reference: sitk.Image
) -> list[dict[str, object]]:
    """Per level present in both SPIDER-numbered masks and per measurement of
    measure.measure_levels: case_id, label, level, measurement, predicted, reference,
    difference (predicted - reference; NaN where either is NaN)."""
    from measure import MEASUREMENTS, measure_levels

    ours = measure_levels(predicted).set_index("label")
    theirs = measure_levels(reference).set_index("label")
    rows = []
    for label in sorted(set(ours.index) & set(theirs.index) - {CANAL_LABEL}):
        for measurement in MEASUREMENTS:
            a, b = float(ours.loc[label, measurement]), float(theirs.loc[label, measurement])
            if math.isnan(a) and math.isnan(b):
                continue
            rows.append(
                {
                    "case_id": case_id,
                    "label": int(label),
                    "level": level_name(int(label)),
                    "measurement": measurement,
                    "predicted": a,
                    "reference": b,
                    "difference": a - b,
                }
            )
    return rows


def evaluate_checkpoint(
    state: dict | list[dict],
    cases: pd.DataFrame,
    run_dir: Path,
    device: torch.device,
    testing: TestingConfig,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Test a checkpoint (or an ensemble: a list of checkpoints, Predictor.from_checkpoint) as
    deployed: every case is segmented from its RAW scan by segment_scan (the path
    predict_script.py takes), following the checkpoint's plan; the reference (mapped with the
    plan's label map) is read only for the metrics.

    cases: rows with case_id, image_path, mask_path (raw files). Writes predictions/<case>.mha,
    test_metrics.csv (one row per case and class, METRIC_COLUMNS), test_summary.csv and
    figures of the testing.figures cases with the lowest mean Dice. A case that cannot be read
    is reported and skipped. With testing.instances the instance step runs too:
    predictions/<case>_instances.mha/.csv (a scan whose level names are uncertain is named in
    a printed line), and the challenge's metric with the level agreement (spider_metrics,
    score_case_instances: every structure where the references carry SPIDER numbering, the
    discs against their connected components where they are semantic):
    test_instance_metrics.csv (per case) and test_instance_summary.csv; and the measurements
    per level (measure.py) of prediction and reference (the reference's own instances, or a
    semantic reference through the same instance step): test_measurements.csv.
    Returns (metrics, summary, instance summary or None); the cases tested are those in
    metrics (a case skipped has no row).
    """
    predictor = Predictor.from_checkpoint(state, device, testing)
    lookup = plan_lookup(predictor.plan)
    class_names = tuple(predictor.plan["class_names"])
    spider_references = uses_spider_numbering(predictor.plan)
    disc_values = tuple(
        raw for raw, index in lookup.items() if class_names[index] == INSTANCE_CLASSES[1]
    )
    score_instances = testing.instances and (spider_references or bool(disc_values))
    rows, instance_rows, shown, measured = [], [], [], []
    for case in tqdm(cases.itertuples(), total=len(cases), desc="test", disable=not progress):
        try:
            scan, reference, raw_reference = read_reference(
                Path(case.image_path), Path(case.mask_path), lookup
            )
            segmentation = segment_scan(predictor, scan)
        except CaseError as err:
            tqdm.write(f"test case {case.case_id} skipped ({case.image_path}): {err}")
            continue
        prediction = segmentation.classes
        segmentation.write(run_dir / "predictions", case.case_id, scan)
        if segmentation.instances is not None and level_note(segmentation.instances):
            tqdm.write(f"test case {case.case_id}: levels: {level_note(segmentation.instances)}")
        if score_instances:
            scores = score_case_instances(
                raw_reference, segmentation.instances, spider_references, disc_values, testing
            )
            instance_rows.append({"case_id": case.case_id, **scores})
            reference_instances = (
                raw_reference
                if spider_references
                else separate_instances(
                    reference, *instance_classes(class_names), testing.min_instance_mm3
                )
            )
            measured += measurement_differences(
                case.case_id, segmentation.instances, reference_instances
            )
        case_rows = []
        for index, row in enumerate(case_metrics(prediction, reference, class_names), start=1):
            lost = outside_crop_fraction(
                reference, segmentation.crop_index, segmentation.crop_size, index
            )
            case_rows.append({"case_id": case.case_id, **row, "reference_outside_crop": lost})
        rows += case_rows
        mean_dice = float(np.mean([row["dice"] for row in case_rows]))
        shown.append((mean_dice, case.case_id, scan, reference, prediction))
        shown = sorted(shown, key=lambda item: item[0])[: testing.figures]  # the worst only
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    summary = summarise(metrics, class_names)
    write_csv(metrics, run_dir / "test_metrics.csv")
    write_csv(summary, run_dir / "test_summary.csv")
    instance_summary = None
    if measured:
        write_csv(pd.DataFrame(measured), run_dir / "test_measurements.csv")
    if instance_rows:
        per_case = pd.DataFrame(instance_rows)
        instance_summary = summarise_spider(per_case)
        write_csv(per_case, run_dir / "test_instance_metrics.csv")
        write_csv(instance_summary, run_dir / "test_instance_summary.csv")
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
    return metrics, summary, instance_summary
