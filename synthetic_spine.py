"""Synthetic SPIDER-format lumbar spine MR data: the project's built-in demo set.

A deterministic generator of sagittal lumbar spine scans with T1 and T2 contrast and a
SPIDER-style semantic/instance mask, used when no real data is available and by the tests.

Geometry. Every patient is built in the canonical PIR orientation: the numpy array has shape
(z, y, x) = (sagittal slices, rows, columns); x points to the patient's Posterior, y to Inferior,
z to the patient's Right. As a SimpleITK image that is size (x, y, z) with direction
``PIR_DIRECTION`` (row-major 3x3 matrix whose columns are the axis directions in LPS). Anatomy
is modelled in millimetres relative to the field of view: u = x * spacing_x (mm posterior of the
first column), v = y * spacing_y (mm inferior of the first row) and lat (mm to the patient's right
of the spine's mid-sagittal plane), then rasterised at the voxel centres.

Mask values (SPIDER numbering): 0 background; 1..n vertebrae counted from the bottom (1 = L5,
posterior elements included); 100 + n for the topmost vertebra when less than 70 % of it is in
the field of view; 100 spinal canal; 200 + k the disc directly below vertebra k (201 = L5/S1).
The sacrum is bone without a label.

Intensities are float32 in 0..3096 (SPIDER-like), with -1000 as padding outside the body in
about a third of the patients.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

SEQUENCES = ("t1", "t2")
ORIENTATIONS = ("LPS", "PIR")

PIR_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
CANAL_LABEL = 100
PARTIAL_VERTEBRA_OFFSET = 100
DISC_OFFSET = 200
PARTIAL_VISIBLE_FRACTION = 0.7
PADDING_VALUE = -1000.0
MAX_INTENSITY = 3096.0
SMALL_MAX_VOXELS = 150_000
N_LABEL_VALUES = 226  # label values 0..225

# Tissue classes of the intensity model (indices into the tables below).
AIR, FAT, MUSCLE, VISCERA, VESSEL, BONE, DISC, CSF = range(8)

# Nominal intensity per tissue class; DISC is the annulus, the nucleus is _NUCLEUS_INTENSITY.
_TISSUE_INTENSITY = {
    "t1": np.array([0, 1050, 700, 820, 160, 1400, 560, 300], dtype=np.float32),
    "t2": np.array([0, 850, 560, 720, 130, 800, 620, 2300], dtype=np.float32),
}
_NUCLEUS_INTENSITY = {"t1": 660.0, "t2": 1600.0}
# Relative amplitude of the smooth tissue texture per tissue class.
_TEXTURE_AMPLITUDE = np.array([0, 0.06, 0.10, 0.20, 0.05, 0.08, 0.04, 0.03], dtype=np.float32)
# Exponent of the rounded-rectangle cross-section of vertebral bodies and discs.
_BODY_POWER = 2.5


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates in mm: u (nx,) posterior, v (ny,) inferior, lat (nz,) right."""

    u: np.ndarray
    v: np.ndarray
    lat: np.ndarray


@dataclass(frozen=True)
class _Frame:
    """A rigid in-plane frame at (u, v) mm, tilted by slope = du/dh (AP drift per mm upwards).

    Local axis a points down the spine (inferior), axis n points posterior, both in mm.
    """

    u: float
    v: float
    slope: float

    def local(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, n) local coordinates of the points (u, v)."""
        norm = np.hypot(1.0, self.slope)
        du, dv = u - self.u, v - self.v
        return (dv - self.slope * du) / norm, (du + self.slope * dv) / norm

    def moved(self, a: float, n: float, angle: float = 0.0) -> _Frame:
        """The frame moved to local (a, n) and rotated by angle (radians; >0 tips n downwards)."""
        norm = np.hypot(1.0, self.slope)
        return _Frame(
            u=self.u + (n - self.slope * a) / norm,
            v=self.v + (a + self.slope * n) / norm,
            slope=float(np.tan(np.arctan(self.slope) + angle)),
        )


@dataclass(frozen=True)
class _Body:
    """A vertebral body (or the S1 body): rounded box with concave endplates, sizes in mm."""

    frame: _Frame
    height: float
    depth: float
    width: float
    concavity: float

    def cross_r2(self, n: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Squared normalised radius of the cross-section (1 on the body's outline)."""
        p = _BODY_POWER
        return (np.abs(2 * n / self.depth) ** p + np.abs(2 * lat / self.width) ** p) ** (2 / p)

    def half_height(self, r2: np.ndarray) -> np.ndarray:
        """Distance from the body centre to its endplates at squared normalised radius r2."""
        return self.height / 2 - self.concavity * (1 - np.minimum(r2, 1.0))


