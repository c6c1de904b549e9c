"""Training: patient-level split, the train/validate loop, checkpoints, resume.

Data: training_data.py (grid volumes or patches); one pass over it, with augmentation and the
loss: steps.py. Runs single-process, or one process per GPU/CPU shard under torchrun
(DistributedDataParallel, devices.Distributed); only rank 0 writes files.
`fit` reads top to bottom: set-up (data, model, resume), the epoch loop, checkpointing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from atomic import atomic_path
from config import ModelConfig, TrainingConfig
from devices import Distributed, fast_settings, pick_device
from plan import plan_differences
from steps import Stopwatch, make_loss, run_epoch, timer
from store_plot_metrics import plot_curves, write_csv
from training_data import make_data
from unet_model import make_network

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the epoch and batch."""


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


def patient_folds(cases: pd.DataFrame, folds: int, test_fraction: float, seed: int) -> pd.DataFrame:
    """case_id, patient_id, fold: k-fold cross-validation by patient. test_fraction of the
    patients are held out first (as patient_split holds them out; fold -1), the rest go to
    folds 0..folds-1 by scikit-learn's GroupKFold, shuffled with seed: every series of a
    patient in one fold, every patient in exactly one."""
    table = patient_split(cases, 0.0, test_fraction, seed)
    table["fold"] = -1
    rest = table.index[table["split"] != "test"]
    patients = table.loc[rest, "patient_id"]
    if patients.nunique() < folds:
        raise ValueError(
            f"[training] folds = {folds}, but only {patients.nunique()} patients are left "
            "after the test part"
        )
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(rest, groups=patients)):
        table.loc[rest[held], "fold"] = fold
    return table.drop(columns="split")


def fold_split(folds: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The split of one fold (case_id, patient_id, split): validation = that fold, test = the
    held-out patients (fold -1), training = the other folds."""
    split = folds[["case_id", "patient_id"]].copy()
    split["split"] = np.where(
        folds["fold"] == fold, "val", np.where(folds["fold"] < 0, "test", "train")
    )
    return split


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


def learning_rate_factor(epoch: int, epochs: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate for an epoch: linear warm-up, then cosine or flat."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if schedule == "none":
        return 1.0
    progress = (epoch - warmup) / max(1, epochs - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def network_arguments(model_settings: ModelConfig, num_classes: int) -> dict[str, object]:
    """[model] as the network's arguments, the checkpoint's model_args (equal to the built
    network's `arguments`): UNet3D's options, or ResidualUNet's under network = residual_unet."""
    model_args = {
        "in_channels": 1,
        "num_classes": num_classes,
        "base_channels": model_settings.base_channels,
        "depth": model_settings.depth,
        "norm": model_settings.norm,
        "channels": list(model_settings.channels) or None,
    }
    if model_settings.network == "residual_unet":
        return {"network": "residual_unet"} | model_args
    return model_args | {
        "stem_stride": list(model_settings.stem_stride),
        "residual": model_settings.residual,
        "deep_supervision": model_settings.deep_supervision,
        "head_kernel": model_settings.head_kernel,
    }


def build_model(model_args: dict, device: torch.device, channels_last: bool) -> nn.Module:
    model = make_network(**model_args).to(device)
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


# What every checkpoint of this project holds (load_checkpoint refuses one without).
CHECKPOINT_KEYS = ("model_args", "model", "class_names", "config", "epoch")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary code.
    ValueError names the file when it is not this project's, lacks a key (CHECKPOINT_KEYS),
    holds non-finite weights, or its weights do not fit the network its arguments build."""
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
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: it is damaged")
    bad = [
        name
        for name, tensor in state["model"].items()
        if not torch.is_tensor(tensor)
        or (tensor.is_floating_point() and not tensor.isfinite().all())
    ]
    if bad:
        raise ValueError(
            f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}): it cannot "
            "segment anything"
        )
    try:
        make_network(**state["model_args"]).load_state_dict(state["model"])
    except (TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise ValueError(
            f"checkpoint {path}: its weights do not fit its network arguments ({first})"
        ) from None
    return state


def _rng_state(device: torch.device) -> dict:
    """This process's generator states: the CPU's, and on CUDA its own GPU's only (a state per
    visible GPU could not be restored where fewer GPUs are visible)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore saved generator states; they must be CPU ByteTensors wherever they were loaded.
    A CUDA state goes to this process's GPU (from a list of one state per GPU, as checkpoints
    before held, the one of this GPU's index, if saved)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, list):
        cuda = cuda[device.index] if device.index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)


