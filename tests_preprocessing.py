"""Preprocessing values derived from the inputs' own statistics and geometry: normalisation
by numpy on the known body voxels, the grid's physical placement from the scan's corners."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from config import PreprocessingConfig
from synthetic_spine import PIR_DIRECTION
from vertebraeseg import grid_to_scan, labels_to_scan, normalise, predictions_to_scan, to_grid

CLIP = (0.5, 99.5)
PADDING = -1000.0


def _scan_with_a_body(seed: int = 0) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """(image, body voxels, padding voxels): air 5-15, a body ~N(800, 60) with a few
    saturated voxels, and a padded border of -1000, as LPS SPIDER series have."""
    rng = np.random.default_rng(seed)
    array = rng.uniform(5, 15, (12, 40, 30)).astype(np.float32)
    body = np.zeros(array.shape, bool)
    body[2:10, 8:32, 6:24] = True
    array[body] = np.maximum(rng.normal(800, 60, int(body.sum())), 500)  # far from the air
    array[5, 20, 10:14] = 3096.0  # saturation: clipped away
    padding = np.zeros(array.shape, bool)
    padding[:, :3, :] = True
    array[padding] = PADDING
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 3.5))
    return image, body, padding


def test_zscore_gives_the_body_zero_mean_and_unit_standard_deviation():
    image, body, padding = _scan_with_a_body()
    raw = sitk.GetArrayFromImage(image)
    low, high = np.percentile(raw[~padding], CLIP)  # padding is in no statistic
    clipped = np.clip(raw, low, high)
    mean, std = clipped[body].mean(), clipped[body].std()
    out = sitk.GetArrayFromImage(normalise(image, "zscore", CLIP, PADDING))
    assert out[body].mean() == pytest.approx(0.0, abs=1e-3)
    assert out[body].std() == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(out[~padding], (clipped[~padding] - mean) / std, atol=1e-3)
    np.testing.assert_allclose(out[padding], (low - mean) / std, atol=1e-3)
    assert out.max() == pytest.approx((high - mean) / std, abs=1e-3)  # 3096 clipped at high


def test_minmax_maps_the_clip_range_to_zero_one():
    image, _, padding = _scan_with_a_body(1)
    raw = sitk.GetArrayFromImage(image)
    low, high = np.percentile(raw[~padding], CLIP)
    result = normalise(image, "minmax", CLIP, PADDING)
    out = sitk.GetArrayFromImage(result)
    np.testing.assert_allclose(out, (np.clip(raw, low, high) - low) / (high - low), atol=1e-5)
    assert out[padding].max() == 0.0 and out.max() == pytest.approx(1.0)
    assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()


def _pir_scan(size=(40, 60, 10), spacing=(0.7, 0.6, 3.3), origin=(12.0, -30.0, 55.0)):
    """A PIR scan of noise (any content: the tests here are about geometry)."""
    noise = np.random.default_rng(0).normal(500, 100, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(noise)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(PIR_DIRECTION)
    return image


def test_the_grid_covers_the_scan_edge_to_edge():
    """Uncropped, the grid's first voxel centre lies half a grid voxel inside the scan's first
    voxel corner, along each axis, and its last voxel half a grid voxel inside the far corner."""
    scan = _pir_scan()
    grid = (24, 16, 5)  # (height = y, width = x, slices = z)
    case = to_grid(scan, None, PreprocessingConfig(grid=grid, crop=False))
    image = case.image
    assert image.GetSize() == (16, 24, 5) and image.GetDirection() == scan.GetDirection()
    ratio = np.array(scan.GetSize()) / np.array(image.GetSize())  # scan voxels per grid voxel
    assert image.GetSpacing() == pytest.approx(tuple(np.array(scan.GetSpacing()) * ratio))
    first = scan.TransformContinuousIndexToPhysicalPoint(tuple(-0.5 + ratio / 2))
    last_index = np.array(scan.GetSize()) - 0.5 - ratio / 2
    last = scan.TransformContinuousIndexToPhysicalPoint(tuple(last_index))
    assert image.GetOrigin() == pytest.approx(first, abs=1e-6)
    far = image.TransformIndexToPhysicalPoint(tuple(int(v) - 1 for v in image.GetSize()))
    assert far == pytest.approx(last, abs=1e-6)


def _ball(scan: sitk.Image, centre_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    """(z, y, x) bool array of the scan's voxels whose centres lie within the ball."""
    size = scan.GetSize()
    points = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    origin = np.array(scan.GetOrigin())
    matrix = np.array(scan.GetDirection()).reshape(3, 3) * np.array(scan.GetSpacing())
    physical = origin + points @ matrix.T
    inside = np.linalg.norm(physical - centre_mm, axis=1) <= radius_mm
    return inside.reshape(size).transpose(2, 1, 0)


def _centroid_mm(mask: np.ndarray, scan: sitk.Image) -> np.ndarray:
    z, y, x = np.nonzero(mask)
    index = np.stack([x, y, z], axis=1).mean(axis=0)
    return np.array(scan.TransformContinuousIndexToPhysicalPoint(tuple(index)))