@dataclass(frozen=True)
class _Curve:
    """The centre line of the vertebral bodies, tabulated over height h (mm above S1).

    u: AP position (mm, grid coordinates once shifted), slope: du/dh, arc: arc length from h=0.
    """

    h: np.ndarray
    u: np.ndarray
    slope: np.ndarray
    arc: np.ndarray

    def height_at_arc(self, s: float) -> float:
        return float(np.interp(s, self.arc, self.h))

    def frame(self, h: float, h_top: float, tilt: float = 0.0) -> _Frame:
        """Frame on the curve at height h (the row v = h_top - h), tilted by an extra angle."""
        slope = float(np.interp(h, self.h, self.slope))
        return _Frame(
            u=float(np.interp(h, self.h, self.u)),
            v=h_top - h,
            slope=float(np.tan(np.arctan(slope) + tilt)),
        )


def _lordotic_curve(rng: np.random.Generator, scale: float) -> _Curve:
    """A random lordotic centre line.

    Going up from the sacrum the spine first runs anteriorly (L5 tilted 15-30 degrees), then
    bends back (upper lumbar leaning posteriorly); just below the S1 endplate the sacrum tilts
    further back.
    """
    slope_bottom = rng.uniform(-0.7, -0.35)
    slope_top = rng.uniform(0.05, 0.3)
    centre = rng.uniform(60.0, 110.0) * scale
    width = rng.uniform(35.0, 60.0) * scale
    sacral_tilt = rng.uniform(0.15, 0.35)
    h = np.arange(-200.0, 600.0, 0.25)
    slope = slope_top + (slope_bottom - slope_top) / (1 + np.exp((h - centre) / width))
    slope = np.tan(np.arctan(slope) - sacral_tilt * np.clip(-h / (15.0 * scale), 0, 1))
    u = np.cumsum(slope) * 0.25
    u -= np.interp(0.0, h, u)
    arc = np.cumsum(np.hypot(1.0, slope)) * 0.25
    arc -= np.interp(0.0, h, arc)
    return _Curve(h=h, u=u, slope=slope, arc=arc)


def _index_range(coords: np.ndarray, low: float, high: float) -> slice:
    """Slice of the sorted coordinates that lie within [low, high]."""
    return slice(
        int(np.searchsorted(coords, low, side="left")),
        int(np.searchsorted(coords, high, side="right")),
    )


def _window(
    grid: _Grid, frame: _Frame, radius: float, lat0: float = 0.0, half_lat: float = np.inf
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]:
    """Box around a frame origin: (region, a, n, lat), a and n (ny', nx'), lat (nz', 1, 1)."""
    zs = _index_range(grid.lat, lat0 - half_lat, lat0 + half_lat)
    ys = _index_range(grid.v, frame.v - radius, frame.v + radius)
    xs = _index_range(grid.u, frame.u - radius, frame.u + radius)
    a, n = frame.local(grid.u[None, xs], grid.v[ys, None])
    return (zs, ys, xs), a, n, grid.lat[zs, None, None]


