"""Measurements per level, quality flags and a labelled picture, from a SPIDER-numbered
instance mask (vertebrae 1-25, partially visible 101-125, canal 100, discs 201-225) and the
scan's geometry. All lengths in mm, areas in mm^2.

Geometry: the mask is reoriented to PIR (numpy (z, y, x) = (sagittal slices left -> right,
rows superior -> inferior, columns anterior -> posterior)); sagittal-plane points are (x, y)
in mm (column x spacing, row x spacing).

Heights are measured in the mid-sagittal slab: the slices within MID_SAGITTAL_MM of the
canal's centroid (of all structures without a canal), taken together (a pixel belongs to a
structure if any of those slices has it). Radiological disc and body heights are mid-sagittal
measurements; the slab of a few slices evens out one slice's partial-volume noise without
reaching the lateral parts, where discs and endplates curve away.
- Disc height: the thickness of the disc along the spine's local axis, through the disc's
  centroid, and through the centres of its anterior and posterior thirds (thirds of its extent
  across the axis). The local axis runs from the body centroid below to the body centroid
  above; where one is missing or only partly visible (L5/S1: the sacrum is unlabelled) the
  disc's own thinnest direction (the minor principal axis of its mid-sagittal pixels).
- Body height: the same on the body alone: the largest connected piece of the vertebra in the
  mid-sagittal slab (posterior elements are other pieces there), along the axis from the disc
  below to the disc above (else the bodies below and above).
- Canal: at each disc and at each vertebra's middle, along the line across the axis through
  that structure's centroid: the antero-posterior diameter (the length of the canal's run on
  that line), and the cross-sectional area in the plane normal to the axis through the middle
  of that run (canal voxels within CANAL_BAND_MM of the plane, all slices, volume / band
  thickness). Where the canal reaches the first or last slice there, the slab does not hold
  its whole width: the area is NaN, with a note and the border flag.
A measurement that cannot be made is NaN, with the reason in `notes`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from atomic import atomic_path

CANONICAL = "PIR"
MID_SAGITTAL_MM = 3.0  # half-width of the mid-sagittal slab
CANAL_BAND_MM = 1.0  # half-thickness of the slab around the canal's cross-section plane
STEP_MM = 0.1  # sampling step along a measuring line
REACH_MM = 80.0  # the longest a measuring line reaches from its start
LUMBAR_RANGE = (4, 7)  # vertebrae in view: fewer or more is flagged
SIZE_RANGE = (0.5, 2.0)  # volume or height against the mean of the neighbours of its kind
LOW_PROBABILITY = 0.5  # a voxel is uncertain when its largest class probability is below
LOW_CONFIDENCE_SHARE = 0.2  # a structure is flagged when more of its voxels are uncertain
MEASUREMENTS = (
    "disc_height_mm",
    "disc_height_anterior_mm",
    "disc_height_posterior_mm",
    "body_height_mm",
    "canal_ap_mm",
    "canal_area_mm2",
)


def _name(label: int) -> str:
    from instances import level_name

    return level_name(label) if label != 100 else "canal"


class _Frame:
    """The PIR mask and its mid-sagittal slab: points in mm (x = A-P, y = S-I rows)."""

    def __init__(self, instances: sitk.Image) -> None:
        pir = sitk.DICOMOrient(instances, CANONICAL)
        self.array = sitk.GetArrayFromImage(pir).astype(np.int32)
        self.spacing = np.array(pir.GetSpacing())  # (x: A-P, y: S-I, z: slices)
        nz = self.array.shape[0]
        where = np.nonzero(self.array == 100)[0]
        if not where.size:
            where = np.nonzero(self.array)[0]
        centre = float(where.mean()) if where.size else (nz - 1) / 2
        half = max(0, int(MID_SAGITTAL_MM / self.spacing[2]))
        low, high = max(0, round(centre) - half), min(nz, round(centre) + half + 1)
        self.mid = self.array[low:high]
        self.centre_slice = int(round(centre))
        z, y, x = np.nonzero(self.array == 100)  # the canal's voxels, once
        self.canal_slices = z
        self.canal_points = np.stack([x * self.spacing[0], y * self.spacing[1]], axis=1)

    def plane(self, label: int) -> np.ndarray:
        """(y, x) boolean: the label anywhere in the mid-sagittal slab."""
        return (self.mid == label).any(axis=0)

    def centroid(self, plane: np.ndarray) -> np.ndarray | None:
        rows, cols = np.nonzero(plane)
        if not rows.size:
            return None
        return np.array([cols.mean() * self.spacing[0], rows.mean() * self.spacing[1]])

    def run(self, plane: np.ndarray, start: np.ndarray, direction: np.ndarray) -> float:
        """Length (mm) of plane's run through `start` along +-direction; NaN when start is not
        in it; inf when the run reaches the image's edge (cut)."""
        total = 0.0
        if not self._inside(plane, start):
            return math.nan
        for sign in (1.0, -1.0):
            steps = 0
            while True:
                point = start + sign * (steps + 1) * STEP_MM * direction
                if not self._on_image(plane, point):
                    return math.inf
                if not self._inside(plane, point) or steps * STEP_MM > REACH_MM:
                    break
                steps += 1
            total += steps * STEP_MM
        return total + STEP_MM  # the start point's own sample

    def first_entry(
        self, plane: np.ndarray, start: np.ndarray, direction: np.ndarray
    ) -> np.ndarray | None:
        """The first point of plane met going from start along direction (within REACH_MM)."""
        for steps in range(int(REACH_MM / STEP_MM)):
            point = start + steps * STEP_MM * direction
            if not self._on_image(plane, point):
                return None
            if self._inside(plane, point):
                return point
        return None

    def _index(self, point: np.ndarray) -> tuple[int, int]:
        return int(round(point[1] / self.spacing[1])), int(round(point[0] / self.spacing[0]))

    def _on_image(self, plane: np.ndarray, point: np.ndarray) -> bool:
        row, col = self._index(point)
        return 0 <= row < plane.shape[0] and 0 <= col < plane.shape[1]

    def _inside(self, plane: np.ndarray, point: np.ndarray) -> bool:
        row, col = self._index(point)
        return self._on_image(plane, point) and bool(plane[row, col])