@pytest.mark.parametrize("way_back", ["probabilities", "labels"])
def test_a_ball_goes_to_the_grid_and_back_in_place(way_back):
    """A ball's class mask to a coarser grid and back (linear one-hot probabilities, or
    nearest-neighbour labels): it comes back where it was (centroid within a fraction of a
    grid voxel; a grid placed half a voxel off would move it by half a voxel) and nearly
    whole; the probabilities way is the closer one."""
    scan = _pir_scan(size=(60, 80, 12))
    centre = np.array(scan.TransformContinuousIndexToPhysicalPoint((28.3, 41.7, 6.2)))
    ball = _ball(scan, centre, 14.0)
    labels = sitk.GetImageFromArray(ball.astype(np.uint8))
    labels.CopyInformation(scan)
    case = to_grid(scan, labels, PreprocessingConfig(grid=(40, 32, 8), crop=False))
    grid_mask = sitk.GetArrayFromImage(case.mask)
    if way_back == "probabilities":
        probabilities = np.stack([grid_mask == 0, grid_mask == 1]).astype(np.float32)
        back = sitk.GetArrayFromImage(grid_to_scan(probabilities, case.image, scan))
        floor, fraction = 0.93, 0.1
    else:
        back = sitk.GetArrayFromImage(labels_to_scan(case.mask, scan))
        floor, fraction = 0.88, 0.25
    dice = 2 * np.logical_and(back == 1, ball).sum() / ((back == 1).sum() + ball.sum())
    assert dice >= floor
    shift = np.abs(_centroid_mm(back == 1, scan) - _centroid_mm(ball, scan))  # LPS, mm
    direction = np.abs(np.array(scan.GetDirection()).reshape(3, 3))
    grid_voxel = direction @ np.array(case.image.GetSpacing())  # along L-R, A-P, S-I
    assert (shift < fraction * grid_voxel).all(), (shift, grid_voxel)


def test_zscore_holds_for_any_intensity_scale_and_bad_images_are_named():
    """The same image scaled to 0..1 (a standard deviation below 1) normalises the same; NaN,
    constant and all-padding images raise CaseError with the reason."""
    from vertebraeseg import CaseError

    image, body, padding = _scan_with_a_body()
    small = sitk.Cast(image, sitk.sitkFloat32) / 1000.0  # padding becomes -1
    out = sitk.GetArrayFromImage(normalise(small, "zscore", CLIP, -1.0))
    assert out[body].std() == pytest.approx(1.0, rel=1e-3)
    reference = sitk.GetArrayFromImage(normalise(image, "zscore", CLIP, PADDING))
    np.testing.assert_allclose(out, reference, atol=1e-3)
    array = sitk.GetArrayFromImage(image)
    array[0, 5, 5] = np.nan
    with pytest.raises(CaseError, match="image holds 1 NaN/inf intensities"):
        normalise(sitk.GetImageFromArray(array), "zscore", CLIP, PADDING)
    with pytest.raises(CaseError, match="image is constant"):
        normalise(sitk.GetImageFromArray(np.full((4, 5, 6), 7.0)), "minmax", CLIP, PADDING)
    with pytest.raises(CaseError, match="every voxel is padding"):
        normalise(sitk.GetImageFromArray(np.full((4, 5, 6), -1000.0)), "zscore", CLIP, PADDING)


def test_a_shifted_grid_moves_by_its_phase_in_grid_voxels():
    from vertebraeseg import grid_geometry

    scan = _pir_scan(size=(40, 60, 10), spacing=(0.7, 0.6, 3.3))
    size, spacing, origin = grid_geometry(scan, (24, 16, 5))
    phase = (0.5, 0.25, 0.0)
    _, same_spacing, moved = grid_geometry(scan, (24, 16, 5), phase)
    direction = np.array(scan.GetDirection()).reshape(3, 3)
    expected = np.array(origin) + direction @ (np.array(phase) * np.array(spacing))
    assert same_spacing == spacing and np.allclose(moved, expected)


def test_the_way_back_gives_uint8_classes_background_outside_and_ties_to_the_lower_class():
    """Probabilities on a grid that covers part of the scan: the rest is background; where two
    classes tie, the lower one wins (as numpy's argmax)."""
    grid = sitk.Image((4, 4, 2), sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.0))
    grid.SetOrigin((0.5, 0.5, 0.5))  # covers scan voxels 0-7 in x and y, 0-3 in z
    scan = sitk.Image((8, 8, 6), sitk.sitkFloat32)  # z 4-5 lie beyond the grid
    probabilities = np.zeros((3, 2, 4, 4), np.float32)
    probabilities[2] = 1.0  # class 2 everywhere on the grid ...
    probabilities[:, :, :, :2] = 0.0
    probabilities[1, :, :, :2] = 0.5  # ... but a tie of classes 0 and 1 in x < 4
    probabilities[0, :, :, :2] = 0.5
    labels = predictions_to_scan([(probabilities, grid)], scan)
    array = sitk.GetArrayFromImage(labels)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert (array[4:] == 0).all()  # beyond the grid: background
    assert (array[:4, :, 5:] == 2).all() and (array[:4, :, :3] == 0).all()
    # two grids' probabilities are summed per class before the arg-max (tta_shift's way)
    sure = np.zeros_like(probabilities)
    sure[1] = 1.0  # the first grid: class 1 everywhere
    leaning = np.zeros_like(probabilities)
    leaning[1], leaning[2] = 0.4, 0.6  # the second: class 2, barely
    both = sitk.GetArrayFromImage(predictions_to_scan([(sure, grid), (leaning, grid)], scan))
    assert (both[:4] == 1).all()
