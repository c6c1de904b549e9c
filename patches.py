"""Patches for the spacing mode: padding, foreground-oversampled patch sampling, and Gaussian-
weighted sliding-window inference.

In the spacing mode every case is resampled to one physical spacing, so each volume has its own
size. Training draws fixed-size random patches from those volumes; inference tiles a volume with
overlapping windows and blends them.

Conventions:
- Volumes are in numpy/torch order (slices D, height H, width W) = (z, y, x), as stored by
  preprocess_script.py. Images carry a channel axis in front: (C, D, H, W); masks do not:
  (D, H, W) class indices. Batches put the batch axis first.
- Every size, start and patch size is in voxels (z, y, x), never millimetres: the physical
  spacing is fixed upstream by the resampling.
- Random draws use an explicit CPU torch.Generator. Patch positions are planned on the host (a
  few scalars per patch); only the crops touch the volumes, on whatever device they live. So a
  GPU-cached dataset is sampled without a host/device synchronisation.

Sliding window: our own `sliding_window_probabilities` rather than MONAI's
`sliding_window_inference`. MONAI is not installed here and would be a heavy dependency for one
small function; ours is about forty lines, tested against whole-volume prediction, and uses the
same window placement (nnU-Net's `compute_steps_for_sliding_window`) and the same Gaussian
importance map (nnU-Net's `compute_gaussian`, MONAI's `compute_importance_map(mode="gaussian")`,
both with sigma = patch size / 8).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Size3 = tuple[int, int, int]
Region = tuple[slice, slice, slice]


def _check_size3(name: str, size: Sequence[int]) -> Size3:
    """A (z, y, x) size of three positive ints, else ValueError naming it."""
    values = tuple(int(s) for s in size)
    if len(values) != 3 or any(v < 1 for v in values) or values != tuple(size):
        raise ValueError(f"{name} must be three positive ints (z, y, x), got {tuple(size)}")
    return values  # type: ignore[return-value]


def _check_fits(shape: Sequence[int], patch_size: Size3) -> None:
    if any(s < p for s, p in zip(shape, patch_size, strict=True)):
        raise ValueError(
            f"volume (D, H, W) {tuple(shape)} is smaller than the patch {patch_size} on some "
            "axis: pad it first with pad_to_patch"
        )


def _check_generator(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (patch positions are planned on the "
            f"host), got one on {generator.device}"
        )


def pad_to_patch(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: Size3,
    image_fill: float,
) -> tuple[torch.Tensor, torch.Tensor | None, Region]:
    """Pad a volume symmetrically so that it is at least one patch on every axis.

    image: (C, D, H, W), any float dtype; padded with `image_fill` (the caller's background
    value, e.g. 0 for a z-scored image, as nnU-Net does). mask: (D, H, W) class indices, padded
    with 0 (background), or None. patch_size: (pd, ph, pw) voxels.
    An axis shorter than the patch gets (patch - size) // 2 voxels before and the rest after;
    other axes are untouched. A case smaller than a patch is thus padded, never skipped. Where
    nothing needs padding, the inputs come back as they are (no copy).

    Returns (image (C, D', H', W'), mask (D', H', W') or None, region): `region` is the
    (z, y, x) slices of the original volume inside the padded one, so
    `padded[(slice(None), *region)]` (or `probabilities[:, region[0], region[1], region[2]]`)
    recovers the original extent.
    """
    patch_size = _check_size3("patch_size", patch_size)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    shape = tuple(image.shape[1:])
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the image's (D, H, W) {shape}"
        )
    before = [max(0, p - s) // 2 for s, p in zip(shape, patch_size, strict=True)]
    after = [max(0, p - s) - b for s, p, b in zip(shape, patch_size, before, strict=True)]
    region = tuple(slice(b, b + s) for b, s in zip(before, shape, strict=True))
    if not any(before) and not any(after):
        return image, mask, region  # type: ignore[return-value]
    # F.pad lists the last axis first: (x before, x after, y before, y after, z ...).
    pad = [n for b, a in zip(reversed(before), reversed(after), strict=True) for n in (b, a)]
    image = F.pad(image, pad, mode="constant", value=image_fill)
    if mask is not None:
        mask = F.pad(mask, pad, mode="constant", value=0)
    return image, mask, region  # type: ignore[return-value]


def foreground_index(mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Where each foreground class lies: {class value: flat voxel indices}, computed once per
    volume and reused for every patch drawn from it.

    mask: (D, H, W) class indices, any integer dtype, any device. Classes > 0 that occur, in
    increasing order; each index tensor is int64, 1-D, sorted, on the CPU, indexing the
    flattened (D, H, W) volume (z * H * W + y * W + x). Background (0) and negative values are
    left out. One pass over the volume, then one per class over the foreground voxels only
    (about 25 ms for a 60x160x150 mask with 3 classes on one CPU thread). Memory: 8 bytes per
    foreground voxel.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be (D, H, W), got shape {tuple(mask.shape)}")
    flat = mask.detach().reshape(-1).cpu()
    voxels = torch.nonzero(flat > 0).reshape(-1)
    values = flat[voxels].long()
    present = torch.nonzero(torch.bincount(values)).reshape(-1).tolist()
    return {label: voxels[values == label] for label in present}


def foreground_patch_count(
    count: int, foreground_fraction: float, generator: torch.Generator
) -> int:
    """How many of `count` patches are centred on foreground: floor(count * fraction), plus one
    more with probability equal to the remainder, so the expected share is exactly
    `foreground_fraction` at every count.

    nnU-Net forces the samples with index >= round(batch * (1 - fraction)): at its default
    fraction 0.33 that is 1 of 2 (50%), and 0 of 1, so a batch of one is never oversampled.
    With our rule a batch of 2 at 0.33 gets one forced patch in 66% of batches (33%), and a
    batch of 1 in 33% of them.
    """
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    _check_generator(generator)
    expected = count * foreground_fraction
    whole = math.floor(expected)
    extra = torch.rand((), generator=generator).item() < expected - whole
    return min(count, whole + int(extra))


def _uniform_starts(shape: Size3, patch_size: Size3, count: int, generator) -> torch.Tensor:
    """(count, 3) int64 starts, each axis uniform over 0 .. size - patch (inclusive)."""
    columns = [
        torch.randint(s - p + 1, (count,), generator=generator)
        for s, p in zip(shape, patch_size, strict=True)
    ]
    return torch.stack(columns, dim=1)


def _foreground_start(
    shape: Size3, patch_size: Size3, foreground: dict[int, torch.Tensor], generator
) -> torch.Tensor:
    """(3,) int64 start of a patch centred on a random voxel of a random present class (the
    class first, so a rare class is drawn as often as a common one), clipped into the volume.
    The voxel then sits at patch // 2 in the patch, or nearer the volume's edge where clipped."""
    classes = list(foreground)
    chosen = foreground[classes[int(torch.randint(len(classes), (), generator=generator))]]
    flat = int(chosen[int(torch.randint(len(chosen), (), generator=generator))])
    _, height, width = shape
    voxel = (flat // (height * width), (flat // width) % height, flat % width)
    start = [
        min(max(v - p // 2, 0), s - p) for v, p, s in zip(voxel, patch_size, shape, strict=True)
    ]
    return torch.tensor(start, dtype=torch.int64)


def sample_patch_starts(
    mask: torch.Tensor,
    patch_size: Size3,
    count: int,
    foreground_fraction: float,
    generator: torch.Generator,
    foreground: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Starts of `count` patches in one volume, with nnU-Net-style foreground oversampling.

    mask: (D, H, W) class indices of a volume already padded to at least `patch_size`
    (pad_to_patch). patch_size: (pd, ph, pw) voxels. foreground: foreground_index(mask), or None
    to compute it here (pass it when drawing repeatedly from the same volume).

    The last `foreground_patch_count(count, foreground_fraction)` patches are centred on a
    foreground voxel: a class present in the mask is picked uniformly, then one of its voxels;
    the patch is clipped to stay inside the volume. The others (and all of them where the mask
    has no foreground) have a start uniform over 0 .. size - patch on each axis: patches never
    leave the volume, so a voxel near an edge is covered by fewer of them than a central one.

    Returns (count, 3) int64 (z, y, x) starts on the CPU; patch i is
    volume[..., z:z + pd, y:y + ph, x:x + pw].
    """
    patch_size = _check_size3("patch_size", patch_size)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (D, H, W), got shape {tuple(mask.shape)}")
    shape: Size3 = tuple(mask.shape)  # type: ignore[assignment]
    _check_fits(shape, patch_size)
    _check_generator(generator)
    forced = foreground_patch_count(count, foreground_fraction, generator)
    starts = _uniform_starts(shape, patch_size, count, generator)
    if forced:
        if foreground is None:
            foreground = foreground_index(mask)
        if foreground:
            for i in range(count - forced, count):
                starts[i] = _foreground_start(shape, patch_size, foreground, generator)
    return starts


def _check_starts(shape: Sequence[int], starts: torch.Tensor, patch_size: Size3) -> list:
    if starts.ndim != 2 or starts.shape[1] != 3:
        raise ValueError(f"starts must be (N, 3), got shape {tuple(starts.shape)}")
    rows = starts.tolist()
    for row in rows:
        if any(r < 0 or r + p > s for r, p, s in zip(row, patch_size, shape, strict=True)):
            raise ValueError(
                f"patch start {tuple(row)} + {patch_size} leaves the volume (D, H, W) "
                f"{tuple(shape)}"
            )
    return rows


def crop_patches(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    starts: torch.Tensor,
    patch_size: Size3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut patches out of one volume at given starts.

    image: (C, D, H, W); mask: (D, H, W) or None; starts: (N, 3) int64 (z, y, x), each patch
    inside the volume (else ValueError); patch_size: (pd, ph, pw) voxels.
    Returns (images (N, C, pd, ph, pw), masks (N, pd, ph, pw) or None): new tensors (copies),
    with the inputs' dtypes and device.
    """
    patch_size = _check_size3("patch_size", patch_size)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    rows = _check_starts(image.shape[1:], starts, patch_size)
    windows = [tuple(slice(r, r + p) for r, p in zip(row, patch_size, strict=True)) for row in rows]
    images = torch.stack([image[(slice(None), *w)] for w in windows])
    masks = None if mask is None else torch.stack([mask[w] for w in windows])
    return images, masks


def sample_batch(
    volumes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    patch_size: Size3,
    foreground_fraction: float,
    generator: torch.Generator,
    foreground: Sequence[dict[int, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: `batch_size` patches, each from a volume drawn uniformly with
    replacement (as nnU-Net does).

    volumes: (image (C, D, H, W), mask (D, H, W)) pairs of different sizes, each already padded
    to at least `patch_size` (pad_to_patch), all with the same C, on one device (e.g. a cache on
    the GPU). foreground: [foreground_index(mask) for each volume], computed once and passed at
    every call; None computes them here (a pass over every foreground voxel each time).
    The last foreground_patch_count(batch_size, foreground_fraction) patches of the batch are
    centred on foreground, as in sample_patch_starts; the rest are uniform.

    Returns (images (B, C, pd, ph, pw), masks (B, pd, ph, pw)), dtypes and device of the inputs.
    """
    patch_size = _check_size3("patch_size", patch_size)
    if not volumes:
        raise ValueError("volumes is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if foreground is not None and len(foreground) != len(volumes):
        raise ValueError(f"foreground has {len(foreground)} entries for {len(volumes)} volumes")
    _check_generator(generator)
    chosen = torch.randint(len(volumes), (batch_size,), generator=generator).tolist()
    forced = foreground_patch_count(batch_size, foreground_fraction, generator)
    images, masks = [], []
    for i, v in enumerate(chosen):
        image, mask = volumes[v]
        shape: Size3 = tuple(mask.shape)  # type: ignore[assignment]
        _check_fits(shape, patch_size)
        start = _uniform_starts(shape, patch_size, 1, generator)[0]
        if i >= batch_size - forced:
            index = foreground_index(mask) if foreground is None else foreground[v]
            if index:
                start = _foreground_start(shape, patch_size, index, generator)
        image_patch, mask_patch = crop_patches(image, mask, start[None], patch_size)
        images.append(image_patch[0])
        masks.append(mask_patch[0])
    return torch.stack(images), torch.stack(masks)


def gaussian_weights(patch_size: Size3, sigma_scale: float = 1 / 8) -> torch.Tensor:
    """nnU-Net's importance map for blending windows: (pd, ph, pw) float32 on the CPU.

    A separable Gaussian exp(-sum_i (x_i - c_i)^2 / (2 sigma_i^2)) with sigma_i =
    patch_size_i * sigma_scale voxels, normalised to a maximum of 1; any value that underflows
    to 0 is replaced by the smallest non-zero value, so every voxel keeps a positive weight.
    The centre is c_i = (patch_size_i - 1) / 2: the map is symmetric, and for odd sizes equal
    to nnU-Net's (scipy gaussian_filter of a delta, peak 1 at the central voxel). For even
    sizes nnU-Net and MONAI put the peak on voxel patch_size // 2, half a voxel off-centre;
    here the two (per axis) central voxels share the maximum.
    """
    patch_size = _check_size3("patch_size", patch_size)
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    axes = []
    for p in patch_size:
        x = torch.arange(p, dtype=torch.float64) - (p - 1) / 2
        axes.append(torch.exp(-(x**2) / (2 * (p * sigma_scale) ** 2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = (weights / weights.max()).float()
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


def window_starts(size: Size3, patch_size: Size3, overlap: float) -> list[Size3]:
    """Starts of the sliding windows that tile a volume, as nnU-Net places them.

    size: the volume's (D, H, W) and patch_size: (pd, ph, pw), in voxels; the volume must be at
    least a patch on every axis (pad first with pad_to_patch). overlap: in [0, 1), the least
    share of a patch that neighbouring windows share along an axis.
    Per axis: target step = max(1, patch * (1 - overlap)); n = ceil((size - patch) / step) + 1
    windows; starts = round(i * (size - patch) / (n - 1)) for i = 0 .. n - 1, so they run
    evenly from 0 to exactly size - patch, with steps no longer than the target (overlap at
    least as requested, up to rounding) and every voxel covered.

    Returns the (z, y, x) starts of all windows, z outermost, then y, then x.
    """
    size = _check_size3("size", size)
    patch_size = _check_size3("patch_size", patch_size)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    _check_fits(size, patch_size)
    per_axis = []
    for s, p in zip(size, patch_size, strict=True):
        step = max(1.0, p * (1.0 - overlap))
        steps = math.ceil((s - p) / step) + 1
        spacing = (s - p) / (steps - 1) if steps > 1 else 0.0
        per_axis.append([round(i * spacing) for i in range(steps)])
    return list(itertools.product(*per_axis))


@torch.no_grad()
def sliding_window_probabilities(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Size3,
    overlap: float,
    num_classes: int,
    batch_size: int = 1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax probabilities of a whole volume from overlapping windows.

    predict: maps a batch (B, C, pd, ph, pw) to logits (B, num_classes, pd, ph, pw); it carries
    the model, autocast and memory layout (as test_unet.predict_probabilities does for a whole
    grid volume). It runs under torch.no_grad. image: (C, D, H, W), at least a patch on every
    axis (pad first with pad_to_patch; crop the result back with its region). patch_size:
    (pd, ph, pw) voxels; overlap in [0, 1) as in window_starts. Windows are predicted
    `batch_size` at a time. weights: (pd, ph, pw) positive blending weights, by default
    gaussian_weights(patch_size).

    Returns (num_classes, D, H, W) float32 on the image's device: per voxel, the weighted mean
    over the windows covering it of their softmax probabilities, sum(w * p) / sum(w),
    accumulated in float32. Each voxel's probabilities sum to 1.
    """
    patch_size = _check_size3("patch_size", patch_size)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size: Size3 = tuple(image.shape[1:])  # type: ignore[assignment]
    starts = window_starts(size, patch_size, overlap)
    device = image.device
    if weights is None:
        weights = gaussian_weights(patch_size)
    if tuple(weights.shape) != patch_size:
        raise ValueError(f"weights shape {tuple(weights.shape)} is not the patch {patch_size}")
    weights = weights.to(device=device, dtype=torch.float32)
    summed = torch.zeros((num_classes, *size), dtype=torch.float32, device=device)
    weight_sum = torch.zeros((1, *size), dtype=torch.float32, device=device)
    expected = (num_classes, *patch_size)
    for first in range(0, len(starts), batch_size):
        group = starts[first : first + batch_size]
        windows = [
            tuple(slice(s, s + p) for s, p in zip(start, patch_size, strict=True))
            for start in group
        ]
        batch = torch.stack([image[(slice(None), *w)] for w in windows])
        logits = predict(batch)
        if logits.ndim != 5 or tuple(logits.shape[1:]) != expected or len(logits) != len(group):
            raise ValueError(
                f"predict returned logits of shape {tuple(logits.shape)} for a batch of "
                f"{tuple(batch.shape)}; expected ({len(group)}, {num_classes}, *{patch_size})"
            )
        weighted = logits.float().softmax(dim=1) * weights
        for w, window in enumerate(windows):
            summed[(slice(None), *window)] += weighted[w]
            weight_sum[(slice(None), *window)] += weights
    return summed.div_(weight_sum)


def model_predictor(
    model: torch.nn.Module, amp_dtype: torch.dtype | None, channels_last: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`predict` for sliding_window_probabilities: the model under autocast (amp_dtype, None for
    fp32) with channels_last_3d input where asked; float32 logits out."""

    def predict(batch: torch.Tensor) -> torch.Tensor:
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        enabled = amp_dtype is not None
        with torch.autocast(batch.device.type, dtype=amp_dtype, enabled=enabled):
            return model(batch).float()

    return predict


def window_probabilities(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch_size: Size3,
    overlap: float,
    num_classes: int,
    flip_slices: bool = False,
    batch_size: int = 1,
) -> torch.Tensor:
    """Probabilities (K, D, H, W) of one volume of any size: padded to the patch (with the
    image's minimum), predicted by sliding window, cropped back. image: (C, D, H, W).
    flip_slices: test-time augmentation, the mean with the prediction of the volume flipped
    left-right (the slice axis D), flipped back. batch_size: windows predicted at once (memory
    grows with it, not with the volume)."""
    padded, _, region = pad_to_patch(image, None, patch_size, float(image.min()))
    probabilities = sliding_window_probabilities(
        predict, padded, patch_size, overlap, num_classes, batch_size
    )
    if flip_slices:
        flipped = sliding_window_probabilities(
            predict, padded.flip(1), patch_size, overlap, num_classes, batch_size
        )
        probabilities = (probabilities + flipped.flip(1)) / 2
    return probabilities[(slice(None), *region)]


class PatchVolumes:
    """Preprocessed volumes of different sizes for the spacing mode, held on one device.

    Each volume: image (1, D, H, W) float32 padded to at least the patch (with its minimum),
    mask (D, H, W) uint8 padded with background, the region of the original inside the padding,
    and its foreground index (computed once). `batches` draws training patches, `volume` gives a
    whole case (cropped back to its original extent) for validation.
    """

    def __init__(
        self,
        image_paths: Sequence[str],
        mask_paths: Sequence[str],
        patch_size: Size3,
        device: torch.device,
    ) -> None:
        import SimpleITK as sitk  # only here: the rest of this module needs torch alone

        self.patch_size = _check_size3("patch_size", patch_size)
        self.items = []
        for image_path, mask_path in zip(image_paths, mask_paths, strict=True):
            image = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))))
            mask = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))))
            image, mask, region = pad_to_patch(
                image.float()[None], mask, self.patch_size, float(image.min())
            )
            index = foreground_index(mask)
            self.items.append((image.to(device), mask.to(device), region, index))

    def __len__(self) -> int:
        return len(self.items)

    def volume(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (1, D, H, W), mask (D, H, W)) of one case, without its padding."""
        image, mask, region, _ = self.items[position]
        return image[(slice(None), *region)], mask[region]

    def batches(
        self, steps: int, batch_size: int, foreground_fraction: float, generator: torch.Generator
    ):
        """`steps` training batches (images (B, 1, pd, ph, pw), masks (B, pd, ph, pw))."""
        volumes = [(image, mask) for image, mask, _, _ in self.items]
        foreground = [index for _, _, _, index in self.items]
        for _ in range(steps):
            yield sample_batch(
                volumes, batch_size, self.patch_size, foreground_fraction, generator, foreground
            )
