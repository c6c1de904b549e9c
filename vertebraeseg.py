"""Preprocessing library: SPIDER-layout scans -> one fixed grid, and the way back.

Pipeline for one case (every step a function of explicit arguments):
    read + validate -> reorient to PIR -> map raw labels to class indices -> normalise
    -> crop image AND mask with one box -> resample to the grid.
The grid is a SimpleITK image in PIR orientation whose origin/spacing/direction describe the
crop's physical extent: sitk size (x=width A-P, y=height S-I, z=sagittal slices), numpy array
(slices, height, width). A prediction on the grid goes back onto the scan with one resample
(`grid_to_scan`), using the scan itself as reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from atomic import atomic_path
from config import PreprocessingConfig, target_spacing

CANONICAL = "PIR"
IMAGE_SUFFIXES = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd")
NAME_PATTERN = re.compile(r"(?P<patient>[A-Za-z0-9-]+)_(?P<sequence>[A-Za-z0-9_]+)")
GEOMETRY_TOLERANCE = 1e-3  # relative, for spacing / direction; origin in mm (x spacing)
MIN_BODY_VOXELS = 8  # a body smaller than 2 x 2 x 2 body-mask voxels is no body
SPACING_RANGE_MM = (0.05, 20.0)  # a voxel size outside this is no MR scan's (a bad header)
PREPROCESSING_VERSION = 2  # bump when the output of preprocess_case changes
BODY_MASK_RESOLUTION_MM = 2.0  # the body mask (for the crop) is found at this coarse spacing
NO_SHIFT = (0.0, 0.0, 0.0)  # grid_geometry's phase: the grid's edges on the region's
HALF_IN_PLANE = (0.5, 0.5, 0.0)  # half a grid voxel along A-P and S-I (PIR x, y): tta_shift
# [preprocessing] mask_interpolation: the class-index mask onto the grid. nearest takes one
# scan voxel's class per grid voxel (up to half a scan voxel off its centre when the grid is
# coarser); linear takes the class whose indicator, linearly interpolated, is largest there.
MASK_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLabelLinear}
LOG_FLOOR = 1e-6  # grid_to_scan(log=True): probabilities below this count as this


class CaseError(ValueError):
    """A case that cannot be used; the message is the one-line reason recorded in the manifest."""


@dataclass(frozen=True)
class CaseFiles:
    case_id: str  # "<patient>_<sequence>", e.g. "12_t2"
    patient_id: str
    sequence: str
    image_path: Path
    mask_path: Path | None


@dataclass(frozen=True)
class GridCase:
    """One case on the grid: float32 image and uint8 class-index mask (None without labels)."""

    image: sitk.Image
    mask: sitk.Image | None
    crop_index: tuple[int, int, int]  # in the PIR-reoriented scan, (x, y, z)
    crop_size: tuple[int, int, int]
    crop_widened: bool  # the body box was widened so that no labelled voxel is cut
    shifted_image: sitk.Image | None = None  # on the grid moved by HALF_IN_PLANE (tta_shift)


def split_suffix(name: str) -> tuple[str, str] | None:
    """'1_t1.nii.gz' -> ('1_t1', '.nii.gz'); None for a file that is not an image."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def discover_cases(
    raw_dir: Path, sequences: tuple[str, ...], require_masks: bool = True
) -> tuple[list[CaseFiles], list[tuple[str, str]]]:
    """Pair raw_dir/images/<patient>_<seq>.<ext> with raw_dir/masks/ by name.

    Returns (cases, problems): problems are (name, reason) for files that cannot form a case
    (bad name, unselected sequence, duplicate case id, image without mask, mask without image).
    Files that are not images (csv, txt, ...) are ignored.
    """
    raw_dir = Path(raw_dir)
    if not (raw_dir / "images").is_dir():
        raise FileNotFoundError(f"{raw_dir}: no images/ folder (expected SPIDER layout)")
    problems: list[tuple[str, str]] = []

    def index(folder: Path) -> dict[str, Path]:
        found: dict[str, list[Path]] = {}
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                parts = split_suffix(path.name)
                if parts is not None and path.is_file():
                    found.setdefault(parts[0], []).append(path)
        unique = {}
        for stem, paths in found.items():
            if len(paths) > 1:
                names = " and ".join(p.name for p in paths)
                problems.append((stem, f"duplicate case id in {folder.name}/: {names}"))
            else:
                unique[stem] = paths[0]
        return unique

    images = index(raw_dir / "images")
    masks = index(raw_dir / "masks")
    cases = []
    for stem, image_path in images.items():
        match = NAME_PATTERN.fullmatch(stem)
        if not match:
            problems.append((stem, f"file name {image_path.name} does not match <patient>_<seq>"))
            continue
        if match["sequence"] not in sequences:
            problems.append((stem, f"sequence {match['sequence']!r} not in [data] sequences"))
            continue
        mask_path = masks.get(stem)
        if mask_path is None and require_masks:
            problems.append((stem, f"image {image_path.name} has no mask in masks/"))
            continue
        cases.append(CaseFiles(stem, match["patient"], match["sequence"], image_path, mask_path))
    reported = {name for name, _ in problems}  # e.g. a duplicate mask id, reported once
    for stem, mask_path in masks.items():
        if stem not in images and stem not in reported:
            problems.append((stem, f"mask {mask_path.name} has no image in images/"))
    return cases, problems