def restore_rng(
    states: list[dict], dist_info: Distributed, device: torch.device, seed: int, epoch: int
) -> bool:
    """Restore this rank's generators from a checkpoint's states (one per rank that saved it).
    The same world size: each rank its own state, exactly (returns True). Another world size
    (a distributed run resumed in one process, or on fewer GPUs): every rank is reseeded from
    (seed, epoch, rank), so that no two ranks draw the same augmentations (returns False)."""
    if len(states) == dist_info.world_size:
        _set_rng_state(states[dist_info.rank], device)
        return True
    torch.manual_seed((seed * 100_003 + epoch) * 1009 + dist_info.rank)
    return False


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """After Optimizer.load_state_dict: every per-parameter state tensor shaped like its
    parameter (AdamW's exp_avg, exp_avg_sq) takes the parameter's memory layout. The loaded
    state keeps the strides it was saved with, and fused AdamW on CUDA refuses a state whose
    layout differs from its parameter's (a resume with channels_last toggled, or an MPS run
    resumed on CUDA)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if (
                    torch.is_tensor(value)
                    and value.shape == parameter.shape
                    and value.stride() != parameter.stride()
                ):
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def unwrapped(network: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and torch.compile wrappers. Validation
    runs on it: DDP broadcasts buffers (batch norm's statistics) in the first forward after
    training, eval mode included, and a rank without a validation case would meet that
    broadcast with the metrics' all_reduce (a hang, or corrupted metrics)."""
    while isinstance(network, DistributedDataParallel) or hasattr(network, "_orig_mod"):
        network = (
            network.module if isinstance(network, DistributedDataParallel) else network._orig_mod
        )
    return network


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
    dist_info: Distributed | None = None,
    progress: bool = True,
    clock: Stopwatch | None = None,
) -> Path:
    """Train with AdamW; validate every settings.val_every epochs and after the last; keep
    checkpoints/best.pt (best validation Dice) and checkpoints/last.pt.

    train_rows/val_rows: manifest rows with out_image/out_mask columns; plan: the preprocessing
    plan of that data (plan.py): grid mode trains on whole volumes, spacing mode on patches
    (patches.py); it is stored in every checkpoint for prediction. Resumes from
    checkpoints/last.pt when settings.resume is true and it exists. Writes (rank 0 only)
    metrics_epochs.csv and the curves each epoch. Returns the path of the best checkpoint.
    Raises NonFiniteLossError on a NaN/inf loss, keeping the last good checkpoint.
    clock: a steps.Stopwatch that times each epoch's parts (bench.py --profile).
    """
    dist_info = dist_info or Distributed()
    device = pick_device(settings.device, dist_info.local_rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    amp_dtype, channels_last = fast_settings(
        device, settings.precision, settings.channels_last, model_settings.norm
    )
    if settings.batch_size % dist_info.world_size:
        raise ValueError(
            f"[training] batch_size = {settings.batch_size} is not divisible by the "
            f"{dist_info.world_size} processes"
        )
    if train_rows.empty:
        raise ValueError("the split leaves no training case")
    torch.manual_seed(settings.seed + dist_info.rank)
    per_rank_batch = settings.batch_size // dist_info.world_size
    data = make_data(train_rows, val_rows, plan, settings, device, dist_info, per_rank_batch)
    model_args = network_arguments(model_settings, len(class_names))
    model, optimizer, scheduler = make_model_and_optimizer(
        model_args, model_settings.norm, settings, device, channels_last, dist_info
    )
    last_path = run_dir / "checkpoints" / "last.pt"
    history, best_score, start_epoch = resume(
        last_path, settings, model, optimizer, scheduler, model_args, class_names, plan, dist_info
    )
    if start_epoch > settings.epochs:
        return run_dir / "checkpoints" / "best.pt"
    network: nn.Module = model
    if dist_info.active:
        cuda = device.type == "cuda"
        network = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if settings.compile:
        network = torch.compile(network)
    loss_fn = make_loss(model, len(class_names), settings)
    show = progress and dist_info.is_main
    part = timer(clock)
    epochs = range(start_epoch, settings.epochs + 1)
    for epoch in tqdm(
        epochs, desc="epochs", initial=start_epoch - 1, total=settings.epochs, disable=not show
    ):
        started = time.perf_counter()
        train_scores = run_epoch(
            network,
            data.train_batches(epoch),
            loss_fn,
            device,
            optimizer,
            settings if settings.augment else None,
            amp_dtype,
            channels_last,
            f"train {epoch}" if show else "",
            clock,
        ).scores(dist_info)
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
        validate = data.n_val and (epoch % settings.val_every == 0 or epoch == settings.epochs)
        if validate:
            with part("validation"):
                val_totals = data.validate(
                    unwrapped(network),
                    loss_fn,
                    device,
                    amp_dtype,
                    channels_last,
                    f"val {epoch}" if show else "",
                )
                row |= _epoch_row("val", val_totals.scores(dist_info), class_names)
        seconds = time.perf_counter() - started
        row |= {"seconds": seconds, "train_volumes_per_s": data.n_train / seconds}
        history.append(row)
        improved = not data.n_val  # without validation data the last epoch is the best
        if validate:
            improved = row["val_dice_mean"] > best_score
            best_score = max(best_score, row["val_dice_mean"])
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_args": model_args,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_score": best_score,
            "history": history,
            "rng": gather_rng_states(dist_info, device),
            "class_names": list(class_names),
            "config": config_record,
            "plan": plan,
        }
        if dist_info.is_main:
            with part("checkpoint, CSV, plots"):
                save_epoch(state, run_dir, improved)
            tqdm.write(epoch_line(row, settings.epochs))
        dist_info.barrier()
        if clock is not None:
            clock.lap(time.perf_counter() - started)
    return run_dir / "checkpoints" / "best.pt"