def _superellipsoid(
    grid: _Grid,
    frame: _Frame,
    half: tuple[float, float, float],
    power: float,
    lat0: float = 0.0,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Region and mask of |a/ha|^p + |n/hn|^p + |(lat-lat0)/hl|^p <= 1 around a frame."""
    half_a, half_n, half_lat = half
    region, a, n, lat = _window(grid, frame, np.hypot(half_a, half_n), lat0, half_lat)
    in_plane = np.abs(a / half_a) ** power + np.abs(n / half_n) ** power
    return region, in_plane[None] + np.abs((lat - lat0) / half_lat) ** power <= 1


def _body_mask(grid: _Grid, body: _Body) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Region and mask of a vertebral body with a slight waist and concave endplates."""
    region, a, n, lat = _window(grid, body.frame, np.hypot(body.height, body.depth) / 2)
    waist = 1 - 0.06 * (1 - np.minimum((2 * a / body.height) ** 2, 1.0))
    r2 = body.cross_r2(n[None], lat) / waist[None] ** 2
    return region, (np.abs(a[None]) / body.half_height(r2)) ** 6 + r2**3 <= 1


def _disc_mask(
    grid: _Grid, upper: _Body, lower: _Body
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Region, mask and nucleus weight (0..1) of the disc filling the gap between two bodies."""
    top = upper.frame.moved(upper.height / 2, 0.0)
    bottom = lower.frame.moved(-lower.height / 2, 0.0)
    middle = _Frame((top.u + bottom.u) / 2, (top.v + bottom.v) / 2, (top.slope + bottom.slope) / 2)
    gap = float(np.hypot(top.u - bottom.u, top.v - bottom.v))
    depth = (upper.depth + lower.depth) / 2 + 2.0
    width = (upper.width + lower.width) / 2 + 2.0
    region, a, n, lat = _window(grid, middle, np.hypot(gap + 6.0, depth / 2))
    a_up, n_up = upper.frame.local(grid.u[None, region[2]], grid.v[region[1], None])
    a_lo, n_lo = lower.frame.local(grid.u[None, region[2]], grid.v[region[1], None])
    below_upper = a_up[None] >= upper.half_height(upper.cross_r2(n_up[None], lat)) - 0.3
    above_lower = a_lo[None] <= 0.3 - lower.half_height(lower.cross_r2(n_lo[None], lat))
    p = _BODY_POWER
    cross = np.abs(2 * n[None] / depth) ** p + np.abs(2 * lat / width) ** p
    mask = below_upper & above_lower & (cross <= 1) & (np.abs(a[None]) <= gap)
    core = (
        (a[None] / (0.35 * gap)) ** 2
        + ((n[None] - 0.08 * depth) / (0.3 * depth)) ** 2
        + (lat / (0.3 * width)) ** 2
    )
    return region, mask, np.clip(2 * (1 - core), 0, 1).astype(np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple, sigma_mm: float
) -> np.ndarray:
    """Smooth gaussian random field (float32 array of shape (nz, ny, nx)), unit std."""
    noise = sitk.GetImageFromArray(rng.standard_normal(shape, dtype=np.float32))
    noise.SetSpacing(spacing)
    field = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma_mm))
    return field / max(float(field.std()), 1e-6)


def _blur(array: np.ndarray, spacing: tuple, sigma_mm: tuple[float, float, float]) -> np.ndarray:
    """Gaussian blur with per-axis sigma in mm (x, y, z); returns float32 (nz, ny, nx)."""
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.SetSpacing(spacing)
    blurred = sitk.DiscreteGaussian(image, [s * s for s in sigma_mm], 32, 0.01, True)
    return sitk.GetArrayFromImage(blurred)


def _draw_grid(
    rng: np.random.Generator, fov_si: float, fov_ap: float, small: bool
) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Random spacing (x, y, z) mm and array shape (nz, ny, nx) covering the field of view."""
    if small:
        in_plane = rng.uniform(1.6, 2.0)
        spacing_z = rng.uniform(4.0, 5.0)
        nz = int(rng.integers(12, 17))
        # Keep small cases small: coarsen the in-plane spacing if the voxel budget is exceeded.
        in_plane = max(in_plane, np.sqrt(fov_si * fov_ap * nz / SMALL_MAX_VOXELS))
    else:
        in_plane = rng.uniform(0.5, 0.9)
        spacing_z = rng.uniform(3.0, 5.0)
        nz = int(rng.integers(12, 25))
    spacing_x = round(float(in_plane), 4)
    spacing_y = round(float(in_plane * rng.uniform(0.97, 1.03)), 4)
    spacing = (spacing_x, spacing_y, round(float(spacing_z), 4))
    shape = (nz, int(np.ceil(fov_si / spacing_y)), int(np.ceil(fov_ap / spacing_x)))
    return spacing, shape


@dataclass(frozen=True)
class _Spine:
    """Per-patient spine dimensions in mm; arrays are per vertebra, index 0 = L5 (label 1)."""

    scale: float
    heights: np.ndarray
    discs: np.ndarray  # disc k + 1 lies below vertebra k + 1
    depths: np.ndarray
    widths: np.ndarray
    canal_ap: float
    canal_width: float
    spinous_length: float
    visible_top: float  # fraction of the topmost vertebra's height inside the field of view

    @property
    def count(self) -> int:
        return len(self.heights)

    @property
    def depth(self) -> float:
        return float(self.depths.mean())

    @property
    def canal_front(self) -> float:
        """Normal offset of the canal's anterior wall from the body centre line."""
        return self.depth / 2 + 1.5 * self.scale

    @property
    def canal_back(self) -> float:
        return self.canal_front + self.canal_ap

    @property
    def spinous_tip(self) -> float:
        return self.canal_back + 1 + 6 * self.scale + self.spinous_length


def _draw_spine(rng: np.random.Generator) -> _Spine:
    """5-9 vertebrae, shrinking towards the top, scaled to fit a field of view of <= ~300 mm."""
    count = int(rng.integers(5, 10))
    grade = np.arange(count)
    heights = rng.uniform(26, 30) * (1 - 0.025 * grade) * rng.uniform(0.96, 1.04, count)
    discs = rng.uniform(9, 12) * (1 - 0.05 * grade) * rng.uniform(0.9, 1.1, count)
    scale_high = min(1.15, 265.0 / (0.97 * float(heights.sum() + discs.sum())))
    scale = rng.uniform(min(0.85, scale_high), scale_high)
    return _Spine(
        scale=scale,
        heights=scale * heights,
        discs=scale * discs,
        depths=scale * rng.uniform(30, 35) * rng.uniform(0.97, 1.03, count),
        widths=scale * rng.uniform(40, 50) * (1 - 0.015 * grade) * rng.uniform(0.97, 1.03, count),
        canal_ap=scale * rng.uniform(12, 16),
        canal_width=scale * rng.uniform(15, 20),
        spinous_length=scale * rng.uniform(22, 30),
        visible_top=rng.uniform(0.3, 0.65) if rng.random() < 0.35 else rng.uniform(0.75, 0.97),
    )


def _vertebra_parts(
    grid: _Grid, body: _Body, spine: _Spine, rng: np.random.Generator
) -> list[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """(region, mask) of the body, pedicles, transverse and articular processes, lamina and
    spinous process of one vertebra."""
    scale = spine.scale
    pedicle_width, pedicle_height, lamina_thickness = 8 * scale, 14 * scale, 6 * scale
    arch = 0.18 * body.height  # the arch leaves the upper part of the body
    pedicle_start = body.depth / 2 - 4 * scale
    pedicle_end = spine.canal_back + 1
    pedicle = body.frame.moved(-arch, (pedicle_start + pedicle_end) / 2)
    pedicle_half = (pedicle_height / 2, (pedicle_end - pedicle_start) / 2, pedicle_width / 2)
    transverse = body.frame.moved(-arch, (spine.canal_front + spine.canal_back) / 2)
    transverse_half = (5 * scale, 4 * scale, rng.uniform(10, 14) * scale)
    articular = body.frame.moved(0.3 * body.height - arch, spine.canal_back + 2 * scale)
    articular_half = (0.45 * body.height, 5 * scale, pedicle_width / 2 + scale)
    parts = [_body_mask(grid, body)]
    for side in (-1.0, 1.0):
        pedicle_lat = side * (spine.canal_width + pedicle_width + 1) / 2
        transverse_lat = side * (
            spine.canal_width / 2 + pedicle_width + transverse_half[2] - 2 * scale
        )
        parts.append(_superellipsoid(grid, pedicle, pedicle_half, 2.5, pedicle_lat))
        parts.append(_superellipsoid(grid, transverse, transverse_half, 2.5, transverse_lat))
        parts.append(_superellipsoid(grid, articular, articular_half, 2.5, pedicle_lat))
    lamina = body.frame.moved(
        5 * scale - arch, pedicle_end + lamina_thickness / 2, rng.uniform(0.25, 0.45)
    )
    lamina_half = (10 * scale, lamina_thickness / 2, spine.canal_width / 2 + pedicle_width)
    parts.append(_superellipsoid(grid, lamina, lamina_half, 4.0))
    spinous = lamina.moved(0.0, spine.spinous_length / 2, -0.1)
    spinous_half = (8 * scale, (spine.spinous_length + lamina_thickness) / 2, 5 * scale)
    parts.append(_superellipsoid(grid, spinous, spinous_half, 3.0))
    return parts


def _sacrum_parts(
    grid: _Grid, s1: _Body, spine: _Spine
) -> list[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """(region, mask) of the S1 body, the sacral mass below it and the plate behind the canal."""
    scale = spine.scale
    mass = s1.frame.moved(s1.height / 2 + 35 * scale, 0.12 * spine.depth)
    plate = s1.frame.moved(0.0, spine.canal_back + 5 * scale)
    return [
        _body_mask(grid, s1),
        _superellipsoid(grid, mass, (45 * scale, 0.42 * spine.depth, s1.width / 2), 2.5),
        _superellipsoid(grid, plate, (35 * scale, 5 * scale, 18 * scale), 4.0),
    ]


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth multiplicative receive-coil bias, 1 +- 20-30 %, brighter posteriorly (nz,ny,nx)."""
    nz, ny, nx = shape
    z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
    c = rng.normal(size=6).astype(np.float32)
    c[0] = abs(c[0]) + 0.5
    poly = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x**2 + c[4] * y**2 + c[5] * z**2
    poly = poly - poly.mean()
    return 1 + rng.uniform(0.2, 0.3) * poly / max(float(np.abs(poly).max()), 1e-6)


@dataclass(frozen=True)
class _Anatomy:
    """The rasterised patient, arrays (nz, ny, nx): tissue class, label, nucleus weight (0..1),
    smooth texture (unit std), cortical rim weight (0..1); hydration per label value."""

    tissue: np.ndarray
    labels: np.ndarray
    nucleus: np.ndarray
    texture: np.ndarray
    cortex: np.ndarray
    hydration: np.ndarray
    spacing: tuple[float, float, float]


def _render(rng: np.random.Generator, sequence: str, anatomy: _Anatomy) -> np.ndarray:
    """One MR contrast of the anatomy: float32 (nz, ny, nx), values 0..MAX_INTENSITY."""
    nominal = _TISSUE_INTENSITY[sequence]
    table = (nominal * rng.uniform(0.92, 1.08, len(nominal))).astype(np.float32)
    marrow_gain = np.ones(N_LABEL_VALUES, dtype=np.float32)
    marrow_gain[1:DISC_OFFSET] = rng.uniform(0.92, 1.08, DISC_OFFSET - 1)
    marrow_gain[CANAL_LABEL] = 1.0
    nucleus_gain = (_NUCLEUS_INTENSITY[sequence] - table[DISC]) * anatomy.hydration

    image = table[anatomy.tissue]
    image *= 1 + _TEXTURE_AMPLITUDE[anatomy.tissue] * anatomy.texture
    image *= marrow_gain[anatomy.labels]
    image += anatomy.nucleus * nucleus_gain[anatomy.labels]
    image *= 1 - 0.6 * anatomy.cortex
    image = _blur(image, anatomy.spacing, (0.5, 0.5, 0.8))
    image *= _bias_field(rng, image.shape)
    # Rician noise: magnitude of complex gaussian noise, sigma 2-3.5 % of the fat signal
    sigma = rng.uniform(0.02, 0.035) * float(table[FAT])
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.minimum(np.hypot(real, imaginary), MAX_INTENSITY).astype(np.float32)


def synth_patient(
    rng: np.random.Generator, small: bool = False
) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """One synthetic patient in canonical PIR orientation.

    Returns ({'t1': image, 't2': image}, mask): float32 SimpleITK images and one shared uint16
    mask, all with the same geometry: size (x, y, z) = (AP columns, SI rows, sagittal slices),
    i.e. numpy arrays (z, y, x); x -> posterior, y -> inferior, z -> patient's right; spacing in
    mm (in-plane 0.5-0.9, slices 3-5; small=True: in-plane 1.6-2.0, coarser where needed to stay
    under SMALL_MAX_VOXELS, slices 4-5); direction PIR_DIRECTION; origin in mm (LPS).
    """
    spine = _draw_spine(rng)
    scale, depth = spine.scale, spine.depth

    # --- the centre line, the arc-length span of every vertebra, the field of view
    curve = _lordotic_curve(rng, scale)
    bottoms = np.cumsum(spine.discs + spine.heights) - spine.heights
    h_top = curve.height_at_arc(bottoms[-1] + spine.visible_top * spine.heights[-1])
    sacrum_visible = float(np.clip(rng.uniform(220, 300) - h_top, 35, 90))
    fov_si = h_top + sacrum_visible

    # The back (skin, midline) follows the lordosis partly, 25-55 mm behind the spinous tips,
    # with 20-50 mm of air behind it; the field of view reaches 40-100 mm in front of the bodies.
    wiggle = 3.0 * np.sin(2 * np.pi * curve.h / rng.uniform(80, 160) + rng.uniform(0, 6.3))
    back_line = rng.uniform(0.3, 0.7) * curve.u + wiggle  # over curve.h
    visible_h = (curve.h >= -sacrum_visible) & (curve.h <= h_top)
    norm_visible = np.hypot(1.0, curve.slope[visible_h])
    spinous_tips = curve.u[visible_h] + spine.spinous_tip / norm_visible
    back_line += float(np.max(spinous_tips - back_line[visible_h])) + rng.uniform(25, 55)
    back_max = float(np.max(back_line[visible_h]))
    air_behind = rng.uniform(20, 50)
    front = float(np.min(curve.u[visible_h] - depth / 2 / norm_visible)) - rng.uniform(40, 100)
    fov_ap = float(np.clip(back_max + air_behind - front, 180, 250))
    shift = fov_ap - air_behind - back_max  # from curve coordinates to grid coordinates

    spacing, shape = _draw_grid(rng, fov_si, fov_ap, small)
    nz, ny, nx = shape
    grid = _Grid(
        u=np.arange(nx) * spacing[0],
        v=np.arange(ny) * spacing[1],
        lat=(np.arange(nz) - (nz - 1) / 2 + rng.uniform(-0.3, 0.3)) * spacing[2],
    )
    curve = _Curve(h=curve.h, u=curve.u + shift, slope=curve.slope, arc=curve.arc)

    # --- per row: height h, centre line position; per pixel: normal offset from the centre line
    h = h_top - grid.v
    u_curve = np.interp(h, curve.h, curve.u)
    norm = np.hypot(1.0, np.interp(h, curve.h, curve.slope))
    n_curve = (grid.u[None, :] - u_curve[:, None]) / norm[:, None]  # (ny, nx)
    lat = grid.lat[:, None, None]
    u = grid.u[None, None, :]

    # --- torso: soft tissue between abdomen and back, narrowing laterally; fat under the skin
    back = (np.interp(h, curve.h, back_line) + shift)[None, :, None]
    back = back - lat**2 / (2 * rng.uniform(70, 110))
    abdomen = (u_curve - depth / 2 - rng.uniform(40, 120))[None, :, None]
    abdomen = abdomen + lat**2 / (2 * rng.uniform(40, 70))
    torso = (u >= abdomen) & (u <= back)
    tissue = np.full(shape, AIR, dtype=np.uint8)
    tissue[torso] = VISCERA
    tissue[torso & (n_curve[None] > -depth / 2 - 12 * scale)] = MUSCLE
    fat = (u > back - rng.uniform(6, 25)) | (u < abdomen + rng.uniform(6, 15))
    tissue[torso & fat] = FAT
    labels = np.zeros(shape, dtype=np.uint16)
    nucleus = np.zeros(shape, dtype=np.float32)

    # --- aorta (flow void) in front of the bodies, left of the midline, above L4
    h_bifurcation = curve.height_at_arc(bottoms[1] + spine.heights[1] / 2)
    aorta_radius = rng.uniform(9, 12) * scale
    aorta_in_plane = ((n_curve + depth / 2 + 4 * scale + aorta_radius) / aorta_radius) ** 2
    aorta_in_plane[h < h_bifurcation] = np.inf
    aorta_lat = -rng.uniform(8, 15) * scale
    tissue[aorta_in_plane[None] + ((lat - aorta_lat) / aorta_radius) ** 2 <= 1] = VESSEL

    # --- bodies on the centre line: index 0 is S1 (sacrum, unlabelled), k = 1..n vertebra k
    s1_height = 28.0 * scale
    s1_frame = curve.frame(curve.height_at_arc(-s1_height / 2), h_top)
    bodies = [_Body(s1_frame, s1_height, spine.depths[0], 1.1 * spine.widths[0], 0.45 * scale)]
    for k in range(spine.count):
        centre = curve.height_at_arc(bottoms[k] + spine.heights[k] / 2)
        frame = curve.frame(centre, h_top, tilt=rng.uniform(-0.05, 0.05))
        bodies.append(_Body(frame, spine.heights[k], spine.depths[k], spine.widths[k], 1.5 * scale))
    for region, mask in _sacrum_parts(grid, bodies[0], spine):
        tissue[region][mask] = BONE

    # --- spinal canal: CSF tube behind the bodies in epidural fat, ending inside the sacrum
    h_end = -rng.uniform(20, 40) * scale
    ap_variation = 1 + 0.08 * np.sin(2 * np.pi * h / rng.uniform(35, 45) + rng.uniform(0, 6.3))
    ending = np.clip((h - h_end) / (8 * scale), 0, 1)[None, :, None]
    canal_in_plane = (n_curve - spine.canal_front - spine.canal_ap / 2) ** 2 / (
        spine.canal_ap / 2 * ap_variation[:, None]
    ) ** 2
    canal_radius2 = canal_in_plane[None] + (2 * lat / spine.canal_width) ** 2
    tissue[canal_radius2 <= 1.35**2 * ending] = FAT
    canal = canal_radius2 <= ending
    tissue[canal] = CSF
    labels[canal] = CANAL_LABEL

    # --- discs: disc 200 + k between vertebra k and the body below it (S1 for k = 1)
    hydration = np.zeros(N_LABEL_VALUES, dtype=np.float32)
    hydration[DISC_OFFSET + 1 : DISC_OFFSET + spine.count + 1] = np.where(
        rng.random(spine.count) < 0.25, rng.uniform(0.35, 0.6, spine.count), 1.0
    )
    for k in range(1, spine.count + 1):
        region, mask, weight = _disc_mask(grid, bodies[k], bodies[k - 1])
        tissue[region][mask] = DISC
        labels[region][mask] = DISC_OFFSET + k
        nucleus[region][mask] = weight[mask]

    # --- vertebrae last: bone wins over disc and canal
    for k in range(1, spine.count + 1):
        label = k
        if k == spine.count and spine.visible_top < PARTIAL_VISIBLE_FRACTION:
            label += PARTIAL_VERTEBRA_OFFSET
        for region, mask in _vertebra_parts(grid, bodies[k], spine, rng):
            tissue[region][mask] = BONE
            labels[region][mask] = label

    bone = (tissue == BONE).astype(np.float32)
    anatomy = _Anatomy(
        tissue=tissue,
        labels=labels,
        nucleus=nucleus,
        texture=_smooth_noise(rng, shape, spacing, 4.0),
        cortex=bone * np.clip((0.9 - _blur(bone, spacing, (0.8, 0.8, 0.8))) / 0.4, 0, 1),
        hydration=hydration,
        spacing=spacing,
    )
    padding = None
    if rng.random() < 1 / 3:
        # a band behind the back, or the top or bottom posterior corner, outside the body
        behind = (fov_ap - grid.u)[None, :] / rng.uniform(4, 40)
        from_top = grid.v[:, None] / rng.uniform(30, 100)
        from_bottom = (grid.v[-1] - grid.v)[:, None] / rng.uniform(30, 100)
        band = (behind, behind + from_top, behind + from_bottom)[int(rng.integers(3))]
        padding = (band < 1)[None] & ~torso & (labels == 0)

    # LPS position of voxel (0, 0, 0): leftmost slice, most anterior column, top row
    corner = (rng.uniform(20, 80), rng.uniform(-260, -140), rng.uniform(100, 300))
    origin = tuple(round(float(value), 3) for value in corner)
    images = {}
    for sequence in SEQUENCES:
        array = _render(rng, sequence, anatomy)
        if padding is not None:
            array[padding] = PADDING_VALUE
        images[sequence] = _to_image(array, spacing, origin)
    return images, _to_image(labels, spacing, origin)


def _count_vertebrae(mask: np.ndarray) -> int:
    """Number of vertebra instances (labels 1-25 and partially visible 101-125) in a mask."""
    values = np.unique(mask)
    return int(np.sum(((values >= 1) & (values <= 25)) | ((values >= 101) & (values <= 125))))


def _to_image(array: np.ndarray, spacing: tuple, origin: tuple) -> sitk.Image:
    """A PIR SimpleITK image from a (z, y, x) array."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(PIR_DIRECTION)
    return image


def write_case(
    out_dir: Path,
    patient_id: str,
    sequence: str,
    image: sitk.Image,
    mask: sitk.Image,
    orientation: str,
) -> tuple[Path, Path]:
    """Write images/<patient_id>_<sequence>.mha and masks/<patient_id>_<sequence>.mha.

    Both are reoriented with sitk.DICOMOrient(., orientation), orientation 'PIR' or 'LPS'.
    Returns (image_path, mask_path).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    name = f"{patient_id}_{sequence}.mha"
    paths = (Path(out_dir) / "images" / name, Path(out_dir) / "masks" / name)
    for path, volume in zip(paths, (image, mask), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.DICOMOrient(volume, orientation), str(path), True)
    return paths


def generate_dataset(
    out_dir: Path, n_patients: int, seed: int, small: bool = False
) -> pd.DataFrame:
    """Write a SPIDER-format dataset into out_dir: images/, masks/, overview.csv.

    Patients "1".."n_patients", each with a t1 and a t2 series sharing one mask and one
    orientation (about half 'LPS', half 'PIR'). Deterministic for a seed. Atomic: built in a
    hidden sibling folder that is renamed to out_dir at the end. Raises FileExistsError if
    out_dir exists. Returns the overview table (one row per series).
    """
    out_dir = Path(out_dir)
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    if out_dir.exists():
        raise FileExistsError(f"dataset folder already exists: {out_dir}")
    rng = np.random.default_rng(seed)
    orientations = rng.permutation(np.resize(ORIENTATIONS, n_patients))
    patient_rngs = rng.spawn(n_patients)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        rows = []
        for index, (patient_rng, orientation) in enumerate(
            zip(patient_rngs, orientations, strict=True)
        ):
            patient_id = str(index + 1)
            images, mask = synth_patient(patient_rng, small=small)
            n_vertebrae = _count_vertebrae(sitk.GetArrayViewFromImage(mask))
            for sequence in SEQUENCES:
                image_path, _ = write_case(
                    staging, patient_id, sequence, images[sequence], mask, str(orientation)
                )
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(image_path))
                reader.ReadImageInformation()
                size, spacing = reader.GetSize(), reader.GetSpacing()
                rows.append(
                    {
                        "new_file_name": f"{patient_id}_{sequence}",
                        "patient_id": int(patient_id),
                        "sequence": sequence,
                        "orientation": str(orientation),
                        "num_vertebrae": n_vertebrae,
                        "size_x": size[0],
                        "size_y": size[1],
                        "size_z": size[2],
                        "spacing_x": spacing[0],
                        "spacing_y": spacing[1],
                        "spacing_z": spacing[2],
                    }
                )
        overview = pd.DataFrame(rows)
        overview.to_csv(staging / "overview.csv", index=False)
        if out_dir.exists():
            raise FileExistsError(f"dataset folder already exists: {out_dir}")
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return overview


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic SPIDER-format dataset.")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--n-patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="coarse, fast cases for tests")
    args = parser.parse_args()
    generate_dataset(args.out_dir, args.n_patients, args.seed, small=args.small)


if __name__ == "__main__":
    main()