def read_overview(raw_dir: Path) -> pd.DataFrame | None:
    """raw_dir/overview.csv (one row per series, key new_file_name), or None when absent."""
    path = Path(raw_dir) / "overview.csv"
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable CSV ({first})") from None
    if "new_file_name" not in table.columns:
        raise ValueError(f"{path}: no new_file_name column (SPIDER overview layout)")
    return table


def read_scan(path: Path, what: str = "image") -> sitk.Image:
    """Read one 3-D scalar image; CaseError names the file and the problem (missing, a
    symlink to nothing, unreadable, not 3-D scalar, implausible geometry, a mask with
    fractional values)."""
    path = Path(path)
    if not path.exists():
        kind = "a symlink to nothing (broken or looping)" if path.is_symlink() else "missing"
        raise CaseError(f"{what} {path} is {kind}")
    if not os.access(path, os.R_OK):
        raise CaseError(f"{what} {path} cannot be read (no permission)")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "error" in line), "")
        raise CaseError(f"{what} {path.name} is unreadable ({detail.strip()[:160]})") from None
    if image.GetDimension() != 3:
        raise CaseError(f"{what} {path.name} is {image.GetDimension()}-D, expected 3-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            f"{what} {path.name} has {image.GetNumberOfComponentsPerPixel()} components per "
            "pixel (vector/RGB), expected a scalar image"
        )
    check_geometry(image, f"{what} {path.name}")
    if what == "mask" and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise CaseError(
                f"mask {path.name} holds {fractional.size} non-integer values (e.g. "
                f"{float(fractional[0]):g}): a label mask holds whole numbers"
            )
    return image


def check_geometry(image: sitk.Image, what: str) -> None:
    """CaseError unless the spacing is plausible for MR (SPACING_RANGE_MM, every axis) and the
    direction matrix is orthonormal (a rotation, possibly with a flip)."""
    spacing = np.array(image.GetSpacing())
    low, high = SPACING_RANGE_MM
    if not (np.isfinite(spacing).all() and (spacing >= low).all() and (spacing <= high).all()):
        raise CaseError(
            f"{what} has spacing {tuple(round(float(s), 4) for s in spacing)} mm: outside "
            f"{low}-{high} mm, not an MR scan's (check the file's header)"
        )
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise CaseError(
            f"{what} has a direction matrix that is not orthonormal: {direction.tolist()}"
        )


def check_same_geometry(image: sitk.Image, mask: sitk.Image) -> None:
    """Raise CaseError unless image and mask share size, spacing, origin and direction."""
    if image.GetSize() != mask.GetSize():
        raise CaseError(f"image size {image.GetSize()} != mask size {mask.GetSize()}")
    spacing_i, spacing_m = np.array(image.GetSpacing()), np.array(mask.GetSpacing())
    if not np.allclose(spacing_i, spacing_m, rtol=GEOMETRY_TOLERANCE):
        raise CaseError(f"image spacing {tuple(spacing_i)} != mask spacing {tuple(spacing_m)}")
    origin_gap = np.abs(np.array(image.GetOrigin()) - np.array(mask.GetOrigin())).max()
    if origin_gap > GEOMETRY_TOLERANCE * spacing_i.max() * 100:
        raise CaseError(f"image origin {image.GetOrigin()} != mask origin {mask.GetOrigin()}")
    if not np.allclose(image.GetDirection(), mask.GetDirection(), atol=GEOMETRY_TOLERANCE):
        raise CaseError("image and mask directions differ")


