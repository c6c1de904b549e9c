"""Training data of both modes, cached where it fits.

grid mode (GridData): fixed-size volumes (batch, 1, slices, height, width) float32 and masks
(batch, slices, height, width) uint8, whole volumes per batch (VolumeDataset).
spacing mode (PatchData): volumes of different sizes (patches.PatchVolumes), random
foreground-oversampled patches for training and sliding-window prediction for validation.
`make_data` picks the one the plan's mode needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from config import TrainingConfig
from devices import Distributed
from metrics import EpochTotals
from patches import PatchVolumes, model_predictor, window_probabilities
from steps import run_epoch


def volume_voxels(path: str | Path) -> int:
    """Voxel count of a preprocessed grid file, from its header alone (no pixel data read)."""
    import SimpleITK as sitk  # here for the same reason as in read_volume

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(np.prod(reader.GetSize()))


def read_volume(path: str | Path, dtype: np.dtype) -> np.ndarray:
    """A preprocessed grid file as a numpy array (slices, height, width)."""
    # Imported here: training from in-memory tensors (bench.py on a GPU machine that lacks
    # SimpleITK) must not need it.
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(dtype, copy=False)


class VolumeDataset(Dataset):
    """Preprocessed grid volumes. Indexed by a list of positions, returns a batch:
    images (B, 1, D, H, W) float32 and masks (B, D, H, W) uint8.

    cache_device: load everything once and keep it there (host memory, or the GPU), or None to
    read the files at every access (datasets larger than memory).
    """

    def __init__(
        self, image_paths: list[str], mask_paths: list[str], cache_device: torch.device | None
    ) -> None:
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths)
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if cache_device is not None and self.image_paths:
            images, masks = self._read(range(len(self.image_paths)))
            self.cache = (images.to(cache_device), masks.to(cache_device))

    @classmethod
    def from_arrays(
        cls, images: np.ndarray, masks: np.ndarray, device: torch.device
    ) -> VolumeDataset:
        """An in-memory dataset: images (N, D, H, W) float32, masks (N, D, H, W) uint8."""
        dataset = cls([], [], None)
        dataset.cache = (
            torch.as_tensor(images, dtype=torch.float32)[:, None].to(device),
            torch.as_tensor(masks, dtype=torch.uint8).to(device),
        )
        return dataset

    def __len__(self) -> int:
        return len(self.image_paths) if self.cache is None else len(self.cache[0])

    def _read(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([read_volume(self.image_paths[i], np.float32) for i in positions])
        masks = np.stack([read_volume(self.mask_paths[i], np.uint8) for i in positions])
        return torch.from_numpy(images)[:, None], torch.from_numpy(masks)

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return self._read(positions)
        index = torch.as_tensor(positions)
        if self.cache[0].is_cuda:  # pinned + non_blocking: no wait for the GPU's queue
            index = index.pin_memory().to(self.cache[0].device, non_blocking=True)
        return self.cache[0].index_select(0, index), self.cache[1].index_select(0, index)


def available_memory() -> int | None:
    """Free host memory in bytes, or None where this OS does not tell (SC_AVPHYS_PAGES is a
    glibc extension: Linux has it, macOS does not)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_cache(nbytes: int, device: torch.device, on_device: bool) -> torch.device | None:
    """Where the dataset lives: the GPU (on_device, when it takes < 30% of the free GPU memory),
    host memory (when it takes < 50% of the available RAM), else None (read per batch).
    Where the free host memory is unknown the data are read per batch, and a message says so."""
    if on_device and device.type == "cuda" and nbytes < 0.3 * torch.cuda.mem_get_info(device)[0]:
        return device
    available = available_memory()
    if available is None:
        tqdm.write(
            "free memory unknown on this system: reading the volumes from disk at every batch "
            "(no in-memory dataset cache)"
        )
        return None
    return torch.device("cpu") if nbytes < 0.5 * available else None


class ShardSampler(Sampler[int]):
    """Positions rank, rank + world, ...: each rank evaluates its own part, none twice."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.positions = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def make_loader(
    dataset: VolumeDataset, sampler: Sampler, batch_size: int, workers: int, pin: bool = False
) -> DataLoader:
    """Batches of positions go to the dataset whole (one gather for a cached dataset).
    pin: batches in page-locked memory (training on CUDA from host memory), so that
    .to(cuda, non_blocking=True) does not wait for the GPU's queue."""
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    cached = dataset.cache is not None
    return DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=0 if cached else workers,
        pin_memory=pin,
    )


def pin_batches(device: torch.device, store: torch.device | None) -> bool:
    """Whether host batches should be pinned: training on CUDA from data held on the host
    (store: the cache's device, None for reading from disk)."""
    return device.type == "cuda" and (store is None or store.type == "cpu")


