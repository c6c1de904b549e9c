"""Training: patient-level split, dataset, augmentation, loss, train/validate loop, checkpoints.

Tensors: images (batch, 1, slices, height, width) float32, masks (batch, slices, height, width)
int64 class indices, as stored on the grid by preprocess_script.py (PIR numpy order).
Runs single-process, or one process per GPU/CPU shard under torchrun (DistributedDataParallel):
`Distributed.from_environment()` reads torchrun's variables; only rank 0 writes files.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.model_selection import GroupShuffleSplit
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from atomic import atomic_path
from config import ModelConfig, TrainingConfig
from metrics import confusion_matrix, scores_from_confusion
from store_plot_metrics import plot_curves, write_csv
from unet_model import UNet3D

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the epoch and batch."""


@dataclass(frozen=True)
class Distributed:
    """Process-group facts: rank 0 of world 1 for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device_kind: str) -> Distributed:
        """Join torchrun's process group (nccl on CUDA, gloo otherwise) when WORLD_SIZE > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this rank's GPU), then mps, then cpu; or the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("[training] device = cuda, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def configure_threads(threads: int, world_size: int) -> int:
    """CPU threads per process: `threads`, or all cores shared among the local processes."""
    count = threads or max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(count)
    return count


def patient_split(
    cases: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """case_id, patient_id, split (train/val/test): every series of a patient on one side.

    Fractions are of patients. A non-zero fraction gets at least one patient; training keeps
    at least one patient.
    """
    patients = np.array(sorted(cases["patient_id"].astype(str).unique()))
    if len(patients) < 1:
        raise ValueError("no cases to split")
    split = pd.Series("train", index=patients)
    remaining = patients
    for name, fraction in (("test", test_fraction), ("val", val_fraction / (1 - test_fraction))):
        if fraction <= 0 or len(remaining) < 2:
            continue
        count = min(len(remaining) - 1, max(1, round(fraction * len(remaining))))
        splitter = GroupShuffleSplit(n_splits=1, test_size=count, random_state=seed)
        keep, held = next(splitter.split(remaining, groups=remaining))
        split[remaining[held]] = name
        remaining = remaining[keep]
    table = cases[["case_id", "patient_id"]].copy()
    table["patient_id"] = table["patient_id"].astype(str)
    table["split"] = table["patient_id"].map(split).to_numpy()
    return table.sort_values("case_id").reset_index(drop=True)


def load_or_make_split(
    path: Path, cases: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Reuse run_dir/splits.csv when present (a repeated run keeps its split), else make it.

    The caller writes a new split (only rank 0 writes files).
    """
    if path.is_file():
        table = pd.read_csv(path, dtype={"case_id": str, "patient_id": str, "split": str})
        missing = sorted(set(table["case_id"]) - set(cases["case_id"]))
        if missing:
            raise ValueError(
                f"{path}: cases {missing[:5]} of the saved split are not in the manifest "
                "(preprocessed data changed): use a new output_dir"
            )
        return table
    return patient_split(cases, val_fraction, test_fraction, seed)


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
    dataset: VolumeDataset, sampler: Sampler, batch_size: int, workers: int
) -> DataLoader:
    """Batches of positions go to the dataset whole (one gather for a cached dataset)."""
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    cached = dataset.cache is not None
    return DataLoader(
        dataset, sampler=batches, batch_size=None, num_workers=0 if cached else workers
    )


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, settings: TrainingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random spatial + intensity augmentation of a batch, on its device.

    Spatial: rotation in the sagittal plane (+-aug_rotation_deg), isotropic scaling
    (1 +- aug_scale), optional left-right flip of the slice axis; never a superior-inferior
    flip. Images bilinear, masks nearest. Intensity: scale and shift (+-aug_intensity), gamma
    (exp(+-aug_gamma)) on a per-volume 0..1 rescale, gaussian noise (std up to aug_noise).
    Random draws are made on the batch's device (no host round trip) with torch's global
    generators, whose states the checkpoints save.
    """
    batch, device = images.shape[0], images.device
    depth, height, width = images.shape[2:]

    def uniform(*shape: int, scale: float) -> torch.Tensor:
        return (torch.rand(*shape, device=device) * 2 - 1) * scale

    angle = uniform(batch, scale=math.radians(settings.aug_rotation_deg))
    zoom = 1 + uniform(batch, scale=settings.aug_scale)
    flip = torch.ones(batch, device=device)
    if settings.aug_flip_lr:
        flip = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0)
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
    masks = F.grid_sample(
        masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].to(masks.dtype)

    shape = (batch, 1, 1, 1, 1)
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    span = (images.amax(dim=(1, 2, 3, 4), keepdim=True) - low).clamp_min(1e-6)
    gamma = torch.exp(uniform(*shape, scale=settings.aug_gamma))
    images = ((images - low) / span).clamp(0, 1).pow(gamma) * span + low
    gain = 1 + uniform(*shape, scale=settings.aug_intensity)
    offset = uniform(*shape, scale=settings.aug_intensity)
    noise_std = torch.rand(shape, device=device) * settings.aug_noise
    images = images * gain + offset + torch.randn_like(images) * noise_std
    return images, masks


class SegmentationLoss(nn.Module):
    """ce_weight * cross-entropy + dice_weight * (1 - mean soft Dice over foreground classes).

    Soft Dice is computed per volume and averaged, so a batch split over ranks gives the same
    loss as the whole batch in one process.
    """

    def __init__(self, num_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, C, D, H, W), target (B, D, H, W) int64 -> scalar."""
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits, target)
        if self.dice_weight:
            probabilities = logits.softmax(dim=1)
            one_hot = F.one_hot(target, self.num_classes).movedim(-1, 1).to(probabilities.dtype)
            dims = (2, 3, 4)
            overlap = (probabilities * one_hot).sum(dims)
            total = probabilities.sum(dims) + one_hot.sum(dims)
            dice = (2 * overlap + 1.0) / (total + 1.0)
            loss = loss + self.dice_weight * (1 - dice[:, 1:].mean())
        return loss


def learning_rate_factor(epoch: int, epochs: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate for an epoch: linear warm-up, then cosine or flat."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if schedule == "none":
        return 1.0
    progress = (epoch - warmup) / max(1, epochs - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class EpochTotals:
    """Sums over one pass (on the device until `scores`): no per-batch host synchronisation."""

    loss_sum: torch.Tensor
    volumes: torch.Tensor
    confusion: torch.Tensor
    first_bad_batch: torch.Tensor  # -1: every loss finite

    def scores(self, dist_info: Distributed) -> dict[str, object]:
        packed = torch.cat(
            [self.loss_sum.reshape(1), self.volumes.reshape(1), self.confusion.reshape(-1)]
        ).double()
        packed = dist_info.sum(packed).cpu().numpy()
        bad = self.first_bad_batch.clone()
        if dist_info.active:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        classes = self.confusion.shape[0]
        scores = scores_from_confusion(packed[2:].reshape(classes, classes))
        volumes = packed[1]
        scores["loss"] = float(packed[0] / volumes) if volumes else math.nan
        scores["first_bad_batch"] = int(bad.item())
        return scores


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
) -> EpochTotals:
    """One pass over `loader`: trains when an optimizer is given, else evaluates (no grad)."""
    training = optimizer is not None
    model.train(training)
    classes = loss_fn.num_classes
    totals = EpochTotals(
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros((), dtype=torch.float64, device=device),
        torch.zeros(classes, classes, dtype=torch.int64, device=device),
        torch.full((), -1, dtype=torch.int64, device=device),
    )
    with torch.set_grad_enabled(training):
        bar = tqdm(loader, desc=progress, leave=False, disable=not progress, unit="batch")
        for step, (images, masks) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True).long()
            if augmentation is not None:
                images, masks = augment_batch(images, masks, augmentation)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = loss_fn(logits, masks)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            finite = torch.isfinite(loss.detach())
            totals.first_bad_batch = torch.where(
                (totals.first_bad_batch < 0) & ~finite, step, totals.first_bad_batch
            )
            totals.loss_sum += torch.where(finite, loss.detach(), 0.0) * images.shape[0]
            totals.volumes += images.shape[0]
            totals.confusion += confusion_matrix(logits.detach().argmax(1), masks, classes)
    return totals


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 arithmetic: CUDA GPUs that have it, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def fast_settings(
    device: torch.device, precision: str = "auto", channels_last: bool = True
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use channels_last_3d) for a device.

    precision auto: bf16 autocast where the device computes bf16 natively (CUDA GPUs from
    Ampere on; CPUs with AVX512-BF16 or AMX), else fp32. On CPUs, unet_model.Conv3d keeps the
    one convolution shape that oneDNN's bf16 kernel gets wrong in fp32.
    channels_last_3d pays on CUDA and on CPUs (oneDNN), not on MPS.
    """
    native = bf16_supported(device)
    if precision == "bf16" and not native:
        raise ValueError(f"[training] precision = bf16, but {device} has no native bf16")
    use_bf16 = native and precision != "fp32"
    return (torch.bfloat16 if use_bf16 else None), channels_last and device.type != "mps"


def build_model(model_args: dict, device: torch.device, channels_last: bool) -> UNet3D:
    model = UNet3D(**model_args).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def make_optimizer(model: nn.Module, settings: TrainingConfig) -> torch.optim.AdamW:
    """AdamW at [training] learning_rate and weight_decay; fused when the model is on CUDA."""
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        fused=cuda,
    )


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save atomically: a kill never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"checkpoint {path} is refused: it is not a plain weights-only checkpoint "
            f"of this project or it is damaged ({first[:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project")
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore saved generator states; they must be CPU ByteTensors wherever they were loaded."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _epoch_row(prefix: str, scores: dict, class_names: tuple[str, ...]) -> dict[str, float]:
    dice = np.asarray(scores["dice"], dtype=float)
    row = {
        f"{prefix}_loss": scores["loss"],
        f"{prefix}_accuracy": scores["accuracy"],
        f"{prefix}_f1_macro": scores["f1_macro"],
        f"{prefix}_dice_mean": float(np.nanmean(dice[1:])) if np.isfinite(dice[1:]).any() else 0.0,
    }
    row |= {f"{prefix}_dice_{name}": float(dice[i]) for i, name in enumerate(class_names) if i}
    return row


