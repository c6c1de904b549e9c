"""Planning for the spacing mode: one target spacing for every case, and the training patch size.

In `[preprocessing] mode = spacing` every body crop is resampled to one physical spacing (its
size follows), the network trains on patches (patches.py) and predicts by sliding window. This
module decides the two numbers the plan records, from the data, as nnU-Net's planner does:

- target spacing (mm, order S-I, A-P, slices = PIR's y, x, z): the median spacing per axis over
  the cases. When the coarsest axis is more than 3x coarser than the others AND has fewer than
  a third of the voxels of the smallest other axis (a stack of thick slices), that axis takes
  the 10th percentile of its spacings instead (but never finer than the other axes): resampling
  thick slices to the median would invent detail, and to a finer spacing would cost memory.
- patch size (voxels, same order): the median resampled case size, rounded up to a multiple of
  2^(depth-1), then shrunk one step of 2^(depth-1) at a time, each time on the axis that stays
  largest relative to that median after the step (nnU-Net shrinks the largest one before the
  step, which halves a 16-slice axis early), until the patch holds at most `max_voxels`.
Spacings are read from the file headers only (no pixel data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertebraeseg import CANONICAL

ANISOTROPY_RATIO = 3.0  # nnU-Net's rule: a spacing 3x coarser than the others is anisotropic
PATCH_VOXELS = 160 * 160 * 16  # default budget: fits a 2-core CPU step and a small GPU


def pir_spacing_and_size(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(spacing mm, size voxels) of a scan after reorientation to PIR, both in the order
    S-I, A-P, slices, read from the header. Raises RuntimeError for an unreadable file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    direction = np.array(reader.GetDirection()).reshape(3, 3)  # columns: axis directions, LPS
    spacing, size = np.array(reader.GetSpacing()), np.array(reader.GetSize())
    target = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(CANONICAL)
    target = np.array(target).reshape(3, 3)
    # for each PIR axis (x=P, y=I, z=R) the file axis most parallel to it
    source = [int(np.argmax(np.abs(direction.T @ target[:, axis]))) for axis in range(3)]
    order = [source[1], source[0], source[2]]  # S-I (y), A-P (x), slices (z)
    return spacing[order], size[order]


def auto_target_spacing(spacings: np.ndarray, sizes: np.ndarray) -> tuple[float, float, float]:
    """nnU-Net's full-resolution target spacing. spacings, sizes: (cases, 3) in mm / voxels,
    order S-I, A-P, slices. Returns three mm values in the same order."""
    spacings, sizes = np.asarray(spacings, float), np.asarray(sizes, float)
    if spacings.ndim != 2 or spacings.shape[1] != 3 or len(spacings) == 0:
        raise ValueError(f"expected (cases, 3) spacings, got shape {spacings.shape}")
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(sizes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    anisotropic_spacing = target[worst] > ANISOTROPY_RATIO * max(target[others])
    few_voxels = median_size[worst] * ANISOTROPY_RATIO < min(median_size[others])
    if anisotropic_spacing and few_voxels:
        coarse = np.percentile(spacings[:, worst], 10)
        target[worst] = max(coarse, max(target[others]) + 1e-5)
    return tuple(float(v) for v in target)  # type: ignore[return-value]


def auto_patch_size(
    median_size: tuple[int, int, int],
    multiple: tuple[int, int, int],
    max_voxels: int = PATCH_VOXELS,
) -> tuple[int, int, int]:
    """Patch (S-I, A-P, slices) for cases of `median_size` voxels: every axis a positive
    multiple of its `multiple` (ModelConfig.size_multiple), at most the median size rounded up,
    at most max_voxels in all."""
    factor = np.asarray(multiple)
    median = np.maximum(np.asarray(median_size, float), 1)
    patch = (np.ceil(median / factor) * factor).astype(int)
    while patch.prod() > max_voxels and (patch > factor).any():
        # shrink the axis that stays largest relative to the median after one step, so that a
        # short axis (a few slices) is not halved while long ones keep most of their size
        after = np.where(patch > factor, (patch - factor) / median, -np.inf)
        k = int(np.argmax(after))
        patch[k] -= factor[k]
    return tuple(int(v) for v in patch)  # type: ignore[return-value]


def format_spacing(spacing: tuple[float, ...]) -> str:
    """(0.9, 0.47, 0.47) -> '0.9, 0.47, 0.47': the [preprocessing] target_spacing text."""
    return ", ".join(f"{v:.6g}" for v in spacing)