@dataclass
class GridData:
    """Fixed-size grid volumes: whole volumes per batch, for training and validation."""

    train_set: VolumeDataset
    val_set: VolumeDataset
    train_sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader

    @classmethod
    def build(
        cls,
        train_rows: pd.DataFrame,
        val_rows: pd.DataFrame,
        cache_device: torch.device | None,
        settings: TrainingConfig,
        dist_info: Distributed,
        per_rank_batch: int,
        pin: bool = False,
    ) -> GridData:
        train_set = VolumeDataset(
            list(train_rows["out_image"]), list(train_rows["out_mask"]), cache_device
        )
        val_set = VolumeDataset(
            list(val_rows["out_image"]), list(val_rows["out_mask"]), cache_device
        )
        sampler = DistributedSampler(
            train_set, dist_info.world_size, dist_info.rank, shuffle=True, seed=settings.seed
        )
        shard = ShardSampler(len(val_set), dist_info.rank, dist_info.world_size)
        return cls(
            train_set,
            val_set,
            sampler,
            make_loader(train_set, sampler, per_rank_batch, settings.loader_workers, pin),
            make_loader(val_set, shard, per_rank_batch, settings.loader_workers, pin),
        )

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    @property
    def n_val(self) -> int:
        return len(self.val_set)

    def train_batches(self, epoch: int):
        self.train_sampler.set_epoch(epoch)
        return self.train_loader

    def validate(self, network, loss_fn, device, amp_dtype, channels_last, progress):
        return run_epoch(
            network,
            self.val_loader,
            loss_fn,
            device,
            None,
            None,
            amp_dtype,
            channels_last,
            progress,
        )


VALIDATION_OVERLAP = 0.25  # sliding-window overlap of the per-epoch validation (spacing mode)


@dataclass
class PatchData:
    """Spacing-mode volumes of different sizes: random foreground-oversampled patches for
    training (patches.py), sliding-window prediction of whole cases for validation."""

    train: PatchVolumes
    val: PatchVolumes
    settings: TrainingConfig
    dist_info: Distributed
    per_rank_batch: int
    pin: bool = False  # pin each batch (training on CUDA from volumes held on the host)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val)

    def train_batches(self, epoch: int):
        """The epoch's batches, from a generator seeded by (seed, epoch, rank): a resumed run
        draws the same patches as a straight one. steps_per_epoch 0: as many patches as a pass
        over the training volumes would give."""
        steps = self.settings.steps_per_epoch or max(
            1, math.ceil(len(self.train) / self.settings.batch_size)
        )
        generator = torch.Generator().manual_seed(
            (self.settings.seed * 100_003 + epoch) * 1009 + self.dist_info.rank
        )
        batches = self.train.batches(
            steps, self.per_rank_batch, self.settings.foreground_fraction, generator
        )
        if not self.pin:
            return batches
        return ((images.pin_memory(), masks.pin_memory()) for images, masks in batches)

    @torch.no_grad()
    def validate(self, network, loss_fn, device, amp_dtype, channels_last, progress):
        """Sliding-window probabilities of every validation case of this rank -> EpochTotals
        (the loss of log-probabilities, which equals the loss of the logits they came from)."""
        network.eval()
        classes = loss_fn.num_classes
        totals = EpochTotals.zeros(classes, device)
        predict = model_predictor(network, amp_dtype, channels_last)
        positions = range(self.dist_info.rank, len(self.val), self.dist_info.world_size)
        for position in tqdm(positions, desc=progress, leave=False, disable=not progress):
            image, mask = self.val.volume(position)
            image, mask = image.to(device), mask.to(device).long()
            probabilities = window_probabilities(
                predict,
                image,
                self.train.patch_size,
                VALIDATION_OVERLAP,
                classes,
                batch_size=self.per_rank_batch,
            )
            loss = loss_fn(probabilities.clamp_min(1e-6).log()[None], mask[None])
            totals.add(loss, 1, probabilities.argmax(0), mask, 0)
        return totals


def make_data(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    plan: dict,
    settings: TrainingConfig,
    device: torch.device,
    dist_info: Distributed,
    per_rank_batch: int,
) -> GridData | PatchData:
    """The training and validation data of the plan's mode, cached where it fits."""
    voxels = sum(volume_voxels(path) for path in train_rows["out_image"])
    voxels = voxels * (len(train_rows) + len(val_rows)) // max(1, len(train_rows))
    cache_device = choose_cache(voxels * 5, device, settings.cache_on_device)
    pin = pin_batches(device, cache_device)
    if plan.get("mode", "grid") == "grid":
        return GridData.build(
            train_rows, val_rows, cache_device, settings, dist_info, per_rank_batch, pin
        )
    height, width, slices = plan["patch_size"]
    patch = (slices, height, width)  # plan order (S-I, A-P, slices) -> tensors (z, y, x)
    store = cache_device or torch.device("cpu")  # volumes of different sizes: always held
    return PatchData(
        PatchVolumes(list(train_rows["out_image"]), list(train_rows["out_mask"]), patch, store),
        PatchVolumes(list(val_rows["out_image"]), list(val_rows["out_mask"]), patch, store),
        settings,
        dist_info,
        per_rank_batch,
        pin,
    )