def make_model_and_optimizer(
    model_args: dict,
    norm: str,
    settings: TrainingConfig,
    device: torch.device,
    channels_last: bool,
    dist_info: Distributed,
) -> tuple[nn.Module, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The network (SyncBatchNorm under torchrun with batch norm), AdamW and its schedule."""
    model = build_model(model_args, device, channels_last)
    if dist_info.active and norm == "batch":
        if device.type != "cuda":
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
    return model, optimizer, scheduler


def resume(
    last_path: Path,
    settings: TrainingConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    model_args: dict,
    class_names: tuple[str, ...],
    plan: dict,
    dist_info: Distributed,
) -> tuple[list[dict], float, int]:
    """Restore model, optimizer, schedule and RNG from last.pt when settings.resume and it
    exists. Returns (history, best score, first epoch to run). The checkpoint is loaded to the
    CPU (the saved RNG states must stay CPU ByteTensors); load_state_dict moves the rest, and
    the optimizer's state takes each parameter's memory layout (match_state_layout). A last.pt
    of another network, other classes or another plan (data made otherwise) is refused."""
    if not settings.resume or not last_path.is_file():
        return [], -math.inf, 1
    state = load_checkpoint(last_path)
    saved_args = make_network(**state["model_args"]).arguments  # older: options' defaults
    if saved_args != model_args or tuple(state["class_names"]) != class_names:
        raise ValueError(
            f"{last_path}: model {state['model_args']} / classes {state['class_names']} "
            "differ from the configuration: use a new output_dir or training.overwrite"
        )
    changed = plan_differences(state.get("plan", {}), plan)
    if changed:
        raise ValueError(
            f"{last_path} was trained on data of another plan ({'; '.join(changed)}): use a "
            "new output_dir or training.overwrite"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    match_state_layout(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    device = next(model.parameters()).device
    exact = restore_rng(state["rng"], dist_info, device, settings.seed, state["epoch"] + 1)
    if dist_info.is_main:
        tqdm.write(f"resuming {last_path.parent.parent} after epoch {state['epoch']}")
        if not exact:
            tqdm.write(
                f"  saved by {len(state['rng'])} process(es), resumed by {dist_info.world_size}: "
                "random generators reseeded per rank (not the exact continuation)"
            )
    return list(state["history"]), state["best_score"], state["epoch"] + 1


def gather_rng_states(dist_info: Distributed, device: torch.device) -> list:
    """Every rank's generator states (rank order), for an exact resume."""
    if not dist_info.active:
        return [_rng_state(device)]
    states = [None] * dist_info.world_size
    dist.all_gather_object(states, _rng_state(device))
    return states


def save_epoch(state: dict, run_dir: Path, improved: bool) -> None:
    """last.pt (and best.pt when improved), metrics_epochs.csv and the curves (rank 0)."""
    checkpoints = run_dir / "checkpoints"
    if improved:
        save_checkpoint(state, checkpoints / "best.pt")
    save_checkpoint(state, checkpoints / "last.pt")
    table = pd.DataFrame(state["history"])
    write_csv(table, run_dir / "metrics_epochs.csv")
    plot_curves(table, run_dir)
