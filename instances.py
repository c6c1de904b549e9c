"""The instance step: a semantic class-index mask -> SPIDER-numbered instances, on the scan.

Runs after a semantic prediction has been mapped back onto the scan (or on any class-index
mask): one class index for all vertebrae, one for all intervertebral discs, one for the spinal
canal. The output follows SPIDER's numbering: vertebrae 1-25 counted upward from the lowest one
present (1 = L5; the sacrum is unlabelled), 101-125 a partially visible topmost vertebra
(100 + its number), 100 the spinal canal, discs 201-225 where 200 + k lies directly below
vertebra k (201 = L5/S1).

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
      too thin to be a seed, e.g. cut by the field of view).
   f. Numbering: vertebrae 1..n from the lowest seed upward (those beyond 25 are dropped).
      The topmost vertebra becomes 100 + n when it touches the superior border of the field
      of view (row 0 of the PIR scan) and has less than PARTIAL_VOLUME_RATIO x the volume of
      the vertebra below it. On the synthetic demo set this reproduces the generator's rule
      ("less than 70 % of the body height visible") in 116 of 120 small cases; the misses
      are cut vertebrae with 80 % or more of the volume of the one below.
4. Disc numbering: 200 + k with k = 1 + the number of vertebra seeds below the disc's centroid,
   i.e. the number of the vertebra directly above it (a disc above the topmost vertebra gets
   n + 1). Disc pieces between the same two vertebrae share one label. Without vertebrae the
   discs are numbered 201, 202, ... from the lowest. Numbers beyond 225 are dropped.
5. Canal: every canal voxel (fragments removed) -> 100.

Limitations: the lowest vertebra is always called L5 (a sacrum predicted as vertebra, or a
missed L5, shifts every level); stray vertebra blobs away from the spine are attached to the
vertebra they are level with unless smaller than min_instance_mm3; the thresholds were set on
the synthetic demo set and checked by eye on the 20 real SPIDER slabs (which carry no instance
labels), not measured against real instance masks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

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

# Vertebra names counted upward from L5 (k = 1): L5-L1, T12-T1, C7-C1.
_VERTEBRA_NAMES = (
    [f"L{i}" for i in range(5, 0, -1)]
    + [f"T{i}" for i in range(12, 0, -1)]
    + [f"C{i}" for i in range(7, 0, -1)]
)


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
        disc_centres = np.array(sorted(discs.values(), key=lambda c: c[1]))  # top to bottom

        def column_offset(i: int) -> float:  # mm in front of / behind the disc column
            ap = np.interp(centre[i][1], disc_centres[:, 1], disc_centres[:, 0])
            return abs(centre[i][0] - float(ap))

        def level(i: int) -> int:  # the number of disc centroids above the candidate
            return int(np.searchsorted(disc_centres[:, 1], centre[i][1]))

        in_column = {i for i in ids if column_offset(i) <= COLUMN_TOLERANCE * disc_depth_mm}
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
) -> np.ndarray:
    """Owner (vertebra label) per piece id (step 3e); may add new levels to seed_centres.

    piece_ids: (z, y, x) ids of the unseeded connected pieces (0 elsewhere), on the frame
    grid of image; labels: the seeded vertebrae (1..n) on the same grid.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(_frame_image(piece_ids, image.GetSpacing(), image.GetOrigin()))
    pieces = sorted(stats.GetLabels(), key=lambda i: -stats.GetNumberOfPixels(i))
    centre = {i: np.array(stats.GetCentroid(i)) for i in pieces}
    volumes = np.bincount(labels.ravel())[1:]
    typical_volume = float(np.median(volumes[volumes > 0]))
    level_height = _level_height(seed_centres, discs)
    owner = np.zeros(int(piece_ids.max()) + 1, np.uint32)
    for i in pieces:  # a large piece at a level of its own is a vertebra of its own
        offsets = _level_offsets(centre[i], seed_centres, discs)
        if (
            min(offsets.values()) > NEW_LEVEL_FRACTION * level_height
            and stats.GetNumberOfPixels(i) >= NEW_LEVEL_VOLUME * typical_volume
        ):
            owner[i] = max(seed_centres) + 1
            seed_centres[int(owner[i])] = centre[i]
    for i in pieces:
        if not owner[i]:
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