def map_labels(mask: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """Raw mask values -> class indices (uint8), one fixed index per value for every case.

    Raises CaseError listing the raw values that the label map does not name.
    """
    values = np.unique(mask)
    unknown = [int(v) for v in values if int(v) not in lookup]
    if unknown:
        raise CaseError(f"mask values {unknown[:10]} are not in the [labels] map")
    table = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for raw, index in lookup.items():
        if raw <= values.max():
            table[raw] = index
    return table[mask.astype(np.int64)]


def normalise(
    image: sitk.Image, method: str, clip_percentiles: tuple[float, float], padding_value: float
) -> sitk.Image:
    """Float32 intensities normalised over the body; geometry copied.

    Padding (values <= padding_value) is excluded from all statistics. Intensities are clipped
    at the given percentiles of the non-padding voxels (removes saturation); the mean/std
    (zscore) are taken over the body (above an Otsu threshold, so air does not count);
    minmax maps the clip range to 0..1. Padding voxels get the low clip value.
    """
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if not np.isfinite(array).all():
        raise CaseError(f"image holds {int((~np.isfinite(array)).sum())} NaN/inf intensities")
    valid = array > padding_value
    if not valid.any():
        raise CaseError(f"every voxel is padding (<= {padding_value})")
    low, high = np.percentile(array[valid], clip_percentiles)
    if high <= low:
        raise CaseError(f"image is constant (intensity {low:g}) over its non-padding voxels")
    array = np.clip(array, low, high)
    array[~valid] = low
    if method == "minmax":
        out = (array - low) / (high - low)
    else:
        body = array[valid]
        body = body[body > _otsu_threshold(body)]
        mean, std = float(body.mean()), float(body.std())
        out = (array - mean) / max(std, 1e-6)
    result = sitk.GetImageFromArray(out.astype(np.float32))
    result.CopyInformation(image)
    return result


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (sitk's filter works on images, this on a voxel set):
    the upper edge of the last bin of the lower class, so that `values > threshold` is exactly
    the upper class the histogram split chose (a bin's centre would cut its bin in two)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    cum_mean = np.cumsum(hist * centres)
    mean0 = cum_mean / np.maximum(weight0, 1)
    mean1 = (cum_mean[-1] - cum_mean) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def body_mask(
    image: sitk.Image, closing_radius_mm: float, resolution_mm: float = BODY_MASK_RESOLUTION_MM
) -> sitk.Image:
    """Largest connected component of an Otsu foreground after morphological closing (uint8).

    Computed on a copy resampled to at least `resolution_mm` per axis (the body is large, and
    closing at full resolution costs seconds): the result has that coarse geometry.
    """
    spacing = np.array(image.GetSpacing())
    extent = np.array(image.GetSize()) * spacing
    coarse_size = np.maximum(1, np.round(extent / np.maximum(spacing, resolution_mm))).astype(int)
    coarse = resample_to_grid(image, tuple(int(v) for v in coarse_size[[1, 0, 2]]), sitk.sitkLinear)
    foreground = sitk.OtsuThreshold(coarse, 0, 1, 256)
    radius = [max(0, round(closing_radius_mm / s)) for s in coarse.GetSpacing()]
    if any(radius):
        foreground = sitk.BinaryMorphologicalClosing(foreground, radius, sitk.sitkBall, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(foreground), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)


def bounding_box(array: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, stop) in numpy (z, y, x) order of the non-zero voxels, or None when all zero."""
    nonzero = np.nonzero(array)
    if nonzero[0].size == 0:
        return None
    return np.array([a.min() for a in nonzero]), np.array([a.max() + 1 for a in nonzero])


def crop_box(
    image: sitk.Image, body: sitk.Image, labels: np.ndarray | None, margin_mm: float
) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
    """Crop box of `image` (sitk index, size; x,y,z order) around the body plus a margin in mm.

    body: a mask of the same physical space in any sampling (see body_mask). With labels
    (numpy z,y,x class indices on image's grid) the box is widened to hold every labelled
    voxel; the flag says whether that happened.
    """
    body_array = sitk.GetArrayViewFromImage(body)
    body_voxels = np.count_nonzero(body_array)
    if body_voxels < MIN_BODY_VOXELS:
        raise CaseError(
            f"crop would be empty: the body found by Otsu + closing has "
            f"{body_voxels} voxels at body-mask resolution (< {MIN_BODY_VOXELS})"
        )
    box = bounding_box(body_array)
    corners = []
    for corner in (box[0][::-1] - 0.5, box[1][::-1] - 0.5):  # outer voxel edges, x,y,z
        point = body.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        corners.append(image.TransformPhysicalPointToContinuousIndex(point))
    low, high = np.minimum(*corners), np.maximum(*corners)
    spacing = np.array(image.GetSpacing())
    margin = np.round(margin_mm / spacing)
    size = np.array(image.GetSize())
    start = np.clip(np.floor(low + 0.5) - margin, 0, size).astype(int)
    stop = np.clip(np.ceil(high + 0.5) + margin, 0, size).astype(int)
    widened = False
    if labels is not None:
        label_box = bounding_box(labels)
        if label_box is not None:
            label_start, label_stop = label_box[0][::-1], label_box[1][::-1]
            widened = bool((label_start < start).any() or (label_stop > stop).any())
            start, stop = np.minimum(start, label_start), np.maximum(stop, label_stop)
    if (stop <= start).any():
        raise CaseError("crop would be empty: the body box lies outside the image")
    index = tuple(int(v) for v in start)
    extent = tuple(int(v) for v in stop - start)
    return index, extent, widened  # type: ignore[return-value]


def grid_geometry(
    region: sitk.Image, grid: tuple[int, int, int], phase: tuple[float, float, float] = NO_SHIFT
) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """Size, spacing and origin of a grid covering `region`'s physical extent exactly.

    grid: (height S-I, width A-P, slices) -> sitk size (x=width, y=height, z=slices) for PIR.
    The grid's outer voxel edges coincide with the region's outer voxel edges, unless `phase`
    (a fraction of a grid voxel along x, y, z) shifts the whole grid by that much.
    """
    height, width, slices = grid
    size = (width, height, slices)
    old_size = np.array(region.GetSize(), dtype=float)
    old_spacing = np.array(region.GetSpacing())
    spacing = old_size * old_spacing / np.array(size)
    direction = np.array(region.GetDirection()).reshape(3, 3)
    shift = direction @ ((spacing - old_spacing) / 2 + np.array(phase) * spacing)
    origin = np.array(region.GetOrigin()) + shift
    return size, tuple(spacing.tolist()), tuple(origin.tolist())


def resample_to_grid(
    image: sitk.Image,
    grid: tuple[int, int, int],
    interpolator: int,
    default: float = 0.0,
    phase: tuple[float, float, float] = NO_SHIFT,
) -> sitk.Image:
    """Resample `image` onto the grid that covers its own physical extent (shifted by
    `phase` of a grid voxel: grid_geometry)."""
    size, spacing, origin = grid_geometry(image, grid, phase)
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        interpolator,
        origin,
        spacing,
        image.GetDirection(),
        default,
        image.GetPixelID(),
    )


def spacing_grid(
    region: sitk.Image, spacing_mm: tuple[float, float, float]
) -> tuple[int, int, int]:
    """The grid (height S-I, width A-P, slices) that samples a PIR region at about spacing_mm
    (same order): its extent divided by the spacing, rounded, at least 1 voxel per axis. The
    grid then covers the region exactly, so its spacing differs from the target by < half a
    voxel over the extent."""
    extent = np.array(region.GetSize()) * np.array(region.GetSpacing())  # x, y, z
    target = np.array(spacing_mm)[[1, 0, 2]]  # (S-I, A-P, slices) -> x=A-P, y=S-I, z=slices
    size = np.maximum(1, np.round(extent / target)).astype(int)
    return int(size[1]), int(size[0]), int(size[2])


def to_grid(
    image: sitk.Image,
    labels: sitk.Image | None,
    settings: PreprocessingConfig,
    shifted: bool = False,
) -> GridCase:
    """Reoriented (PIR) image [+ class-index mask] -> GridCase.

    mode grid: the crop stretched onto settings.grid; mode spacing: the crop sampled at
    settings.target_spacing (resolved mm values, not auto; see spacing_mode.py), its size
    following. image: float or integer scalar image in CANONICAL orientation; labels: uint8
    class indices with the same geometry, or None (then the box comes from the body alone).
    shifted: also the image on the grid moved half a voxel in-plane (HALF_IN_PLANE, from the
    same normalised crop), as GridCase.shifted_image: the second pass of [testing] tta_shift.
    """
    normalised = normalise(
        image, settings.normalisation, settings.clip_percentiles, settings.padding_value
    )
    if settings.crop:
        body = body_mask(normalised, settings.closing_radius_mm)
        label_array = None if labels is None else sitk.GetArrayViewFromImage(labels)
        index, size, widened = crop_box(normalised, body, label_array, settings.crop_margin_mm)
    else:
        index, size, widened = (0, 0, 0), image.GetSize(), False
    region = sitk.RegionOfInterest(normalised, size, index)
    interpolator = (
        sitk.sitkBSpline if settings.image_interpolation == "bspline" else sitk.sitkLinear
    )
    low = float(sitk.GetArrayViewFromImage(normalised).min())
    grid = settings.grid
    if settings.mode == "spacing":
        spacing = target_spacing(settings.target_spacing)
        if spacing is None:
            raise ValueError("target_spacing = auto must be resolved (spacing_mode.py) first")
        grid = spacing_grid(region, spacing)
    grid_image = resample_to_grid(region, grid, interpolator, default=low)
    shifted_image = None
    if shifted:
        shifted_image = resample_to_grid(region, grid, interpolator, low, HALF_IN_PLANE)
    grid_mask = None
    if labels is not None:
        mask_region = sitk.RegionOfInterest(labels, size, index)
        grid_mask = resample_to_grid(
            mask_region, grid, MASK_INTERPOLATORS[settings.mask_interpolation]
        )
    return GridCase(grid_image, grid_mask, tuple(index), tuple(size), widened, shifted_image)


def load_case(
    files: CaseFiles, lookup: dict[int, int]
) -> tuple[sitk.Image, sitk.Image | None, sitk.Image | None]:
    """Read + validate a case. Returns (original scan, PIR image, PIR class-index mask or None)."""
    scan = read_scan(files.image_path, "image")
    labels = None
    if files.mask_path is not None:
        raw_mask = read_scan(files.mask_path, "mask")
        check_same_geometry(scan, raw_mask)
        mask_array = sitk.GetArrayFromImage(raw_mask)
        if not mask_array.any():
            raise CaseError(f"mask {files.mask_path.name} is empty (all background)")
        labels = sitk.GetImageFromArray(map_labels(mask_array, lookup))
        labels.CopyInformation(raw_mask)
        labels = sitk.DICOMOrient(labels, CANONICAL)
    return scan, sitk.DICOMOrient(scan, CANONICAL), labels


def grid_to_scan(
    probabilities: np.ndarray, grid_reference: sitk.Image, scan: sitk.Image, log: bool = False
) -> sitk.Image:
    """Class probabilities on the grid -> uint8 class-index mask in the scan's own geometry.

    probabilities: float array (classes, slices, height, width) = (C, z, y, x) of the grid;
    grid_reference: the grid image (its origin/spacing/direction); scan: the original scan
    (any orientation). Each class map is resampled linearly onto the scan (outside the crop:
    background), then the arg-max is taken: one resample per class, no label mixing.
    log: resample the log-probabilities (floored at LOG_FLOOR) instead: between two grid
    voxels the classes compete by geometric, not arithmetic, means. For one network's softmax
    that arg-max is the one of the resampled logits, as nnU-Net v2 maps its predictions back.
    """
    return predictions_to_scan([(probabilities, grid_reference)], scan, log)


def predictions_to_scan(
    predictions: list[tuple[np.ndarray, sitk.Image]], scan: sitk.Image, log: bool = False
) -> sitk.Image:
    """Several grids' class probabilities -> one uint8 class-index mask on the scan: each
    (probabilities, grid image) pair resampled as grid_to_scan does, the maps of a class
    summed over the pairs (their mean: of log-probabilities with log), then the arg-max. The
    grids may differ (tta_shift: the same scan on grids half a voxel apart)."""
    best = np.full(scan.GetSize()[::-1], -np.inf, dtype=np.float32)
    labels = np.zeros(scan.GetSize()[::-1], dtype=np.uint8)
    for index in range(len(predictions[0][0])):
        total = np.zeros(scan.GetSize()[::-1], dtype=np.float32)
        for probabilities, grid_reference in predictions:
            channel = np.asarray(probabilities[index], dtype=np.float32)
            outside = 1.0 if index == 0 else 0.0
            if log:
                channel = np.log(np.maximum(channel, LOG_FLOOR))
                outside = float(np.log(max(outside, LOG_FLOOR)))
            grid_map = sitk.GetImageFromArray(np.ascontiguousarray(channel))
            grid_map.CopyInformation(grid_reference)
            resampled = sitk.Resample(grid_map, scan, sitk.Transform(), sitk.sitkLinear, outside)
            total += sitk.GetArrayViewFromImage(resampled)  # a view: `resampled` still alive
        better = total > best
        best[better] = total[better]
        labels[better] = index
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(scan)
    return result


def labels_to_scan(grid_labels: sitk.Image, scan: sitk.Image) -> sitk.Image:
    """Class indices on the grid -> the scan's geometry by nearest neighbour (uint8)."""
    return sitk.Resample(grid_labels, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def atomic_write_image(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write an image atomically (see atomic.atomic_path): never a half-written file."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def atomic_write_text(text: str, path: Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def case_key(files: CaseFiles, settings: PreprocessingConfig, lookup: dict[int, int]) -> str:
    """Hash of everything a preprocessed case depends on: inputs (size, mtime) and settings."""
    used = {k: v for k, v in settings.__dict__.items() if k != "workers"}  # workers: same output
    parts: list[object] = [PREPROCESSING_VERSION, repr(used), sorted(lookup.items())]
    for path in (files.image_path, files.mask_path):
        if path is not None:
            stat = path.stat()
            parts += [str(path), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _vector(values) -> str:
    return " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values)


def preprocess_case(
    files: CaseFiles,
    out_dir: Path,
    settings: PreprocessingConfig,
    lookup: dict[int, int],
) -> dict[str, object]:
    """Preprocess one case into out_dir/images and out_dir/masks; return its manifest row.

    Reuses the outputs of an earlier run when its record (out_dir/records/<case>.json) has
    the same key. Never raises for a bad case: the row has status "skipped" and the reason.
    """
    row: dict[str, object] = {
        "case_id": files.case_id,
        "patient_id": files.patient_id,
        "sequence": files.sequence,
        "status": "skipped",
        "reason": "",
        "image_path": str(files.image_path),
        "mask_path": "" if files.mask_path is None else str(files.mask_path),
    }
    out_image = out_dir / "images" / f"{files.case_id}.mha"
    out_mask = out_dir / "masks" / f"{files.case_id}.mha"
    record = out_dir / "records" / f"{files.case_id}.json"
    try:
        key = case_key(files, settings, lookup)
        if record.is_file() and out_image.is_file():
            previous = json.loads(record.read_text(encoding="utf-8"))
            has_mask = files.mask_path is None or out_mask.is_file()
            if previous.get("key") == key and has_mask:
                return previous["row"] | {"reused": True}
        scan, image, labels = load_case(files, lookup)
        grid = to_grid(image, labels, settings)
        atomic_write_image(grid.image, out_image)
        if grid.mask is not None:
            atomic_write_image(grid.mask, out_mask)
        present = [] if labels is None else np.unique(sitk.GetArrayViewFromImage(labels))
        row |= {
            "status": "ok",
            "out_image": out_image.relative_to(out_dir).as_posix(),  # the folder can move
            "out_mask": "" if grid.mask is None else out_mask.relative_to(out_dir).as_posix(),
            "original_size": _vector(scan.GetSize()),
            "original_spacing": _vector(scan.GetSpacing()),
            "original_origin": _vector(scan.GetOrigin()),
            "original_direction": _vector(scan.GetDirection()),
            "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
                scan.GetDirection()
            ),
            "crop_index": _vector(grid.crop_index),
            "crop_size": _vector(grid.crop_size),
            "crop_widened": grid.crop_widened,
            "labels_present": _vector(int(v) for v in present),
        }
        atomic_write_text(json.dumps({"key": key, "row": row}), record)
    except CaseError as err:
        row["reason"] = str(err)
    except (OSError, RuntimeError, ValueError, MemoryError) as err:
        row["reason"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return row | {"reused": False}
