"""The instance step: a semantic class-index mask -> SPIDER-numbered instances, on the scan.

Runs after a semantic prediction has been mapped back onto the scan (or on any class-index
mask): one class index for all vertebrae, one for all intervertebral discs, one for the spinal
canal. The output follows SPIDER's numbering: vertebrae 1-25 counted upward from L5 = 1 (the
sacrum is unlabelled), 101-125 a partially visible topmost vertebra
(100 + its number), 100 the spinal canal, discs 201-225 where 200 + k lies directly below
vertebra k (201 = L5/S1).

    python instances.py MASK [MASK ...] --output-dir DIR [--config FILE] [--min-instance-mm3 V]

runs the step on saved class-index masks (0 background, then the classes of FILE's [labels] in
order: by default 1 vertebrae, 2 discs, 3 canal) and writes DIR/<mask>_instances.mha and
DIR/<mask>_instances.csv, as `predict_script.py --instances` does; a scan whose level names are
uncertain gets its level note in the printed line. A bad mask is reported and skipped (exit 1).

Geometry. The input may have any orientation. The work is done on the mask reoriented to PIR
(``sitk.DICOMOrient``): numpy (z, y, x) = (sagittal slices, rows superior -> inferior, columns
anterior -> posterior). Distances, volumes and positions are in mm, measured in that voxel
frame (index x spacing), so "superior-inferior" means the scan's own row axis (for SPIDER's
sagittal scans, the physical S-I axis up to the scan's obliquity). The result is reoriented
back and carries exactly the input's size, spacing, origin and direction.

The algorithm, and why:
1. Fragments. Connected components (26-connectivity) of each class smaller than
   ``min_instance_mm3`` are set to background first; so are instances that end up smaller.
2. Discs are physically separate: each connected component is a disc (or a piece of one).
   A piece smaller than DISC_PIECE_FRACTION x the median disc is no landmark: the disc
   column, the levels of seeds and "below the lowest disc" (steps 3c-e') and the numbering
   (f) use the larger discs only. A model's stray disc blob in the sacrum (a real slab's
   S1/S2 remnant) would otherwise become the lowest disc, keep a piece of S1 between it and
   L5/S1 as "L5", and shift every name by one.
3. Vertebrae. A vertebra includes its posterior elements, which in sagittal slices (always in
   a thin central slab) touch neither the body nor each other, while neighbouring bodies may
   touch through a thin or missed disc. So a connected component is not a vertebra. Instead:
   a. Distance map: d = distance (mm) from each vertebra voxel to the class's border.
      Vertebral bodies are the thickest bone (d peaks at 7-14 mm in adults); pedicles,
      laminae and spinous processes peak at 2-6 mm; touching bodies meet in a thin neck.
      For speed, steps a-e run on in-plane blocks of about
      WORK_SPACING_MM (a block is vertebra if any of its voxels is); the result is taken back
      to every vertebra voxel of the scan.
   b. Candidate seeds: the tops of the peaks of d that rise at least SEED_DYNAMIC_MM (or one
      in-plane voxel, if larger) above their saddle (h-maxima): the cores of thick blobs,
      split at their necks.
   c. Seed selection. R = the median peak of the candidates that reach half the largest peak
      (a typical body's inner radius). A candidate is strong if its peak >= STRONG_SEED_FRACTION
      x R. Where discs exist they mark the anterior column and the levels: a candidate more
      than COLUMN_TOLERANCE x (median disc depth) in front of or behind the line through the
      disc centroids is refused (a thick spinous process is no body), and a weak candidate (a
      body cut by the field of view or by a thin slab) is kept only where no kept seed lies
      between the same two discs (the thickest one per level). Without discs only strong
      candidates are kept.
   d. Bodies -> their connected bone: a marker watershed (sitk.MorphologicalWatershedFromMarkers)
      from the seeds over the landscape -d + LEVEL_RIDGE x R x ridge, where ridge rises from 0
      on each body's mid-plane to 1 halfway to the next body's. -d alone splits touching
      vertebrae at their necks and carries each body's label along its own pedicles and arch;
      the small ridge keeps that flooding from running along a row of posterior elements
      that are fused into one mass (e.g. by a coarse prediction), which otherwise shifts
      their labels by a level. Body mid-planes pass through the seed centroids,
      perpendicular to the spine's axis there: the direction of the line through the disc
      centroids (which lie on the axis even where a body is cut), else of the line through
      the neighbouring seeds.
   e. Unseeded connected pieces (e.g. a spinous process in a central slab) are assigned whole
      (one piece of bone belongs to one vertebra) to the vertebra whose body they are level
      with: the smallest distance from the piece's centroid to a body's mid-plane. This
      follows the tilt of the lower lumbar levels, where a posterior element sits higher than
      its body. Nearest-voxel rules did worse on the real SPIDER slabs: a spinous process
      often comes closest to the corner of the body above its own, and flooding through all
      pieces at once chains a row of spinous processes onto whichever vertebra reaches the
      first. A large piece (>= NEW_LEVEL_VOLUME x the median vertebra) lying more than
      NEW_LEVEL_FRACTION x the level height (median disc-to-disc distance; without discs the
      shortest seed-to-seed one) from every body's mid-plane is a vertebra of its own (a body
      too thin to be a seed, e.g. cut by the field of view); below the lowest disc such a
      piece is sacrum and dropped: an S1 predicted as vertebra and tilted out of the discs'
      column (seen in a cross-validation prediction) would otherwise become "L5".
   e'. The sacrum (applied between d and e). SPIDER leaves the sacrum unlabelled and no
      vertebral body lies below the L5/S1 disc, yet a model may call a piece of the sacrum
      vertebra. A seeded vertebra whose
      seed lies in the discs' column below the lowest disc is dropped (set to 0) when its
      body (its S-I extent within the column, posterior elements excluded) is shorter than
      BODY_HEIGHT_FRACTION x the median body height above it; unseeded pieces in the column
      below the lowest disc are dropped too. On the 20 real slabs with a lowest disc removed,
      the real L5 measures 1.07-1.38 x the median; a 25 mm block of "sacrum" 0.73-0.89 x. A
      full-height body there stays: an L5 whose L5/S1 disc was missed. L5's posterior
      elements lie behind the column and stay L5's, even below the disc's level.
   f. Levels (number_levels): the discs are the reliable landmarks (detected 99 % of the
      time on real slabs), so vertebra seeds and discs are numbered together, upward from the
      lowest structure: it is the L5/S1 disc, or L5 if it is a vertebra. Going up,
      vertebrae and discs alternate one half-level H apart (H: the median distance between
      neighbours of different kinds); each next structure takes the level its distance from
      the previous one says, so that a missed disc or vertebra skips a number instead of
      shifting every name above it, and pieces of one disc (or a body split in two) share
      their level. Each irregularity is written into the instance image's metadata
      (LEVEL_NOTE_KEY, see level_note) and so into the table's level_note column: a
      missing structure ("not found between L4 and L3: L3/L4 disc"), no disc below the
      lowest vertebra, no discs or no vertebrae at all, and a lowest structure that touches
      the lower edge of the field of view (the sacrum may be out of view: L5 unconfirmed).
      Numbers beyond 25 are dropped. The topmost vertebra becomes 100 + n when it touches the
      superior border of the field of view (row 0 of the PIR scan) and has less than
      PARTIAL_VOLUME_RATIO x the volume of the vertebra below it. On the synthetic demo set
      this reproduces the generator's rule ("less than 70 % of the body height visible") in
      116 of 120 small cases; the misses are cut vertebrae with 80 % or more of the volume of
      the one below.
4. Disc numbering: 200 + k for the disc directly below vertebra k (201 = L5/S1), from step f;
   a small piece takes the number of the disc level nearest to it, and none (0) when that
   lies below L5/S1.
5. Canal: every canal voxel (fragments removed) -> 100.

Limitations:
- A lumbosacral transitional vertebra (a sacralised L5, or a lumbarised S1 with a disc below
  it) breaks the premise that the lowest labelled disc is L5/S1: the names are then off by
  one, as they would be for a reader who counts from the sacrum. Only a scan that shows the
  whole spine (counting down from C2) can tell; these lumbar scans cannot.
- A field of view that ends above the sacrum: the lowest vertebra is still called L5, and the
  note says so whenever the lowest structure touches the lower edge of the scan.
- A piece of sacrum as tall as a vertebral body (>= BODY_HEIGHT_FRACTION x the median) is
  taken for an L5 whose L5/S1 disc was missed: it is named L5 and the note says that no disc
  lies below it.
- Stray vertebra blobs away from the spine are attached to the vertebra they are level with
  unless smaller than min_instance_mm3; the thresholds were set on the synthetic demo set and
  the 20 real SPIDER slabs (whose discs, as connected components, are the only real instance
  reference here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from config import ConfigError, driver_arguments, load_config
from safety import EXIT_UNSAFE, UnsafePathError, check_outputs, interruptible, output_names
from store_plot_metrics import write_csv
from vertebraeseg import CaseError, atomic_write_image, read_scan, split_suffix

CANONICAL = "PIR"
CANAL_LABEL = 100
PARTIAL_OFFSET = 100
DISC_OFFSET = 200
MAX_LEVEL = 25

SEED_DYNAMIC_MM = 2.0  # a distance-map peak must rise this far above its saddle to be a seed
STRONG_SEED_FRACTION = 0.7  # of the typical body radius R: a body on its own, discs or not
COLUMN_TOLERANCE = 0.5  # x median disc depth: how far from the disc column a seed may lie
PARTIAL_VOLUME_RATIO = 0.8  # topmost vertebra at the border, smaller than this x the one below
NEW_LEVEL_FRACTION = 0.6  # an unseeded piece this far (x level height) from every body's level
NEW_LEVEL_VOLUME = 0.3  # and at least this large (x median vertebra) becomes a vertebra
LEVEL_RIDGE = 0.1  # x R: extra height of the watershed landscape halfway between two levels
WORK_SPACING_MM = 1.0  # vertebrae are split on in-plane blocks of about this size (speed)
BODY_HEIGHT_FRACTION = 0.9  # x median body height: a shorter one below the lowest disc is sacrum
DISC_PIECE_FRACTION = 0.2  # x median disc volume: a smaller disc piece is no level landmark
LEVEL_NOTE_KEY = "level_note"  # metadata key of the instance image: why its names are uncertain

# Vertebra names counted upward from L5 (k = 1): L5-L1, T12-T1, C7-C1.
_VERTEBRA_NAMES = (
    [f"L{i}" for i in range(5, 0, -1)]
    + [f"T{i}" for i in range(12, 0, -1)]
    + [f"C{i}" for i in range(7, 0, -1)]
)


INSTANCE_CLASSES = ("vertebrae", "intervertebral_discs", "spinal_canal")  # [labels] names


def instance_classes(class_names: tuple[str, ...]) -> tuple[int, int, int | None]:
    """Class indices of vertebrae, intervertebral_discs and (optional) spinal_canal in
    class_names (index 0 is the background), which the instance step needs; ValueError
    naming the classes there are otherwise."""
    names = list(class_names)
    if INSTANCE_CLASSES[0] not in names or INSTANCE_CLASSES[1] not in names:
        raise ValueError(
            "the instance step needs classes named vertebrae and intervertebral_discs "
            f"([labels]); this model has {', '.join(names[1:])}"
        )
    canal = names.index(INSTANCE_CLASSES[2]) if INSTANCE_CLASSES[2] in names else None
    return names.index(INSTANCE_CLASSES[0]), names.index(INSTANCE_CLASSES[1]), canal


def _vertebra_name(k: int) -> str:
    """Name of vertebra number k (1 = L5); k = 25 lies beyond C1 and is called 'V25'."""
    return _VERTEBRA_NAMES[k - 1] if k <= len(_VERTEBRA_NAMES) else f"V{k}"


def level_name(label: int) -> str:
    """Anatomical level of a SPIDER label: 1 -> 'L5', 6 -> 'T12', 103 -> 'L3' (partial),
    201 -> 'L5/S1', 206 -> 'T12/L1', 100 (canal) -> ''. Raises ValueError for any other value."""
    label = int(label)
    if label == CANAL_LABEL:
        return ""
    if 1 <= label <= MAX_LEVEL:
        return _vertebra_name(label)
    if PARTIAL_OFFSET + 1 <= label <= PARTIAL_OFFSET + MAX_LEVEL:
        return _vertebra_name(label - PARTIAL_OFFSET)
    if DISC_OFFSET + 1 <= label <= DISC_OFFSET + MAX_LEVEL:
        k = label - DISC_OFFSET
        below = "S1" if k == 1 else _vertebra_name(k - 1)
        return f"{_vertebra_name(k)}/{below}"
    raise ValueError(f"{label} is not a SPIDER label (1-25, 100, 101-125, 201-225)")


def _structure(label: int) -> str:
    if label == CANAL_LABEL:
        return "canal"
    if label > DISC_OFFSET:
        return "disc"
    if label > PARTIAL_OFFSET:
        return "partial vertebra"
    return "vertebra"


def _frame_image(
    array: np.ndarray, spacing: tuple[float, float, float], origin: tuple = (0.0, 0.0, 0.0)
) -> sitk.Image:
    """A (z, y, x) array as an image with identity direction: physical points are mm along
    (columns, rows, slices) of the PIR frame, measured from the centre of voxel 0 (origin: the
    position of voxel 0's centre in that frame)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _components(mask: np.ndarray, spacing: tuple, min_mm3: float) -> np.ndarray:
    """Connected components (26-connectivity) of a boolean (z, y, x) mask, labelled 1..m,
    without those smaller than min_mm3 (uint32 array)."""
    components = sitk.ConnectedComponent(_frame_image(mask.astype(np.uint8), spacing), True)
    min_voxels = int(np.ceil(min_mm3 / float(np.prod(spacing)) - 1e-9))
    relabelled = sitk.RelabelComponent(components, max(min_voxels, 0), False)
    return sitk.GetArrayFromImage(relabelled).astype(np.uint32)


def _shapes(image: sitk.Image) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per label value > 0 of a frame image: centroid in frame mm, array (ap, inferior,
    lateral); and the anterior-posterior depth of its bounding box in mm."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(image, sitk.sitkUInt32))
    spacing_ap = image.GetSpacing()[0]
    centres = {int(i): np.array(stats.GetCentroid(i)) for i in stats.GetLabels()}
    depths = {int(i): stats.GetBoundingBox(i)[3] * spacing_ap for i in stats.GetLabels()}
    return centres, depths


def _column_offset(point: np.ndarray, discs: dict[int, np.ndarray]) -> float:
    """How far (mm) point (frame mm) lies in front of or behind the line through the disc
    centroids, at its height (the line is held at the end discs' AP beyond them)."""
    column = np.array(sorted(discs.values(), key=lambda c: c[1]))  # top to bottom
    return abs(float(point[0]) - float(np.interp(point[1], column[:, 1], column[:, 0])))


def _below_the_discs(point: np.ndarray, discs: dict[int, np.ndarray], disc_depth_mm: float) -> bool:
    """Whether point (frame mm) lies below the lowest disc's centroid and in the column of
    the discs (COLUMN_TOLERANCE x disc depth): where the sacrum lies, if the lowest disc is
    L5/S1. False without discs."""
    if not discs:
        return False
    lowest = max(c[1] for c in discs.values())
    return point[1] > lowest and _column_offset(point, discs) <= COLUMN_TOLERANCE * disc_depth_mm


def _seeds(
    mask_image: sitk.Image,
    distance: sitk.Image,
    discs: dict[int, np.ndarray],
    disc_depth_mm: float,
) -> tuple[np.ndarray, float]:
    """Vertebral body seeds (uint32 (z, y, x), 1..n in no particular order) and the typical
    body radius R (mm); step 3b-c.

    mask_image: the vertebra mask (frame image); distance: its inside distance map (mm).
    """
    # the tops of the distance map's peaks, and those peaks that rise >= h above their saddle
    dynamic = max(SEED_DYNAMIC_MM, *mask_image.GetSpacing()[:2])  # at least one voxel step
    tops = sitk.Subtract(distance, sitk.HMaxima(distance, dynamic))
    candidates = sitk.ConnectedComponent(sitk.Mask(tops > 1e-3 * dynamic, mask_image), True)
    rise = sitk.LabelIntensityStatisticsImageFilter()
    rise.Execute(candidates, tops)
    stats = sitk.LabelIntensityStatisticsImageFilter()
    stats.Execute(candidates, distance)
    ids = [i for i in rise.GetLabels() if rise.GetMaximum(i) >= dynamic * (1 - 1e-3)]
    if not ids:
        return np.zeros(mask_image.GetSize()[::-1], np.uint32), 0.0
    peak = {i: stats.GetMaximum(i) for i in ids}
    centre = {i: np.array(stats.GetCentroid(i)) for i in ids}
    largest = max(peak.values())
    radius = float(np.median([p for p in peak.values() if p >= 0.5 * largest]))
    strong = {i for i in ids if peak[i] >= STRONG_SEED_FRACTION * radius}

    kept = sorted(strong)
    if discs:
        disc_rows = np.sort([c[1] for c in discs.values()])  # top to bottom

        def level(i: int) -> int:  # the number of disc centroids above the candidate
            return int(np.searchsorted(disc_rows, centre[i][1]))

        tolerance = COLUMN_TOLERANCE * disc_depth_mm
        in_column = {i for i in ids if _column_offset(centre[i], discs) <= tolerance}
        kept = [i for i in kept if i in in_column]
        taken = {level(i) for i in kept}
        for i in sorted(in_column - strong, key=lambda i: -peak[i]):
            if level(i) not in taken:
                kept.append(i)
                taken.add(level(i))
    lookup = np.zeros(max(rise.GetLabels()) + 1, np.uint32)
    lookup[kept] = np.arange(1, len(kept) + 1)
    return lookup[sitk.GetArrayFromImage(candidates)], radius


def _watershed(image: sitk.Image, markers: np.ndarray) -> np.ndarray:
    """Marker-based watershed flooding of image from markers (uint32 (z, y, x))."""
    marker_image = sitk.GetImageFromArray(markers)
    marker_image.CopyInformation(image)
    flooded = sitk.MorphologicalWatershedFromMarkers(image, marker_image, False, True)
    return sitk.GetArrayFromImage(flooded)


def _body_planes(
    seed_centres: dict[int, np.ndarray], discs: dict[int, np.ndarray]
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The bodies' mid-planes in the sagittal plane: (ids top to bottom, centres (n, 2),
    unit normals (n, 2) pointing down the spine), coordinates (ap, inferior) in frame mm.

    Each mid-plane passes through the seed's centroid, perpendicular to the spine's axis
    there: the direction of the line through the disc centroids at that height where there
    are two or more discs (disc centroids lie on the axis even where a body is cut), else
    the direction between the neighbouring seeds, else straight down.
    """
    ids = sorted(seed_centres, key=lambda i: seed_centres[i][1])
    centres = np.array([seed_centres[i][:2] for i in ids]).reshape(-1, 2)
    if len(discs) >= 2:
        column = np.array(sorted((c[:2] for c in discs.values()), key=lambda c: c[1]))
        tangents = np.gradient(column, axis=0)
        axes = np.stack(
            [np.interp(centres[:, 1], column[:, 1], tangents[:, k]) for k in (0, 1)], axis=1
        )
    elif len(ids) >= 2:
        axes = np.gradient(centres, axis=0)  # central differences, one-sided at the ends
    else:
        axes = np.tile([0.0, 1.0], (len(ids), 1))
    axes /= np.maximum(np.linalg.norm(axes, axis=1, keepdims=True), 1e-9)
    return ids, centres, axes


def _level_offsets(
    point: np.ndarray, seed_centres: dict[int, np.ndarray], discs: dict[int, np.ndarray]
) -> dict[int, float]:
    """Per seed: the distance (mm) from point (frame mm) to its body's mid-plane."""
    ids, centres, axes = _body_planes(seed_centres, discs)
    offsets = np.abs(np.sum((point[:2] - centres) * axes, axis=1))
    return dict(zip(ids, offsets.tolist(), strict=True))


def _level_ridge(
    mask: np.ndarray,
    spacing: tuple,
    origin: tuple,
    seed_centres: dict[int, np.ndarray],
    discs: dict[int, np.ndarray],
) -> np.ndarray:
    """Per voxel of mask (z, y, x): 0 on a body's mid-plane rising to 1 halfway to the next
    body's (float32; 0 outside mask and beyond the outermost bodies). See _body_planes."""
    ridge = np.zeros(mask.shape, np.float32)
    if len(seed_centres) < 2:
        return ridge
    ids, centres, axes = _body_planes(seed_centres, discs)
    _, rows, cols = np.nonzero(mask)
    points = np.stack([origin[0] + cols * spacing[0], origin[1] + rows * spacing[1]], axis=1)
    closest = np.full(len(points), np.inf)
    nearest = np.zeros(len(points), np.intp)
    for k in range(len(ids)):  # one plane at a time: memory in the number of voxels only
        offset = np.abs((points - centres[k]) @ axes[k])
        nearer = offset < closest
        closest[nearer], nearest[nearer] = offset[nearer], k
    own = np.einsum("vi,vi->v", points - centres[nearest], axes[nearest])
    other = np.clip(nearest + np.where(own > 0, 1, -1), 0, len(ids) - 1)
    beyond = other == nearest  # above the topmost or below the lowest body's mid-plane
    other_offset = np.abs(np.einsum("vi,vi->v", points - centres[other], axes[other]))
    fraction = np.abs(own) / np.maximum(np.abs(own) + other_offset, 1e-9)
    ridge[mask] = np.where(beyond, 0.0, 2.0 * fraction)
    return ridge


def _assign_pieces(
    piece_ids: np.ndarray,
    image: sitk.Image,
    labels: np.ndarray,
    seed_centres: dict[int, np.ndarray],
    discs: dict[int, np.ndarray],
    disc_depth_mm: float,
) -> np.ndarray:
    """Owner (vertebra label, 0 for sacrum) per piece id (step 3e); may add new levels to
    seed_centres.

    piece_ids: (z, y, x) ids of the unseeded connected pieces (0 elsewhere), on the frame
    grid of image; labels: the seeded vertebrae (1..n) on the same grid. A piece in the
    column below the lowest disc is sacrum (owner 0) unless a kept body lies there too.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(_frame_image(piece_ids, image.GetSpacing(), image.GetOrigin()))
    centre = {i: np.array(stats.GetCentroid(i)) for i in stats.GetLabels()}
    owner = np.zeros(int(piece_ids.max()) + 1, np.uint32)
    if not any(_below_the_discs(c, discs, disc_depth_mm) for c in seed_centres.values()):
        centre = {i: c for i, c in centre.items() if not _below_the_discs(c, discs, disc_depth_mm)}
    pieces = sorted(centre, key=lambda i: -stats.GetNumberOfPixels(i))
    volumes = np.bincount(labels.ravel())[1:]
    typical_volume = float(np.median(volumes[volumes > 0]))
    level_height = _level_height(seed_centres, discs)
    lowest_disc = max((c[1] for c in discs.values()), default=np.inf)
    sacrum = set()
    for i in pieces:  # a large piece at a level of its own is a vertebra of its own ...
        offsets = _level_offsets(centre[i], seed_centres, discs)
        if (
            min(offsets.values()) > NEW_LEVEL_FRACTION * level_height
            and stats.GetNumberOfPixels(i) >= NEW_LEVEL_VOLUME * typical_volume
        ):
            if centre[i][1] > lowest_disc:  # ... but below L5/S1 it is sacrum: dropped
                sacrum.add(i)
                continue
            owner[i] = max(seed_centres) + 1
            seed_centres[int(owner[i])] = centre[i]
    for i in pieces:
        if not owner[i] and i not in sacrum:
            offsets = _level_offsets(centre[i], seed_centres, discs)
            owner[i] = min(offsets, key=offsets.get)
    return owner


def _level_height(seed_centres: dict[int, np.ndarray], discs: dict[int, np.ndarray]) -> float:
    """Typical distance (mm, sagittal plane) from one level to the next: the median distance
    between consecutive discs where there are two or more, else the shortest distance between
    consecutive seeds (a missed level only makes distances longer); inf with one seed."""
    points = discs if len(discs) >= 2 else seed_centres
    ordered = np.array(sorted((c[:2] for c in points.values()), key=lambda c: c[1]))
    steps = np.linalg.norm(np.diff(ordered, axis=0), axis=1)
    if not steps.size:
        return np.inf
    return float(np.median(steps) if len(discs) >= 2 else steps.min())


def _pool(mask: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Boolean (z, y, x) mask -> coarser mask: a block is set if any of its voxels is."""
    padded = np.pad(mask, [(0, -n % f) for n, f in zip(mask.shape, factors, strict=True)])
    (nz, ny, nx), (fz, fy, fx) = padded.shape, factors
    return padded.reshape(nz // fz, fz, ny // fy, fy, nx // fx, fx).any(axis=(1, 3, 5))


def _unpool(coarse: np.ndarray, factors: tuple[int, int, int], shape: tuple) -> np.ndarray:
    """Coarse (z, y, x) array -> every voxel of each block takes the block's value."""
    fine = coarse
    for axis, factor in enumerate(factors):
        fine = np.repeat(fine, factor, axis=axis)
    return fine[: shape[0], : shape[1], : shape[2]]


def _body_heights(
    labels: np.ndarray,
    spacing: tuple,
    origin: tuple,
    discs: dict[int, np.ndarray],
    disc_depth_mm: float,
) -> dict[int, float]:
    """Per label > 0 of labels (z, y, x, frame grid): the S-I extent (mm, rows) of its voxels
    in the column of the discs (COLUMN_TOLERANCE x disc depth), i.e. of its body without the
    posterior elements; 0 for a label with no voxel there."""
    _, rows, cols = np.nonzero(labels)
    values = labels[labels > 0]
    row_mm = origin[1] + rows * spacing[1]
    column = np.array(sorted(discs.values(), key=lambda c: c[1]))
    ap = np.interp(row_mm, column[:, 1], column[:, 0])
    in_column = np.abs(origin[0] + cols * spacing[0] - ap) <= COLUMN_TOLERANCE * disc_depth_mm
    heights = {}
    for label in np.unique(values).tolist():
        own = row_mm[in_column & (values == label)]
        heights[label] = float(own.max() - own.min() + spacing[1]) if own.size else 0.0
    return heights


def _drop_sacrum(
    labels: np.ndarray,
    spacing: tuple,
    origin: tuple,
    seed_centres: dict[int, np.ndarray],
    discs: dict[int, np.ndarray],
    disc_depth_mm: float,
    cut_below: bool,
) -> None:
    """Step 3e': no vertebral body lies below the L5/S1 disc in SPIDER's labelling. A seeded
    vertebra whose seed lies in the column below the lowest disc is sacrum when its body is
    shorter than BODY_HEIGHT_FRACTION x the median body height (S-I extent in the column,
    _body_heights) of the vertebrae above it: its voxels become 0 and its seed is removed
    (labels (z, y, x, frame grid) and seed_centres are changed in place). A body of full
    height stays (an L5 whose L5/S1 disc was missed). So does one on the bottom row when
    cut_below (the field of view ends there: a cut body, not sacrum)."""
    below = [i for i, c in seed_centres.items() if _below_the_discs(c, discs, disc_depth_mm)]
    above = [i for i in seed_centres if i not in below]
    if not below or not above:
        return
    heights = _body_heights(labels, spacing, origin, discs, disc_depth_mm)
    typical = float(np.median([heights.get(i, 0.0) for i in above]))
    on_edge = set(np.unique(labels[:, -1, :]).tolist()) if cut_below else set()
    for i in below:
        if heights.get(i, 0.0) < BODY_HEIGHT_FRACTION * typical and i not in on_edge:
            labels[labels == i] = 0
            del seed_centres[i]


def _vertebra_instances(
    vertebrae: np.ndarray,
    spacing: tuple,
    discs: dict[int, np.ndarray],
    disc_depth_mm: float,
    cut_below: bool,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Split a (fragment-free) boolean vertebra mask (z, y, x) into vertebrae (step 3a-e).
    cut_below: the mask's last row is the scan's last row (the field of view ends there).

    The split is computed with in-plane voxels of about WORK_SPACING_MM (blocks of the scan's
    voxels, set where any voxel is) and taken back to every vertebra voxel of the scan.
    Returns (labels, seed centres): uint32 (z, y, x) labels 1..n, and per label the centroid
    of its seed in frame mm (ap, inferior, lateral).
    """
    factors = (1,) + tuple(max(1, round(WORK_SPACING_MM / s)) for s in spacing[1::-1])
    coarse = _pool(vertebrae, factors)
    work_spacing = tuple(s * f for s, f in zip(spacing, factors[::-1], strict=True))
    origin = tuple((f - 1) / 2 * s for s, f in zip(spacing, factors[::-1], strict=True))
    mask_image = _frame_image(coarse.astype(np.uint8), work_spacing, origin)
    distance = sitk.SignedMaurerDistanceMap(mask_image, True, False, True)  # inside positive
    seeds, radius = _seeds(mask_image, distance, discs, disc_depth_mm)
    if not seeds.any():
        return np.zeros(vertebrae.shape, np.uint32), {}
    seed_image = _frame_image(seeds, work_spacing, origin)
    seed_centres, _ = _shapes(seed_image)
    # d: flood the seeded connected components from the seeds over -d + ridge. For speed the
    # background beyond a one-voxel moat is a marker of its own; the moat lies above every
    # vertebra voxel, so that vertebra voxels are reached from the seeds only.
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask_image, True))
    seeded = np.isin(components, np.unique(components[seeds > 0]))
    ridge = LEVEL_RIDGE * radius * _level_ridge(coarse, work_spacing, origin, seed_centres, discs)
    landscape = np.where(coarse, -sitk.GetArrayViewFromImage(distance) + ridge, ridge.max() + 1)
    moat = sitk.BinaryDilate(mask_image, (1, 1, 1), sitk.sitkBox)  # 26-neighbourhood
    near = sitk.GetArrayViewFromImage(moat) > 0
    markers = np.where(near, seeds, np.uint32(seeds.max() + 1))
    landscape_image = _frame_image(landscape.astype(np.float32), work_spacing, origin)
    labels = _watershed(landscape_image, markers).astype(np.uint32)
    labels[~seeded] = 0
    _drop_sacrum(labels, work_spacing, origin, seed_centres, discs, disc_depth_mm, cut_below)
    # e: each remaining piece, whole, goes to the vertebra whose body it is level with
    pieces = coarse & ~seeded
    if pieces.any() and seed_centres:
        piece_ids = np.where(pieces, components, 0).astype(np.uint32)
        owner = _assign_pieces(piece_ids, mask_image, labels, seed_centres, discs, disc_depth_mm)
        labels[pieces] = owner[piece_ids[pieces]]
    fine = _unpool(labels, factors, vertebrae.shape)
    return np.where(vertebrae, fine, np.uint32(0)), seed_centres


def separate_instances(
    classes: sitk.Image,
    vertebra_class: int,
    disc_class: int,
    canal_class: int | None,
    min_instance_mm3: float,
) -> sitk.Image:
    """Class-index mask -> SPIDER-numbered instance mask, in the same geometry.

    classes: integer class-index mask (0 background), any orientation, spacing in mm;
    vertebra_class / disc_class / canal_class: the class index of all vertebrae / all discs /
    the spinal canal (canal_class None: no canal class, nothing becomes 100); min_instance_mm3:
    connected pieces of a class, and final instances, smaller than this volume (mm^3) become 0.
    Other class values become 0.
    Returns a uint16 image with exactly the input's size, spacing, origin and direction:
    vertebrae 1..n from the lowest (1 = L5), 100 + n for a partially visible topmost
    vertebra, 100 canal, 200 + k for the disc below vertebra k. See the module docstring.
    """
    if classes.GetDimension() != 3 or classes.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"classes must be a 3-D scalar image, got {classes.GetDimension()}-D with "
            f"{classes.GetNumberOfComponentsPerPixel()} components per pixel"
        )
    if "float" in classes.GetPixelIDTypeAsString():
        raise ValueError(f"classes must hold integers, got {classes.GetPixelIDTypeAsString()}")
    if vertebra_class == disc_class or canal_class in (vertebra_class, disc_class):
        raise ValueError(
            f"the class indices must differ: vertebra {vertebra_class}, disc {disc_class}, "
            f"canal {canal_class}"
        )
    if not min_instance_mm3 >= 0:
        raise ValueError(f"min_instance_mm3 must be >= 0, got {min_instance_mm3}")
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        classes.GetDirection()
    )
    pir = sitk.DICOMOrient(classes, CANONICAL)
    spacing = tuple(float(s) for s in pir.GetSpacing())  # (ap, si, lateral) mm
    array = sitk.GetArrayFromImage(pir)
    result = np.zeros(array.shape, np.uint16)

    wanted = [c for c in (vertebra_class, disc_class, canal_class) if c is not None]
    foreground = np.isin(array, wanted)
    notes: list[str] = []
    if foreground.any():
        # work inside the bounding box of the three classes (plus one voxel where possible)
        box = tuple(
            slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(foreground)
        )
        result[box], notes = _instances_in_box(
            array[box],
            spacing,
            vertebra_class,
            disc_class,
            canal_class,
            min_instance_mm3,
            touches_top=box[1].start == 0,
            touches_bottom=box[1].stop >= array.shape[1],
        )

    out = sitk.GetImageFromArray(result)
    out.CopyInformation(pir)
    out = sitk.DICOMOrient(out, orientation)
    if out.GetSize() != classes.GetSize():  # DICOMOrient permutes axes; cannot differ
        raise RuntimeError(f"reorientation changed the size {classes.GetSize()}")
    out.CopyInformation(classes)  # exact geometry, free of round-off from the round trip
    if notes:  # (an empty metadata value is not written to a file)
        out.SetMetaData(LEVEL_NOTE_KEY, "; ".join(notes))
    return out


def _instances_in_box(
    array: np.ndarray,
    spacing: tuple,
    vertebra_class: int,
    disc_class: int,
    canal_class: int | None,
    min_mm3: float,
    touches_top: bool,
    touches_bottom: bool,
) -> tuple[np.ndarray, list[str]]:
    """The instance step on a (z, y, x) PIR array; touches_top / touches_bottom: row 0 / the
    last row is the scan's top / bottom row. Returns (SPIDER labels, level notes)."""
    voxel_mm3 = float(np.prod(spacing))
    result = np.zeros(array.shape, np.uint16)

    disc_components = _components(array == disc_class, spacing, min_mm3)
    disc_centres, disc_depths = _shapes(_frame_image(disc_components, spacing))
    disc_volumes = np.bincount(disc_components.ravel())
    typical_disc = float(np.median(disc_volumes[list(disc_centres)])) if disc_centres else 0.0
    landmarks = {  # discs, not small pieces: the column and the levels are set by these
        i: c
        for i, c in disc_centres.items()
        if disc_volumes[i] >= DISC_PIECE_FRACTION * typical_disc
    }
    disc_depth = float(np.median([disc_depths[i] for i in landmarks])) if landmarks else 0.0

    vertebrae = _components(array == vertebra_class, spacing, min_mm3) > 0
    labels, seed_centres = _vertebra_instances(
        vertebrae, spacing, landmarks, disc_depth, touches_bottom
    )
    counts = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
    alive = {
        i: c for i, c in seed_centres.items() if counts[i] > 0 and counts[i] * voxel_mm3 >= min_mm3
    }
    vertebra_numbers, disc_numbers, notes = number_levels(
        {i: -c[1] for i, c in alive.items()},
        {i: -c[1] for i, c in landmarks.items()},
        {i: -c[1] for i, c in disc_centres.items() if i not in landmarks},
    )
    lowest = _lowest_structure(labels, disc_components, alive, disc_centres)
    if touches_bottom and lowest is not None and lowest[:, -1, :].any():
        notes.insert(
            0,
            "the lowest structure touches the lower edge of the field of view: the sacrum "
            "may be out of view, so the lowest vertebra is called L5 unconfirmed",
        )

    lookup = np.zeros(int(labels.max()) + 1, np.uint16)
    for i, number in vertebra_numbers.items():
        lookup[i] = number if number <= MAX_LEVEL else 0
    top = max(vertebra_numbers, key=vertebra_numbers.get, default=None)
    if touches_top and top is not None and vertebra_numbers[top] <= MAX_LEVEL:
        same_top = [i for i, n in vertebra_numbers.items() if n == vertebra_numbers[top]]
        below = [i for i, n in vertebra_numbers.items() if n == vertebra_numbers[top] - 1]
        on_border = bool(np.isin(labels[:, 0, :], same_top).any())
        top_volume = sum(counts[i] for i in same_top)
        if (
            below
            and on_border
            and top_volume < PARTIAL_VOLUME_RATIO * sum(counts[i] for i in below)
        ):
            lookup[same_top] += PARTIAL_OFFSET
    result[:] = lookup[labels]

    disc_lookup = np.zeros(int(disc_components.max()) + 1, np.uint16)
    for i, k in disc_numbers.items():
        disc_lookup[i] = DISC_OFFSET + k if k <= MAX_LEVEL else 0
    discs = disc_lookup[disc_components]
    result[discs > 0] = discs[discs > 0]

    if canal_class is not None:
        result[_components(array == canal_class, spacing, min_mm3) > 0] = CANAL_LABEL
    return result, notes


def _lowest_structure(
    labels: np.ndarray,
    disc_components: np.ndarray,
    vertebrae: dict[int, np.ndarray],
    discs: dict[int, np.ndarray],
) -> np.ndarray | None:
    """Boolean (z, y, x) mask of the lowest numbered vertebra or disc (the largest centroid
    row), or None when there is none."""
    candidates = [(c[1], labels, i) for i, c in vertebrae.items()]
    candidates += [(c[1], disc_components, i) for i, c in discs.items()]
    if not candidates:
        return None
    _, array, i = max(candidates, key=lambda item: item[0])
    return array == i


def _half_level(heights: list[float], kinds: list[str]) -> float:
    """Typical distance (mm) from a vertebra to the next disc: the median distance between
    neighbours of different kinds (heights sorted), else half the median distance between
    neighbours of one kind; inf for a single structure."""
    steps = np.diff(heights)
    mixed = [d for d, a, b in zip(steps, kinds, kinds[1:], strict=False) if a != b]
    if mixed:
        return float(np.median(mixed))
    return float(np.median(steps)) / 2 if len(steps) else np.inf


def number_levels(
    vertebrae: dict[int, float], discs: dict[int, float], pieces: dict[int, float] | None = None
) -> tuple[dict[int, int], dict[int, int], list[str]]:
    """Level numbers of vertebrae and discs from their heights along the spine.

    vertebrae / discs: id -> height (mm, larger = more superior) of a vertebral body's centre
    / a disc's centroid; pieces: small disc pieces (id -> height), which are no landmarks:
    each takes the disc number nearest to its height on the scale the others set, or none
    (left out of the result) when that is below L5/S1, in the sacrum. Returns
    (vertebra numbers: 1 = L5 upward; disc numbers (discs and pieces): k = the disc directly
    below vertebra k, 1 = L5/S1; notes: why a name may be wrong, [] when the sequence is
    complete).

    The rule: going up from the lowest structure, vertebrae and discs alternate, one
    half-level (H, the median distance between neighbours of different kinds) apart. The
    lowest structure is the L5/S1 disc, or L5 if it is a vertebra (the sacrum below L5/S1 is
    unlabelled in SPIDER; bodies below the lowest disc were removed before). Each next
    structure takes the level the distance from the previous one says: a neighbour of the
    other kind ~1 H up is the next half-level; one of the same kind less than 1 H up is a
    piece of the same level (a disc in two pieces, a body split in two), farther up a level
    (or more) is missing between them, which is noted. Numbering from the bottom keeps a
    false fragment or a missed structure high in the column from renaming the levels below.
    """
    items = sorted(
        [(h, "vertebra", i) for i, h in vertebrae.items()]
        + [(h, "disc", i) for i, h in discs.items()]
    )
    if not items:
        return {}, {}, []
    heights, kinds = [h for h, _, _ in items], [k for _, k, _ in items]
    half = _half_level(heights, kinds)
    notes = []
    if not vertebrae:
        notes.append("no vertebra found: discs counted upward from the lowest as L5/S1")
    elif not discs:
        notes.append("no disc found: vertebrae counted upward from the lowest as L5")
    elif kinds[0] == "vertebra":
        notes.append("no disc below the lowest vertebra: it is called L5 (L5/S1 disc not found)")
    position = 1 if kinds[0] == "disc" else 2  # half-levels: 2k = vertebra k, 2k - 1 = disc k
    positions = [position]
    gaps = []  # (half-level below, half-level above) with structures missing between them
    for step, previous, kind in zip(np.diff(heights), kinds, kinds[1:], strict=False):
        s = step / half
        if kind != previous:  # an odd number of half-levels: 1, 3, ...
            move = 2 * max(0, int(np.floor((s - 1) / 2 + 0.5))) + 1
        else:  # an even number: 0 (a piece of the same level), 2, ...
            move = 2 * int(np.floor(s / 2 + 0.5)) if s >= 1 else 0
        if move > 1 and vertebrae and discs:
            gaps.append((position, position + move))
        position += move
        positions.append(position)
    vertebra_numbers = {
        i: q // 2 for q, (_, k, i) in zip(positions, items, strict=True) if k == "vertebra"
    }
    disc_numbers = {
        i: (q + 1) // 2 for q, (_, k, i) in zip(positions, items, strict=True) if k == "disc"
    }
    for i, height in (pieces or {}).items():
        if len(items) == 1 or not np.isfinite(half):
            disc_numbers[i] = max(1, (positions[0] + 1) // 2)
            continue
        # half-level position: interpolated between the structures, extrapolated beyond
        low, high = heights[0], heights[-1]
        if height < low:
            q = positions[0] - (low - height) / half
        elif height > high:
            q = positions[-1] + (height - high) / half
        else:
            q = float(np.interp(height, heights, positions))
        nearest = int(np.floor((q + 1) / 2 + 0.5))  # the nearest disc, at half-level 2k - 1
        if nearest >= 1:  # nearer to a disc below L5/S1: in the sacrum, unnumbered
            disc_numbers[i] = nearest
    found = {2 * k - 1 for k in disc_numbers.values()}  # a piece may fill a disc's gap
    for below, above in gaps:
        missing = [_half_level_name(q) for q in range(below + 1, above) if q not in found]
        if missing:
            notes.append(
                f"not found between {_half_level_name(below)} and {_half_level_name(above)}: "
                f"{', '.join(missing)}"
            )
    return vertebra_numbers, disc_numbers, notes


def _half_level_name(position: int) -> str:
    """Half-level 2k -> vertebra k's name, 2k - 1 -> the name of disc k (below vertebra k)."""
    if position % 2 == 0:
        return level_name(min(position // 2, MAX_LEVEL))
    return level_name(DISC_OFFSET + min((position + 1) // 2, MAX_LEVEL)) + " disc"


def instance_table(instances: sitk.Image) -> pd.DataFrame:
    """One row per instance label of a SPIDER-numbered mask (any orientation).

    Columns: label, structure ('vertebra', 'partial vertebra', 'disc', 'canal'), level
    (level_name; '' for the canal), volume_mm3, centroid_x_mm / centroid_y_mm / centroid_z_mm
    (physical LPS coordinates as ITK uses them: x towards the patient's Left, y Posterior,
    z Superior), si_extent_mm (extent of the instance's voxels along the physical S-I axis z,
    voxel size included: (max - min of the voxel-centre z) + the voxel's own extent along z).
    level_note (the same on every row: why the scan's level names may be wrong, '' when the
    sequence is complete; from the image's LEVEL_NOTE_KEY metadata, which separate_instances
    sets and an .mha file keeps).
    Rows sorted by label. Raises ValueError for a value that is not a SPIDER label.
    """
    columns = [
        "label",
        "structure",
        "level",
        "volume_mm3",
        "centroid_x_mm",
        "centroid_y_mm",
        "centroid_z_mm",
        "si_extent_mm",
        "level_note",
    ]
    labels = sitk.Cast(instances, sitk.sitkUInt16)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(labels)
    if not shape.GetLabels():
        return pd.DataFrame(columns=columns)

    # physical z of every voxel centre, as an intensity image for per-label min / max
    size = labels.GetSize()
    spacing = np.array(labels.GetSpacing())
    row_z = np.array(labels.GetDirection()).reshape(3, 3)[2] * spacing  # dz per index step
    k, j, i = (np.arange(n, dtype=np.float64) for n in size[::-1])
    z = (
        labels.GetOrigin()[2]
        + row_z[2] * k[:, None, None]
        + row_z[1] * j[None, :, None]
        + row_z[0] * i[None, None, :]
    )
    z_image = sitk.GetImageFromArray(z.astype(np.float64))
    z_image.CopyInformation(labels)
    z_stats = sitk.LabelIntensityStatisticsImageFilter()
    z_stats.Execute(labels, z_image)
    voxel_extent = float(np.abs(row_z).sum())

    rows = []
    for label in shape.GetLabels():
        x, y, zc = shape.GetCentroid(label)
        rows.append(
            {
                "label": int(label),
                "structure": _structure(int(label)),
                "level": level_name(int(label)),
                "volume_mm3": shape.GetPhysicalSize(label),
                "centroid_x_mm": x,
                "centroid_y_mm": y,
                "centroid_z_mm": zc,
                "si_extent_mm": z_stats.GetMaximum(label)
                - z_stats.GetMinimum(label)
                + voxel_extent,
                "level_note": level_note(instances),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def discs_only(instances: sitk.Image) -> sitk.Image:
    """The discs (labels > 200) of a SPIDER-numbered mask, everything else 0; same geometry,
    uint16."""
    array = sitk.GetArrayFromImage(instances)
    discs = sitk.GetImageFromArray(np.where(array > DISC_OFFSET, array, 0).astype(np.uint16))
    discs.CopyInformation(instances)
    return discs


def level_note(instances: sitk.Image) -> str:
    """The level note that separate_instances stored with an instance mask ('' if none)."""
    return instances.GetMetaData(LEVEL_NOTE_KEY) if instances.HasMetaDataKey(LEVEL_NOTE_KEY) else ""


REPORT_SUFFIXES = ("_instances.mha", "_instances.csv", "_qc.json", "_levels.png")  # per scan


def write_instances(
    instances: sitk.Image,
    folder: Path,
    name: str,
    scan: sitk.Image | None = None,
    confidence: sitk.Image | None = None,
) -> tuple[list[Path], dict]:
    """The report of one scan, written atomically: folder/<name>_instances.mha (the level note
    in its header), <name>_instances.csv (instance_table with the measurements per level of
    measure.measure_levels and their notes), <name>_qc.json (measure.quality_flags; the
    low-confidence flag where confidence, the largest class probability per voxel, is given)
    and <name>_levels.png (measure.plot_levels, on the scan where given). Returns (the paths,
    the CSV's table, the quality flags)."""
    from measure import measure_levels, plot_levels, quality_flags, write_qc

    paths = [folder / f"{name}{suffix}" for suffix in REPORT_SUFFIXES]
    atomic_write_image(instances, paths[0])
    measurements = measure_levels(instances)
    table = instance_table(instances).merge(measurements, on="label", how="left")
    write_csv(table, paths[1])
    qc = quality_flags(instances, measurements, confidence)
    write_qc(qc, paths[2])
    plot_levels(instances, measurements, qc, paths[3], scan)
    return paths, table, qc


def main(argv: list[str] | None = None) -> int:
    """python instances.py MASK [MASK ...] --output-dir DIR [--config FILE]"""
    from measure import flag_line

    parser = driver_arguments(
        "Run the instance step on class-index masks (0 background, then the classes of the "
        "configuration's [labels] in order; by default 1 vertebrae, 2 discs, 3 canal)"
    )
    parser.add_argument("masks", type=Path, nargs="+", metavar="MASK")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the results")
    parser.add_argument(
        "--min-instance-mm3",
        type=float,
        help="drop pieces smaller than this (default: the configuration's [testing] value)",
    )
    args = parser.parse_args(argv)
    if args.min_instance_mm3 is not None and not (
        np.isfinite(args.min_instance_mm3) and args.min_instance_mm3 >= 0
    ):
        parser.error(f"--min-instance-mm3 {args.min_instance_mm3}: a volume in mm^3, >= 0")
    try:
        stems = output_names(args.masks, output_stem)
        check_outputs(args.output_dir, stems, REPORT_SUFFIXES)
    except UnsafePathError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNSAFE
    try:
        config = load_config(args.config, args.overrides)
        vertebra, disc, canal = instance_classes(config.labels.class_names)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    min_mm3 = (
        config.testing.min_instance_mm3 if args.min_instance_mm3 is None else args.min_instance_mm3
    )
    failed = 0
    for path in args.masks:
        try:
            classes = read_scan(path, "mask")
            names = config.labels.class_names
            found = set(np.unique(sitk.GetArrayViewFromImage(classes)).tolist())
            if not found <= set(range(len(names))):
                raise CaseError(
                    f"mask {path.name} holds values {sorted(found)}; class-index masks hold "
                    f"0-{len(names) - 1} ({', '.join(names)})"
                )
            instances = separate_instances(classes, vertebra, disc, canal, min_mm3)
        except (CaseError, ValueError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        written, _, qc = write_instances(instances, args.output_dir, stems[path])
        note = level_note(instances)
        levels = f" (levels: {note})" if note else ""
        print(f"{path} -> {', '.join(map(str, written))}{levels}; qc: {flag_line(qc)}")
    return 1 if failed else 0


def output_stem(path: Path) -> str:
    """'mask.nii.gz' -> 'mask'."""
    parts = split_suffix(path.name)
    return parts[0] if parts else path.stem


if __name__ == "__main__":
    sys.exit(interruptible(main))