def _largest_piece(plane: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of a (y, x) boolean mask."""
    if not plane.any():
        return plane
    pieces = sitk.GetArrayFromImage(
        sitk.RelabelComponent(
            sitk.ConnectedComponent(sitk.GetImageFromArray(plane.astype(np.uint8)), True)
        )
    )
    return pieces == 1


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-6 else None


def _thin_axis(frame: _Frame, plane: np.ndarray) -> np.ndarray:
    """The direction in which a (y, x) mask is thinnest: the minor principal axis of its
    pixels (x, y in mm), pointing inferior."""
    rows, cols = np.nonzero(plane)
    points = np.stack([cols * frame.spacing[0], rows * frame.spacing[1]], axis=1)
    _, vectors = np.linalg.eigh(np.cov(points.T))
    minor = vectors[:, 0]
    return minor if minor[1] >= 0 else -minor


def _height(frame: _Frame, plane: np.ndarray, centre: np.ndarray, axis: np.ndarray) -> float:
    length = frame.run(plane, centre, axis)
    return round(length, 1) if math.isfinite(length) else math.nan


def measure_levels(instances: sitk.Image) -> pd.DataFrame:
    """One row per label of a SPIDER-numbered mask: label and the MEASUREMENTS columns, with
    `notes` (why a value is NaN; '' when none is). See the module docstring for the method."""
    frame = _Frame(instances)
    labels = sorted(int(v) for v in np.unique(frame.array) if v)
    planes = {label: frame.plane(label) for label in labels}
    bodies = {
        label: _largest_piece(planes[label]) for label in labels if label < 100 or 100 < label < 200
    }
    body_centre = {k % 100: frame.centroid(p) for k, p in bodies.items()}
    # a partially visible body's centroid is no anchor for the axis: its cut shifts it
    whole_centre = {k: c for k, c in body_centre.items() if k in labels}
    disc_centre = {label - 200: frame.centroid(planes[label]) for label in labels if label > 200}
    canal = planes.get(100)
    rows = []
    for label in labels:
        row = {"label": label, **{m: math.nan for m in MEASUREMENTS}}
        notes = []
        if label == 100:
            rows.append(row | {"notes": ""})
            continue
        if label > 200:  # disc k lies between body k (above) and body k - 1 (below)
            k = label - 200
            centre, plane = disc_centre[k], planes[label]
            above, below = whole_centre.get(k), whole_centre.get(k - 1)
            axis = _unit(below - above) if above is not None and below is not None else None
            if axis is None and centre is not None and plane.sum() >= 3:
                axis = _thin_axis(frame, plane)
                notes.append("axis: the disc's own thinnest direction (no whole body on one side)")
        else:
            k = label % 100
            centre, plane = body_centre[k], bodies[label]
            above, below = disc_centre.get(k + 1), disc_centre.get(k)
            if above is None or below is None:
                above, below = body_centre.get(k + 1), body_centre.get(k - 1)
            axis = _unit(below - above) if above is not None and below is not None else None
            if label > 100:
                notes.append("partially visible: no body height")
        if centre is None or axis is None:
            notes.append(
                "no neighbour to set the spine's axis"
                if centre is not None
                else "not in the mid-sagittal slab"
            )
            rows.append(row | {"notes": "; ".join(notes)})
            continue
        across = np.array([axis[1], -axis[0]])  # perpendicular, pointing posterior (+x)
        across = across if across[0] >= 0 else -across
        if label > 200:
            row["disc_height_mm"] = _height(frame, plane, centre, axis)
            rows_, cols_ = np.nonzero(plane)
            points = np.stack([cols_ * frame.spacing[0], rows_ * frame.spacing[1]], axis=1)
            s = (points - centre) @ across
            for column, third in (
                ("disc_height_anterior_mm", 1 / 6),
                ("disc_height_posterior_mm", 5 / 6),
            ):
                at = centre + (s.min() + third * (s.max() - s.min())) * across
                row[column] = _height(frame, plane, at, axis)
            if math.isnan(row["disc_height_mm"]):
                notes.append("disc cut by the field of view or its centre outside it")
        elif label < 100:
            row["body_height_mm"] = _height(frame, plane, centre, axis)
            if math.isnan(row["body_height_mm"]):
                notes.append("body cut by the field of view")
        row |= _canal_at(frame, canal, centre, across, axis, notes)
        for column in ("disc_height_anterior_mm", "disc_height_posterior_mm"):
            if label > 200 and math.isnan(row[column]) and not math.isnan(row["disc_height_mm"]):
                notes.append(f"{column[12:-3]} third: the line leaves the disc or the view")
        rows.append(row | {"notes": "; ".join(notes)})
    table = pd.DataFrame(rows, columns=["label", *MEASUREMENTS, "notes"])
    return table


def _canal_at(frame, canal, centre, across, axis, notes) -> dict[str, float]:
    """canal_ap_mm and canal_area_mm2 on the line across the axis through centre."""
    if canal is None or not canal.any():
        notes.append("no canal")
        return {}
    entry = frame.first_entry(canal, centre, across)
    if entry is None:
        notes.append("no canal behind this level")
        return {}
    length = frame.run(canal, entry + 0.5 * STEP_MM * across, across)
    if not math.isfinite(length):
        notes.append("canal cut by the field of view")
        return {}
    middle = entry + (length / 2) * across
    offsets = frame.canal_points - middle
    # the canal voxels near the plane through the middle, normal to the axis, on this stretch
    in_band = (np.abs(offsets @ axis) <= CANAL_BAND_MM) & (np.abs(offsets @ across) <= REACH_MM / 4)
    result = {"canal_ap_mm": round(length, 1)}
    slices = frame.canal_slices[in_band]
    if slices.size and (slices.min() == 0 or slices.max() == frame.array.shape[0] - 1):
        notes.append("canal area: the slab does not hold the canal's whole width")
        return result
    voxel = float(np.prod(frame.spacing))
    result["canal_area_mm2"] = round(in_band.sum() * voxel / (2 * CANAL_BAND_MM), 1)
    return result


def quality_flags(
    instances: sitk.Image, measurements: pd.DataFrame, confidence: sitk.Image | None = None
) -> dict[str, object]:
    """{"ok": bool, "flags": [{"name", "levels", "value", "threshold"}, ...]} for a
    SPIDER-numbered mask, its measure_levels table and, where known, the largest class
    probability per voxel on the same grid (confidence). Flags (thresholds: module constants):
    order (vertebrae and discs do not alternate from bottom to top), count (vertebrae in view
    outside LUMBAR_RANGE), size (a level's volume or height against the mean of its
    neighbours of its kind outside SIZE_RANGE; structures on the border are left to the border
    flag), canal_pieces (the canal in more than one piece), border (a structure on the scan's
    first or last row or column: partly out of view; the slab's lateral sides are no border,
    its canal area note says where they cut), low_confidence (more than LOW_CONFIDENCE_SHARE
    of a structure's voxels below LOW_PROBABILITY)."""
    from instances import instance_table

    frame = _Frame(instances)
    array = frame.array
    table = instance_table(instances).set_index("label")
    flags = []
    structures = [int(v) for v in table.index if v != 100]
    # order: bottom to top by the centroid's S-I position
    ordered = sorted(structures, key=lambda v: table.loc[v, "centroid_z_mm"])
    kinds = ["disc" if v > 200 else "vertebra" for v in ordered]
    pairs = [
        [_name(a), _name(b)]
        for a, b, ka, kb in zip(ordered, ordered[1:], kinds, kinds[1:], strict=False)
        if ka == kb
    ]
    if pairs:
        flags.append({"name": "order", "levels": pairs, "value": len(pairs), "threshold": 0})
    vertebrae = [v for v in structures if v < 200]
    if not LUMBAR_RANGE[0] <= len(vertebrae) <= LUMBAR_RANGE[1]:
        flags.append(
            {
                "name": "count",
                "levels": [_name(v) for v in vertebrae],
                "value": len(vertebrae),
                "threshold": list(LUMBAR_RANGE),
            }
        )
    edge = set(
        np.unique(
            np.concatenate(
                [
                    array[:, 0].ravel(),
                    array[:, -1].ravel(),
                    array[:, :, 0].ravel(),
                    array[:, :, -1].ravel(),
                ]
            )
        ).tolist()
    ) - {0}
    border = sorted(v for v in edge if v != 100)
    if border:
        flags.append(
            {
                "name": "border",
                "levels": [_name(v) for v in border],
                "value": len(border),
                "threshold": 0,
            }
        )
    heights = measurements.set_index("label")
    for column, kind in (
        ("volume_mm3", None),
        ("body_height_mm", "vertebra"),
        ("disc_height_mm", "disc"),
    ):
        for label in structures:
            if label in edge or label > 100 and label < 200:
                continue
            is_disc = label > 200
            if kind is not None and (kind == "disc") != is_disc:
                continue
            k = label - 200 if is_disc else label
            neighbours = [k - 1 + (200 if is_disc else 0), k + 1 + (200 if is_disc else 0)]
            source = table if column == "volume_mm3" else heights
            values = [
                source.loc[n, column] for n in neighbours if n in source.index and n not in edge
            ]
            values = [v for v in values if np.isfinite(v)]
            own = source.loc[label, column]
            if not values or not np.isfinite(own):
                continue
            ratio = float(own / np.mean(values))
            if not SIZE_RANGE[0] <= ratio <= SIZE_RANGE[1]:
                flags.append(
                    {
                        "name": "size",
                        "levels": [_name(label)],
                        "value": round(ratio, 2),
                        "threshold": list(SIZE_RANGE),
                        "measure": column,
                    }
                )
    canal = sitk.ConnectedComponent(sitk.GetImageFromArray((array == 100).astype(np.uint8)), True)
    pieces = int(sitk.GetArrayViewFromImage(canal).max())
    if pieces > 1:
        flags.append({"name": "canal_pieces", "levels": ["canal"], "value": pieces, "threshold": 1})
    if confidence is not None:
        probability = sitk.GetArrayFromImage(sitk.DICOMOrient(confidence, CANONICAL))
        for label in structures + ([100] if 100 in table.index else []):
            share = float((probability[array == label] < LOW_PROBABILITY).mean())
            if share > LOW_CONFIDENCE_SHARE:
                flags.append(
                    {
                        "name": "low_confidence",
                        "levels": [_name(label)],
                        "value": round(share, 3),
                        "threshold": LOW_CONFIDENCE_SHARE,
                    }
                )
    return {"ok": not flags, "flags": flags}


def flag_line(qc: dict) -> str:
    """'ok', or the flags in one line: 'order (L4/L5, L3/L4), size L2 0.41 ...'."""
    if qc["ok"]:
        return "ok"
    parts = []
    for flag in qc["flags"]:
        levels = ", ".join(
            "-".join(level) if isinstance(level, list) else level for level in flag["levels"]
        )
        parts.append(f"{flag['name']} {levels} ({flag['value']} vs {flag['threshold']})")
    return "; ".join(parts)


def write_qc(qc: dict, path: Path) -> None:
    """<scan>_qc.json, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(qc, indent=2), encoding="utf-8")


def plot_levels(
    instances: sitk.Image,
    measurements: pd.DataFrame,
    qc: dict,
    path: Path,
    scan: sitk.Image | None = None,
) -> None:
    """<scan>_levels.png: the mid-sagittal slice of the scan (or of the mask alone) with the
    instance overlay, each level's name beside it, disc height and canal diameter in small
    text, flagged levels in red. matplotlib, Agg."""
    from store_plot_metrics import _save, plt

    frame = _Frame(instances)
    flagged = {
        level if isinstance(level, str) else level[0]
        for flag in qc["flags"]
        for level in flag["levels"]
    } | {level[1] for flag in qc["flags"] for level in flag["levels"] if isinstance(level, list)}
    labels = frame.array[frame.centre_slice]
    extent = (0, labels.shape[1] * frame.spacing[0], labels.shape[0] * frame.spacing[1], 0)
    figure, axis = plt.subplots(figsize=(6, 8))
    if scan is not None:
        image = sitk.GetArrayFromImage(sitk.DICOMOrient(scan, CANONICAL))[frame.centre_slice]
        axis.imshow(image, cmap="gray", extent=extent)
    else:
        axis.imshow(labels > 0, cmap="gray", extent=extent, alpha=0.3)
    colours = np.ma.masked_equal(np.where(labels > 200, labels - 180, labels % 100), 0)
    axis.imshow(colours, cmap="tab20", vmin=1, vmax=45, alpha=0.45, extent=extent)
    table = measurements.set_index("label")
    for label in table.index:
        if label == 100:
            continue
        plane = frame.plane(label)
        centre = frame.centroid(plane)
        if centre is None:
            continue
        name = _name(int(label))
        text = name
        row = table.loc[label]
        if label > 200 and np.isfinite(row["disc_height_mm"]):
            text += f"  h {row['disc_height_mm']:.1f}"
        if label < 200 and np.isfinite(row["body_height_mm"]):
            text += f"  h {row['body_height_mm']:.1f}"
        if np.isfinite(row["canal_ap_mm"]):
            text += f"  canal {row['canal_ap_mm']:.1f}"
        colour = "red" if name in flagged else ("yellow" if label > 200 else "white")
        axis.text(2.0, centre[1], text, color=colour, fontsize=6, va="center")  # anterior margin
    axis.set_title(f"{path.name.replace('_levels.png', '')}: {flag_line(qc)[:80]}", fontsize=7)
    axis.axis("off")
    _save(figure, path)