def _vertebra_instances(
    vertebrae: np.ndarray, spacing: tuple, discs: dict[int, np.ndarray], disc_depth_mm: float
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Split a (fragment-free) boolean vertebra mask (z, y, x) into vertebrae (step 3a-e).

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
    # e: each remaining piece, whole, goes to the vertebra whose body it is level with
    pieces = coarse & ~seeded
    if pieces.any():
        piece_ids = np.where(pieces, components, 0).astype(np.uint32)
        owner = _assign_pieces(piece_ids, mask_image, labels, seed_centres, discs)
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
    if foreground.any():
        # work inside the bounding box of the three classes (plus one voxel where possible)
        box = tuple(
            slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(foreground)
        )
        result[box] = _instances_in_box(
            array[box],
            spacing,
            vertebra_class,
            disc_class,
            canal_class,
            min_instance_mm3,
            touches_top=box[1].start == 0,
        )

    out = sitk.GetImageFromArray(result)
    out.CopyInformation(pir)
    out = sitk.DICOMOrient(out, orientation)
    if out.GetSize() != classes.GetSize():  # DICOMOrient permutes axes; cannot differ
        raise RuntimeError(f"reorientation changed the size {classes.GetSize()}")
    out.CopyInformation(classes)  # exact geometry, free of round-off from the round trip
    return out


def _instances_in_box(
    array: np.ndarray,
    spacing: tuple,
    vertebra_class: int,
    disc_class: int,
    canal_class: int | None,
    min_mm3: float,
    touches_top: bool,
) -> np.ndarray:
    """The instance step on a (z, y, x) PIR array; touches_top: row 0 is the scan's top row."""
    voxel_mm3 = float(np.prod(spacing))
    result = np.zeros(array.shape, np.uint16)

    disc_components = _components(array == disc_class, spacing, min_mm3)
    disc_centres, disc_depths = _shapes(_frame_image(disc_components, spacing))
    disc_depth = float(np.median(list(disc_depths.values()))) if disc_depths else 0.0

    vertebrae = _components(array == vertebra_class, spacing, min_mm3) > 0
    labels, seed_centres = _vertebra_instances(vertebrae, spacing, disc_centres, disc_depth)
    # drop instances below the minimum volume, then number them from the lowest seed upward
    counts = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
    alive = [i for i in seed_centres if counts[i] * voxel_mm3 >= min_mm3 and counts[i] > 0]
    order = sorted(alive, key=lambda i: -seed_centres[i][1])  # lowest (largest row) first
    order = order[:MAX_LEVEL]  # SPIDER numbers 25 vertebrae at most
    lookup = np.zeros(int(labels.max()) + 1, np.uint16)
    for number, i in enumerate(order, start=1):
        lookup[i] = number
    if len(order) >= 2 and touches_top:
        top, below = order[-1], order[-2]
        on_border = bool((labels[:, 0, :] == top).any())
        if on_border and counts[top] < PARTIAL_VOLUME_RATIO * counts[below]:
            lookup[top] += PARTIAL_OFFSET
    result[:] = lookup[labels]

    # discs: 200 + 1 + number of vertebra seeds below the disc's centroid
    seed_rows = np.array([seed_centres[i][1] for i in order])
    disc_lookup = np.zeros(int(disc_components.max()) + 1, np.uint16)
    by_height = sorted(disc_centres, key=lambda i: -disc_centres[i][1])
    for rank, i in enumerate(by_height, start=1):
        k = 1 + int(np.sum(seed_rows > disc_centres[i][1])) if len(order) else rank
        disc_lookup[i] = DISC_OFFSET + k if k <= MAX_LEVEL else 0
    discs = disc_lookup[disc_components]
    result[discs > 0] = discs[discs > 0]

    if canal_class is not None:
        result[_components(array == canal_class, spacing, min_mm3) > 0] = CANAL_LABEL
    return result


def instance_table(instances: sitk.Image) -> pd.DataFrame:
    """One row per instance label of a SPIDER-numbered mask (any orientation).

    Columns: label, structure ('vertebra', 'partial vertebra', 'disc', 'canal'), level
    (level_name; '' for the canal), volume_mm3, centroid_x_mm / centroid_y_mm / centroid_z_mm
    (physical LPS coordinates as ITK uses them: x towards the patient's Left, y Posterior,
    z Superior), si_extent_mm (extent of the instance's voxels along the physical S-I axis z,
    voxel size included: (max - min of the voxel-centre z) + the voxel's own extent along z).
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
            }
        )
    return pd.DataFrame(rows, columns=columns)