def epoch_line(row: dict, epochs: int) -> str:
    """The one log line of an epoch (validation part only when there is a validation set)."""
    text = f"epoch {row['epoch']}/{epochs} train loss {row['train_loss']:.4f} "
    text += f"dice {row['train_dice_mean']:.3f}"
    if "val_loss" in row:
        text += f" val loss {row['val_loss']:.4f} dice {row['val_dice_mean']:.3f}"
    return text + f" ({row['seconds']:.1f} s)"


def fit(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    run_dir: Path,
    model_settings: ModelConfig,
    settings: TrainingConfig,
    class_names: tuple[str, ...],
    config_record: dict,
    plan: dict,
    dist_info: Distributed = Distributed(),
    progress: bool = True,
) -> Path:
    """Train with AdamW; validate every epoch; keep checkpoints/best.pt and checkpoints/last.pt.

    train_rows/val_rows: manifest rows with out_image/out_mask columns; plan: the preprocessing
    plan of that data (plan.py), stored in every checkpoint for prediction. Resumes from
    checkpoints/last.pt when settings.resume is true and it exists. Writes (rank 0 only)
    metrics_epochs.csv and the curves each epoch. Returns the path of the best checkpoint.
    Raises NonFiniteLossError on a NaN/inf loss, keeping the last good checkpoint.
    """
    device = pick_device(settings.device, dist_info.local_rank)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    amp_dtype, channels_last = fast_settings(device, settings.precision, settings.channels_last)
    if settings.batch_size % dist_info.world_size:
        raise ValueError(
            f"[training] batch_size = {settings.batch_size} is not divisible by the "
            f"{dist_info.world_size} processes"
        )
    per_rank_batch = settings.batch_size // dist_info.world_size
    torch.manual_seed(settings.seed + dist_info.rank)

    if train_rows.empty:
        raise ValueError("the split leaves no training case")
    voxels = volume_voxels(train_rows["out_image"].iloc[0])
    cache_device = choose_cache(
        (len(train_rows) + len(val_rows)) * voxels * 5, device, settings.cache_on_device
    )
    train_set = VolumeDataset(
        list(train_rows["out_image"]), list(train_rows["out_mask"]), cache_device
    )
    val_set = VolumeDataset(list(val_rows["out_image"]), list(val_rows["out_mask"]), cache_device)
    train_sampler = DistributedSampler(
        train_set, dist_info.world_size, dist_info.rank, shuffle=True, seed=settings.seed
    )
    train_loader = make_loader(train_set, train_sampler, per_rank_batch, settings.loader_workers)
    val_loader = make_loader(
        val_set,
        ShardSampler(len(val_set), dist_info.rank, dist_info.world_size),
        per_rank_batch,
        settings.loader_workers,
    )

    model_args = {
        "in_channels": 1,
        "num_classes": len(class_names),
        "base_channels": model_settings.base_channels,
        "depth": model_settings.depth,
        "norm": model_settings.norm,
    }
    model = build_model(model_args, device, channels_last)
    if dist_info.active and model_settings.norm == "batch":
        if not cuda:
            raise ValueError(
                "[model] norm = batch under torchrun needs CUDA (SyncBatchNorm): "
                "use norm = instance or group on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda epoch: learning_rate_factor(
            epoch, settings.epochs, settings.warmup_epochs, settings.scheduler
        ),
    )
    checkpoints = run_dir / "checkpoints"
    best_path, last_path = checkpoints / "best.pt", checkpoints / "last.pt"
    history: list[dict] = []
    best_score, start_epoch = -math.inf, 1
    if settings.resume and last_path.is_file():
        state = load_checkpoint(last_path)  # to the CPU: RNG states must stay CPU ByteTensors
        if state["model_args"] != model_args or tuple(state["class_names"]) != class_names:
            raise ValueError(
                f"{last_path}: model {state['model_args']} / classes {state['class_names']} "
                "differ from the configuration: use a new output_dir or training.overwrite"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)])
        history, best_score = list(state["history"]), state["best_score"]
        start_epoch = state["epoch"] + 1
        if dist_info.is_main:
            tqdm.write(f"resuming {run_dir} after epoch {state['epoch']}")
    if start_epoch > settings.epochs:
        return best_path

    network: nn.Module = model
    if dist_info.active:
        network = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if settings.compile:
        network = torch.compile(network)
    loss_fn = SegmentationLoss(len(class_names), settings.ce_weight, settings.dice_weight)
    show = progress and dist_info.is_main
    epochs = tqdm(
        range(start_epoch, settings.epochs + 1),
        desc="epochs",
        initial=start_epoch - 1,
        total=settings.epochs,
        disable=not show,
    )
    for epoch in epochs:
        started = time.perf_counter()
        train_sampler.set_epoch(epoch)
        train_totals = run_epoch(
            network,
            train_loader,
            loss_fn,
            device,
            optimizer,
            settings if settings.augment else None,
            amp_dtype,
            channels_last,
            f"train {epoch}" if show else "",
        )
        train_scores = train_totals.scores(dist_info)
        if train_scores["first_bad_batch"] >= 0:
            raise NonFiniteLossError(
                f"non-finite training loss in epoch {epoch}, batch "
                f"{train_scores['first_bad_batch']}: stopped; the last good checkpoint "
                f"{last_path} is kept"
                + (" (bf16 autocast was on: try [training] precision = fp32)" if amp_dtype else "")
            )
        row = {"epoch": epoch, "lr": scheduler.get_last_lr()[0]}
        scheduler.step()
        row |= _epoch_row("train", train_scores, class_names)
        if len(val_set):
            val_totals = run_epoch(
                network,
                val_loader,
                loss_fn,
                device,
                None,
                None,
                amp_dtype,
                channels_last,
                f"val {epoch}" if show else "",
            )
            row |= _epoch_row("val", val_totals.scores(dist_info), class_names)
        seconds = time.perf_counter() - started
        row |= {"seconds": seconds, "train_volumes_per_s": len(train_set) / seconds}
        history.append(row)
        score = row.get("val_dice_mean", row["train_dice_mean"])
        improved = score > best_score or not len(val_set)
        best_score = max(best_score, score)
        rng_states = [_rng_state()]
        if dist_info.active:
            rng_states = [None] * dist_info.world_size
            dist.all_gather_object(rng_states, _rng_state())
        if dist_info.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "model_args": model_args,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_score": best_score,
                "history": history,
                "rng": rng_states,
                "class_names": list(class_names),
                "config": config_record,
                "plan": plan,
            }
            if improved:
                save_checkpoint(state, best_path)
            save_checkpoint(state, last_path)
            table = pd.DataFrame(history)
            write_csv(table, run_dir / "metrics_epochs.csv")
            plot_curves(table, run_dir)
            tqdm.write(epoch_line(row, settings.epochs))
        dist_info.barrier()
    return best_path
