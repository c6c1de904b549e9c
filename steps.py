"""One pass over the data: augmentation, the loss, the epoch loop, and its stopwatch.

Tensors: images (batch, 1, slices, height, width) float32, masks (batch, slices, height, width)
int64 class indices (PIR numpy order), whole grid volumes or patches (training_data.py).
train.fit and training_data's validation both call run_epoch; this module imports neither.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import TrainingConfig
from metrics import EpochTotals


class Stopwatch:
    """Wall seconds per named part of training, epoch by epoch (bench.py --profile).

    `with clock("forward"): ...` adds the block's seconds to that part; on CUDA the device is
    synchronised at both ends, so that queued kernels count in the part that launched them.
    `lap(seconds)` closes an epoch: its parts and its total go to `laps`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.laps: list[dict[str, float]] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.current[part] += time.perf_counter() - started

    def lap(self, seconds: float) -> None:
        self.laps.append({**self.current, "total": seconds})
        self.current = defaultdict(float)


def timer(clock: Stopwatch | None):
    """clock, or a stand-in whose parts time nothing."""
    return clock if clock is not None else (lambda part: nullcontext())


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    settings: TrainingConfig,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random spatial + intensity augmentation of a batch (B, 1, D, H, W) images and (B, D, H, W)
    masks, on its device.

    Spatial: rotation in the sagittal plane (+-aug_rotation_deg), isotropic scaling
    (1 +- aug_scale), optional left-right flip of the slice axis; never a superior-inferior
    flip. Each volume is rotated, and scaled, each with probability aug_spatial_probability
    (1: always; nnU-Net draws each with 0.2); one neither rotated nor scaled is sampled at its
    own voxel centres (unchanged, or mirrored). Images bilinear; masks nearest, or with
    aug_mask_interpolation = linear each class's indicator bilinear and the largest taken
    (nnU-Net's augmentation: a class boundary then moves with the image's, where nearest
    shifts it by up to half a voxel). With no rotation and no scaling configured, flips
    alone, exact and without resampling.
    Intensity: scale and shift (+-aug_intensity), gamma (exp(+-aug_gamma)) on a per-volume
    0..1 rescale, gaussian noise (std up to aug_noise); each skipped at 0.
    Random draws are made on the batch's device (no host round trip) with torch's global
    generators, whose states the checkpoints save. num_classes (linear masks only): the number
    of classes; None reads the batch's largest class index back from its device.
    """
    if settings.aug_rotation_deg or settings.aug_scale:
        images, masks = _affine(images, masks, settings, num_classes)
    elif settings.aug_flip_lr:
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
        images = torch.where(flip[:, None, None, None, None], images.flip(2), images)
        masks = torch.where(flip[:, None, None, None], masks.flip(1), masks)
    return _intensity(images, settings), masks


def _uniform(*shape: int, scale: float, device: torch.device) -> torch.Tensor:
    """Uniform draws in [-scale, scale)."""
    return (torch.rand(*shape, device=device) * 2 - 1) * scale


def _affine(
    images: torch.Tensor,
    masks: torch.Tensor,
    settings: TrainingConfig,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """augment_batch's rotation, scaling and flip, one resampling."""
    batch, device = images.shape[0], images.device
    depth, height, width = images.shape[2:]
    angle = _uniform(batch, scale=math.radians(settings.aug_rotation_deg), device=device)
    zoom = 1 + _uniform(batch, scale=settings.aug_scale, device=device)
    flip = torch.ones(batch, device=device)
    if settings.aug_flip_lr:
        flip = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0)
    if settings.aug_spatial_probability < 1:  # nnU-Net: each of the two with p = 0.2
        rotate = torch.rand(batch, device=device) < settings.aug_spatial_probability
        scale = torch.rand(batch, device=device) < settings.aug_spatial_probability
        angle, zoom = torch.where(rotate, angle, 0.0), torch.where(scale, zoom, 1.0)
    aspect = height / width  # normalised coordinates -> roughly physical in-plane ratio
    zeros = torch.zeros(batch, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = (
        torch.stack(
            [
                torch.stack([cos, -sin * aspect, zeros, zeros], 1),
                torch.stack([sin / aspect, cos, zeros, zeros], 1),
                torch.stack([zeros, zeros, flip, zeros], 1),
            ],
            1,
        )
        / zoom[:, None, None]
    )
    grid = F.affine_grid(theta, [batch, 1, depth, height, width], align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    if settings.aug_mask_interpolation == "linear":  # outside the volume: all 0 -> class 0
        classes = int(masks.max()) + 1 if num_classes is None else num_classes
        one_hot = torch.stack([masks == c for c in range(classes)], 1).float()
        weights = F.grid_sample(
            one_hot, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return images, weights.max(1).indices.to(masks.dtype)  # (max: ~8x argmax's speed)
    masks = F.grid_sample(
        masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].to(masks.dtype)
    return images, masks


def _intensity(images: torch.Tensor, settings: TrainingConfig) -> torch.Tensor:
    """augment_batch's gamma, scale and shift, and noise; each skipped where its setting is 0."""
    shape, device = (images.shape[0], 1, 1, 1, 1), images.device
    if settings.aug_gamma:
        low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
        span = (images.amax(dim=(1, 2, 3, 4), keepdim=True) - low).clamp_min(1e-6)
        gamma = torch.exp(_uniform(*shape, scale=settings.aug_gamma, device=device))
        images = ((images - low) / span).clamp(0, 1).pow(gamma) * span + low
    if settings.aug_intensity:
        gain = 1 + _uniform(*shape, scale=settings.aug_intensity, device=device)
        offset = _uniform(*shape, scale=settings.aug_intensity, device=device)
        images = images * gain + offset
    if settings.aug_noise:
        noise_std = torch.rand(shape, device=device) * settings.aug_noise
        images = images + torch.randn_like(images) * noise_std
    return images


class SegmentationLoss(nn.Module):
    """ce_weight * cross-entropy + dice_weight * (1 - mean soft Dice over the foreground
    classes, or over every class with dice_background: MONAI's include_background=True).

    Soft Dice is computed per volume and averaged, so a batch split over ranks gives the same
    loss as the whole batch in one process. With batch_dice it is computed over the whole
    batch as one volume (nnU-Net's batch Dice): a structure that a patch barely holds then
    weighs by its voxels, not as much as a whole one. Under torchrun each rank pools its own
    batch.
    """

    def __init__(
        self,
        num_classes: int,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        dice_background: bool = False,
        centres: Sequence[tuple[float, float, float]] | None = None,
        batch_dice: bool = False,
    ):
        super().__init__()
        self.batch_dice = batch_dice
        self.centres = list(centres) if centres is not None else None
        self.first_dice_class = 0 if dice_background else 1
        self.num_classes = num_classes
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(
        self, logits: torch.Tensor | list[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """logits (B, C, D, H, W), target (B, D, H, W) int64 -> scalar. A list of logits (deep
        supervision: full resolution first, then coarser) gives nnU-Net's weighted sum: weights
        1, 1/2, 1/4, ... normalised to 1, each against the target taken to its size by
        resize_labels, at the network's centres when the loss was given them."""
        if isinstance(logits, list):
            weights = [0.5**i for i in range(len(logits))]
            total = sum(weights)
            centres = self.centres or [None] * (len(logits) - 1)
            if len(centres) != len(logits) - 1:
                raise ValueError(f"{len(logits) - 1} coarse outputs, {len(centres)} centres")
            loss = weights[0] / total * self(logits[0], target)
            for weight, level, centre in zip(weights[1:], logits[1:], centres, strict=True):
                coarse = resize_labels(target, level.shape[2:], centre)
                loss = loss + weight / total * self(level, coarse)
            return loss
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, target)
        if self.dice_weight:
            probabilities = logits.softmax(dim=1)
            one_hot = F.one_hot(target, self.num_classes).movedim(-1, 1).to(probabilities.dtype)
            dims = (0, 2, 3, 4) if self.batch_dice else (2, 3, 4)
            overlap = (probabilities * one_hot).sum(dims)
            total = probabilities.sum(dims) + one_hot.sum(dims)
            dice = (2 * overlap + 1.0) / (total + 1.0)
            foreground = dice[..., self.first_dice_class :]  # (B, C) or, pooled, (C,)
            loss = loss + self.dice_weight * (1 - foreground.mean())
        return loss


def make_loss(model: nn.Module, num_classes: int, settings: TrainingConfig) -> SegmentationLoss:
    """The loss that `settings` ([training] ce_weight, dice_weight, dice_background,
    batch_dice, deep_supervision_targets) ask for; centred coarse targets take the model's
    UNet3D.supervision_centres."""
    centred = settings.deep_supervision_targets == "centred"
    return SegmentationLoss(
        num_classes,
        settings.ce_weight,
        settings.dice_weight,
        settings.dice_background,
        model.supervision_centres if centred else None,
        settings.batch_dice,
    )


def resize_labels(
    target: torch.Tensor,
    size: Sequence[int],
    centre: Sequence[float] | None = None,
) -> torch.Tensor:
    """Label volumes (B, D, H, W) int64 -> (B, *size), each size dividing the target's: the
    coarse targets of deep supervision. Coarse voxel i along an axis of stride s takes the
    target voxel nearest s * i + centre (the upper one at a tie), centre in target voxels
    (D, H, W): where the network centres that output's first voxel
    (UNet3D.supervision_centres). Without it, the middle of each s-voxel box, (s - 1) / 2:
    torch's nearest-exact interpolation. Unchanged when already that size."""
    if tuple(target.shape[1:]) == tuple(size):
        return target
    strides = [full // coarse for full, coarse in zip(target.shape[1:], size, strict=True)]
    if any(s * n != full for s, n, full in zip(strides, size, target.shape[1:], strict=True)):
        raise ValueError(f"coarse size {tuple(size)} does not divide {tuple(target.shape[1:])}")
    if centre is None:
        centre = [(s - 1) / 2 for s in strides]
    first = [math.floor(c + 0.5) for c in centre]
    return target[:, first[0] :: strides[0], first[1] :: strides[1], first[2] :: strides[2]]


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: SegmentationLoss,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    augmentation: TrainingConfig | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: str = "",
    clock: Stopwatch | None = None,
) -> EpochTotals:
    """One pass over `loader`: trains when an optimizer is given, else evaluates (no grad).
    clock: a Stopwatch that times data, augmentation, forward, loss, backward, optimizer step
    and metrics."""
    training = optimizer is not None
    part = timer(clock)
    model.train(training)
    totals = EpochTotals.zeros(loss_fn.num_classes, device)
    with torch.set_grad_enabled(training):
        bar = tqdm(loader, desc=progress, leave=False, disable=not progress, unit="batch")
        batches = iter(bar)
        for step in itertools.count():
            with part("data"):  # loading, or drawing patches: the loader's own work
                batch = next(batches, None)
                if batch is None:
                    break
                images = batch[0].to(device, non_blocking=True)
                masks = batch[1].to(device, non_blocking=True).long()
            with part("augmentation"):
                if augmentation is not None:
                    images, masks = augment_batch(images, masks, augmentation, loss_fn.num_classes)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last_3d)
            with part("forward"):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(images)
            with part("loss"):
                loss = loss_fn(logits, masks)
            if training:
                with part("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                with part("optimizer step"):
                    optimizer.step()
            with part("metrics"):
                full = logits[0] if isinstance(logits, list) else logits  # deep supervision
                totals.add(loss, images.shape[0], full.detach().argmax(1), masks, step)
    return totals
