"""Benchmark: the training pipeline against a seed-style loop; inference and preprocessing speed.

    python bench.py --quick       CPU, < 2 minutes: grid 64x32x16, UNet3D base 8 depth 4
    python bench.py --gpu-check   one GPU, < 5 minutes: full size, 64 volumes: training vol/s
                                  in fp32/bf16 with and without channels_last, s/scan, and a
                                  bit-exact resume on the GPU (gpu_check.py)
    python bench.py --demo        grid and model of --config: the shipped demo settings (CPU)
    python bench.py               full size: the seed's UNet3D 32-64-128-256-512 on the 256x128x32
                                  grid, 450 volumes; for a GPU (many hours on 2 CPU cores)
    python bench.py --profile --config FILE [--epochs N] [--minutes M] [--set KEY=VALUE]
                                  where a training epoch's time goes (bench_profile.py)
    python bench.py --peer --minutes M --config FILE [--split-seed S] [--project-run DIR]
                    [--peer-network project]
                                  FILE's setting beside a plain MONAI script (bench_peer.py);
                                  DIR: a finished project run to score instead of training one;
                                  project: the MONAI recipe with FILE's network
    python bench.py --spacing --config FILE
                                  spacing mode only: training patches/s and seconds per scan of
                                  sliding-window inference with FILE's model, patch and spacing
                                  (bench_spacing.py)
Options: --epochs N timed epochs (after one untimed warm-up epoch), --volumes N, --batch-size N
(default [training] batch_size), --compile (torch.compile the pipeline), --precision
auto|bf16|fp32 (the pipeline's; default [training] precision), --device auto|cpu|cuda,
--threads N (CPU threads, 0: all cores), --inference-only (the inference latency alone, e.g.
`python bench.py --inference-only` for the seed model on a CPU), --config FILE ([training]
weight decay, loss weights, augmentation, seed; [preprocessing]; [labels]), --work-dir DIR
(temporary files go to a fresh folder inside it). The learning rate is fixed per preset.

Grid (height, width, slices); tensors (batch, 1, slices, height, width). Measured:
- training volumes/s over whole epochs (loading, augmentation, metrics included) on the same
  synthetic volumes with 4 learnable classes, for the pipeline (training_data.VolumeDataset
  cached, on the GPU with CUDA; make_loader over a DistributedSampler of world 1; run_epoch with
  augmentation; bf16 autocast where the device computes bf16 natively and channels_last_3d
  (devices.fast_settings; the table's header says which); on CUDA fused AdamW, cudnn.benchmark)
  and for a seed-style loop (fp32, eager; DataLoader(batch_size, shuffle) over a Dataset reading
  each volume from an uncompressed .mha file with SimpleITK at every access, the seed's best case;
  cross-entropy; AdamW; sklearn accuracy_score and f1_score(average="macro") on every batch);
- validation Dice (mean over the foreground classes) of both after that schedule, from the same
  initial weights, and whether they agree within DICE_TOLERANCE;
- seconds per 512x512x15 scan end to end (read .mha, reorient + to_grid, predict, grid_to_scan
  with probabilities, write .mha), untrained model of the run;
- preprocess_dataset cases/s on synthetic_spine data (fresh folders), 1 worker and all cores
  (wall time, worker start-up included).
Prints a table, then one JSON line (stdout's last) with every figure, the device and settings.
Without SimpleITK the seed-style loop reads .npy files (numpy.load; the table says so) and the
inference and preprocessing parts are reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from config import (
    Config,
    ModelConfig,
    PreprocessingConfig,
    TrainingConfig,
    driver_arguments,
    load_config,
)
from devices import Distributed, configure_threads, fast_settings, pick_device
from steps import SegmentationLoss, make_loss, run_epoch
from train import NonFiniteLossError, build_model, make_optimizer, network_arguments
from training_data import ShardSampler, VolumeDataset, make_loader, read_volume
from unet_model import make_network

HERE = Path(__file__).resolve().parent
HAVE_SITK = importlib.util.find_spec("SimpleITK") is not None
NO_SITK = "SimpleITK is not installed"
DICE_TOLERANCE = 0.05  # allowed |pipeline Dice - seed-style Dice| after the same schedule
CLASS_MEANS = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)  # image intensity of class 0..3
NOISE_STD = 0.3
DEFAULT_MINUTES = 30.0  # --profile's steps in M minutes, --peer's training minutes
SCAN_GRID = (512, 512, 15)  # the SPIDER-size test scan: (height S-I, width A-P, slices)


@dataclass(frozen=True)
class Preset:
    """Sizes of one run; grid (height, width, slices)."""

    name: str
    grid: tuple[int, int, int]
    model: ModelConfig
    volumes: int  # training volumes; validation volumes: an eighth of that, at least 4
    epochs: int  # timed epochs, after one warm-up epoch
    # Fixed, so that the Dice check does not depend on --config: a base-8 network's logits grow
    # slowly, at 0.003 the seed-style loop (cross-entropy only) needs hundreds of steps to find
    # the small classes; the seed's base-32 network learns them in tens of steps at 0.003.
    learning_rate: float
    patients: int  # synthetic patients (2 series each) for the preprocessing throughput
    small_patients: bool  # coarse synthetic patients (synthetic_spine small=True)
    repeats: int  # timed inference runs, after one warm-up run


def choose_preset(args: argparse.Namespace, config: Config) -> Preset:
    """--quick / --demo / --gpu-check / full size (seed grid, model); then --volumes, --epochs."""
    seed_grid, seed_model = PreprocessingConfig().grid, ModelConfig()
    if args.quick:
        preset = Preset("quick", (64, 32, 16), ModelConfig(8, 4), 48, 4, 0.01, 12, True, 2)
    elif args.demo:
        grid, model = config.preprocessing.grid, config.model
        preset = Preset("demo", grid, model, 48, 4, 0.01, 12, True, 3)
    elif args.gpu_check:
        preset = Preset("gpu-check", seed_grid, seed_model, 64, 2, 0.003, 4, False, 3)
    else:
        preset = Preset("full", seed_grid, seed_model, 450, 2, 0.003, 8, False, 5)
    return replace(
        preset, volumes=args.volumes or preset.volumes, epochs=args.epochs or preset.epochs
    )


@dataclass(frozen=True)
class Run:
    """One benchmark run: sizes, the training settings of both paths, the device."""

    preset: Preset
    training: TrainingConfig
    device: torch.device
    compile: bool  # torch.compile the pipeline's model

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fast_settings(self) -> tuple[torch.dtype | None, bool]:
        """The pipeline's (autocast dtype or None, channels_last_3d): devices.fast_settings."""
        return fast_settings(
            self.device,
            self.training.precision,
            self.training.channels_last,
            self.preset.model.norm,
        )

    @property
    def model_args(self) -> dict[str, object]:
        return network_arguments(self.preset.model, len(CLASS_MEANS))


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def blob(axes: tuple[np.ndarray, ...], centre, radii, power: float) -> np.ndarray:
    """sum(|axis - centre| / radius) ** power <= 1: power 2 an ellipsoid, 8 a rounded box."""
    terms = zip(axes, centre, radii, strict=True)
    return sum(np.abs((a - c) / r) ** power for a, c, r in terms) <= 1


def synthetic_volumes(
    count: int, grid: tuple[int, int, int], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Learnable volumes: images (N, D, H, W) float32, masks (N, D, H, W) uint8, 4 classes.

    On background 0, painted in order at random positions and sizes (axes scaled to -1..1):
    class 1 a large ellipsoid, 2 a rounded box, 3 a smaller ellipsoid (about 67/20/6/7 % of
    the voxels); image = CLASS_MEANS[class] + N(0, NOISE_STD).
    """
    height, width, slices = grid
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in (slices, height, width))
    axes = (z[:, None, None], y[None, :, None], x[None, None, :])
    masks = np.zeros((count, slices, height, width), dtype=np.uint8)
    for mask in masks:
        mask[blob(axes, rng.uniform(-0.1, 0.1, 3), rng.uniform(0.8, 0.95, 3), 2)] = 1
        mask[blob(axes, rng.uniform(-0.3, 0.3, 3), rng.uniform(0.45, 0.6, 3), 8)] = 2
        mask[blob(axes, rng.uniform(-0.4, 0.4, 3), rng.uniform(0.45, 0.55, 3), 2)] = 3
    noise = rng.standard_normal(masks.shape, dtype=np.float32) * NOISE_STD
    return CLASS_MEANS[masks] + noise, masks


class FileVolumes(Dataset):
    """Seed-style dataset: one file per volume and mask (uncompressed .mha with SimpleITK, else
    .npy), read from disk at every access: image (1, D, H, W) float32, mask (D, H, W) int64."""

    def __init__(self, folder: Path, images: np.ndarray, masks: np.ndarray) -> None:
        self.suffix = ".mha" if HAVE_SITK else ".npy"
        names = [(f"image_{i}{self.suffix}", f"mask_{i}{self.suffix}") for i in range(len(images))]
        self.paths = [(folder / image, folder / mask) for image, mask in names]
        folder.mkdir()
        for paths, arrays in zip(self.paths, zip(images, masks, strict=True), strict=True):
            for path, array in zip(paths, arrays, strict=True):
                if HAVE_SITK:
                    # Imported here: SimpleITK may be missing on a GPU machine (then .npy files).
                    import SimpleITK as sitk

                    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
                else:
                    np.save(path, array)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.paths[index]
        if HAVE_SITK:
            image, mask = read_volume(image_path, np.float32), read_volume(mask_path, np.int64)
        else:
            image, mask = np.load(image_path), np.load(mask_path).astype(np.int64)
        return torch.from_numpy(image)[None], torch.from_numpy(mask)


def volumes_per_second(run: Run, one_epoch, volumes: int) -> float:
    """one_epoch(0) untimed (warm-up), then epochs 1..preset.epochs timed: volumes/s over those."""
    one_epoch(0)
    if run.cuda:
        torch.cuda.synchronize(run.device)
    start = time.perf_counter()
    for epoch in range(1, run.preset.epochs + 1):
        one_epoch(epoch)
    if run.cuda:
        torch.cuda.synchronize(run.device)
    return volumes * run.preset.epochs / (time.perf_counter() - start)


def validation_dice(run: Run, network: nn.Module, val_set: VolumeDataset, fast: bool) -> float:
    """Mean Dice over the foreground classes (steps.run_epoch without an optimizer).

    fast: evaluate as the pipeline trained (Run.fast_settings); else fp32 as the seed did.
    """
    loader = make_loader(val_set, ShardSampler(len(val_set), 0, 1), run.training.batch_size, 0)
    amp_dtype, channels_last = run.fast_settings if fast else (None, False)
    loss_fn = SegmentationLoss(len(CLASS_MEANS))
    totals = run_epoch(network, loader, loss_fn, run.device, None, None, amp_dtype, channels_last)
    return float(np.nanmean(totals.scores(Distributed())["dice"][1:]))


def train_pipeline(
    run: Run,
    images: np.ndarray,
    masks: np.ndarray,
    fast: tuple[torch.dtype | None, bool] | None = None,
) -> tuple[nn.Module, float]:
    """The project's training path: (trained network, volumes/s). fast: (autocast dtype or
    None, channels_last_3d), by default the pipeline's (Run.fast_settings)."""
    training, device, cuda = run.training, run.device, run.cuda
    torch.backends.cudnn.benchmark = cuda
    torch.manual_seed(training.seed)
    amp_dtype, channels_last = fast or run.fast_settings
    model = build_model(run.model_args, device, channels_last)
    network = torch.compile(model) if run.compile else model
    optimizer = make_optimizer(model, training)
    loss_fn = make_loss(model, len(CLASS_MEANS), training)
    train_set = VolumeDataset.from_arrays(images, masks, device)
    sampler = DistributedSampler(train_set, 1, 0, shuffle=True, seed=training.seed)
    loader = make_loader(train_set, sampler, training.batch_size, 0)

    def one_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        totals = run_epoch(
            network, loader, loss_fn, device, optimizer, training, amp_dtype, channels_last
        )
        if totals.scores(Distributed())["first_bad_batch"] >= 0:
            raise NonFiniteLossError(f"pipeline: non-finite training loss in epoch {epoch}")

    return network, volumes_per_second(run, one_epoch, len(train_set))


def train_seed_style(run: Run, files: FileVolumes) -> tuple[nn.Module, float]:
    """The seed's loop (fp32, eager, files read at every access, sklearn metrics per batch):
    (trained model, volumes/s)."""
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(run.training.seed)
    model = make_network(**run.model_args).to(run.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), run.training.learning_rate, weight_decay=run.training.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(files, batch_size=run.training.batch_size, shuffle=True)

    def one_epoch(epoch: int) -> None:
        model.train()
        for images, masks in loader:
            images, masks = images.to(run.device), masks.to(run.device)
            logits = model(images)
            loss = loss_fn(logits, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if not np.isfinite(loss.item()):
                raise NonFiniteLossError(f"seed-style: non-finite training loss in epoch {epoch}")
            predicted = logits.argmax(1).cpu().numpy().ravel()
            truth = masks.cpu().numpy().ravel()
            accuracy_score(truth, predicted)
            f1_score(truth, predicted, average="macro")

    return model, volumes_per_second(run, one_epoch, len(files))


def compare_training(run: Run, work: Path) -> dict[str, object]:
    """Both training paths on the same synthetic train/validation volumes, same initial weights."""
    preset = run.preset
    images, masks = synthetic_volumes(preset.volumes, preset.grid, seed=1)
    val_images, val_masks = synthetic_volumes(max(4, preset.volumes // 8), preset.grid, seed=2)
    val_set = VolumeDataset.from_arrays(val_images, val_masks, run.device)
    log(f"training the pipeline: {preset.volumes} volumes, 1 + {preset.epochs} epochs")
    network, fast = train_pipeline(run, images, masks)
    fast_dice = validation_dice(run, network, val_set, fast=True)
    del network  # frees the device memory before the seed-style model
    files = FileVolumes(work / "volumes", images, masks)
    log(f"training the seed-style loop ({files.suffix} files)")
    model, seed = train_seed_style(run, files)
    seed_dice = validation_dice(run, model, val_set, fast=False)
    return {
        "val_volumes": len(val_set),
        "baseline_reads": ".mha (SimpleITK)" if HAVE_SITK else ".npy (numpy.load, no SimpleITK)",
        "pipeline_volumes_per_s": fast,
        "baseline_volumes_per_s": seed,
        "speedup": fast / seed,
        "pipeline_val_dice": fast_dice,
        "baseline_val_dice": seed_dice,
        "dice_difference": fast_dice - seed_dice,
        "dice_agree": abs(fast_dice - seed_dice) <= DICE_TOLERANCE,
    }


def inference_latency(run: Run, work: Path, settings: PreprocessingConfig) -> dict[str, object]:
    """Seconds per scan, end to end and per stage: mean of preset.repeats runs after a warm-up.

    The stages are those of test_unet.segment_scan, timed one by one.
    """
    # Imported here: these modules import SimpleITK, which a GPU machine may lack.
    import SimpleITK as sitk

    from synthetic_spine import synth_patient
    from test_unet import (
        back_to_scan,
        inference_layout,
        model_from_checkpoint,
        predict_probabilities,
    )
    from vertebraeseg import CANONICAL, atomic_write_image, read_scan, resample_to_grid, to_grid

    images, _ = synth_patient(np.random.default_rng(3))
    scan_path = work / "scan.mha"
    sitk.WriteImage(resample_to_grid(images["t2"], SCAN_GRID, sitk.sitkLinear), str(scan_path))
    torch.manual_seed(0)
    state = {"model_args": run.model_args, "model": make_network(**run.model_args).state_dict()}
    model = model_from_checkpoint(state, run.device)
    runs = []
    for _ in range(run.preset.repeats + 1):
        clock = [time.perf_counter()]
        scan = read_scan(scan_path)
        clock.append(time.perf_counter())
        grid = to_grid(sitk.DICOMOrient(scan, CANONICAL), None, settings)
        clock.append(time.perf_counter())
        probabilities = predict_probabilities(  # on the host
            model,
            grid.image,
            run.device,
            run.training.precision,
            channels_last=inference_layout(state, run.device),
        )
        clock.append(time.perf_counter())
        prediction = back_to_scan(probabilities, grid.image, scan, map_probabilities=True)
        clock.append(time.perf_counter())
        atomic_write_image(prediction, work / "prediction.mha")
        clock.append(time.perf_counter())
        runs.append(np.diff(clock))
    mean = np.mean(runs[1:], axis=0)
    stages = ("read", "preprocess", "predict", "map_back", "write")
    return {
        "scan_size": list(scan.GetSize()),
        "repeats": run.preset.repeats,
        "seconds_per_scan": float(mean.sum()),
        "stages_s": {stage: float(value) for stage, value in zip(stages, mean, strict=True)},
    }


def timed_preprocessing(config_path: str, raw_dir: str, out_dir: str, grid: str, workers: str):
    """Print {"cases", "seconds"} of one preprocess_dataset run as JSON; run by
    preprocessing_throughput in a fresh process."""
    # Imported here: preprocess_script imports SimpleITK, which a GPU machine may lack.
    from preprocess_script import preprocess_dataset
    from synthetic_spine import SEQUENCES

    config = load_config(Path(config_path))
    settings = replace(config.preprocessing, grid=tuple(json.loads(grid)), workers=int(workers))
    start = time.perf_counter()
    manifest = preprocess_dataset(
        Path(raw_dir), Path(out_dir), SEQUENCES, settings, config.labels.lookup(), progress=False
    )
    seconds = time.perf_counter() - start
    skipped = manifest[manifest["status"] != "ok"]
    if len(skipped):
        raise RuntimeError(f"preprocessing skipped {list(skipped['case_id'])}: no valid timing")
    print(json.dumps({"cases": len(manifest), "seconds": seconds}))


def preprocessing_throughput(run: Run, work: Path, config_path: Path) -> dict[str, object]:
    """Cases/s of preprocess_dataset with 1 worker and with all cores, fresh output folders.

    Each run is a fresh `python -c` process, as a preprocessing driver would be: spawned workers
    then import what preprocessing needs, not this module (torch, scikit-learn).
    """
    # Imported here: synthetic_spine imports SimpleITK, which a GPU machine may lack.
    from synthetic_spine import generate_dataset

    preset = run.preset
    generate_dataset(work / "raw", preset.patients, seed=4, small=preset.small_patients)
    runs = []
    for workers in (1, os.cpu_count() or 1):
        command = [
            *(sys.executable, "-c", "import sys, bench; bench.timed_preprocessing(*sys.argv[1:])"),
            *(str(config_path), str(work / "raw"), str(work / f"preprocessed_{workers}")),
            *(json.dumps(preset.grid), str(workers)),
        ]
        done = subprocess.run(command, cwd=HERE, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"preprocessing with {workers} workers failed:\n{done.stderr}")
        timing = json.loads(done.stdout.splitlines()[-1])
        runs.append(
            {"workers": workers, **timing, "cases_per_s": timing["cases"] / timing["seconds"]}
        )
    return {"patients": preset.patients, "small": preset.small_patients, "runs": runs}


def table(record: dict) -> str:
    """The human-readable summary of a record (the content of the JSON line)."""
    s, t = record["settings"], record["training"]
    inference, prep = record["inference"], record["preprocessing"]
    if "skipped" in t:
        rows = [("training", f"skipped: {t['skipped']}")]
    else:
        agree = "yes" if t["dice_agree"] else "NO"
        rows = [
            ("training, pipeline", f"{t['pipeline_volumes_per_s']:.2f} volumes/s"),
            ("training, seed-style loop", f"{t['baseline_volumes_per_s']:.2f} volumes/s"),
            ("  its volumes are read from", t["baseline_reads"]),
            ("  speed-up of the pipeline", f"{t['speedup']:.2f} x"),
            ("validation Dice, pipeline", f"{t['pipeline_val_dice']:.3f}"),
            ("validation Dice, seed-style loop", f"{t['baseline_val_dice']:.3f}"),
            (
                f"  agree, |difference| <= {DICE_TOLERANCE}",
                f"{agree} ({t['dice_difference']:+.3f})",
            ),
        ]
    if "skipped" in inference:
        rows.append(("inference per scan", f"skipped: {inference['skipped']}"))
    else:
        size = "x".join(map(str, inference["scan_size"]))
        stages = ", ".join(f"{k} {v:.2f}" for k, v in inference["stages_s"].items())
        rows.append((f"inference per {size} scan", f"{inference['seconds_per_scan']:.2f} s"))
        rows.append(("  stages, s", stages))
    if "skipped" in prep:
        rows.append(("preprocessing", f"skipped: {prep['skipped']}"))
    for done in prep.get("runs", []):
        cases = f"{done['cases_per_s']:.2f} cases/s ({done['cases']} cases)"
        rows.append((f"preprocessing, {done['workers']} worker(s)", cases))
    (height, width, slices), model = s["grid"], s["model"]
    header = (
        f"bench {s['name']} on {record['device']['name']} ({record['device']['threads']} CPU "
        f"threads), torch {record['torch']}: grid {height}x{width}x{slices} (HxWxD), UNet3D base "
        f"{model['base_channels']} depth {model['depth']}, {s['volumes']} train + "
        f"{t.get('val_volumes', 0)} val volumes, batch {s['batch_size']}, lr {s['learning_rate']}, "
        f"1 warm-up + {s['epochs']} timed epochs; pipeline {s['precision']}"
        f"{', channels_last_3d' if s['channels_last'] else ''}"
        f"{', torch.compile' if s['compile'] else ''}"
    )
    return "\n".join([header] + [f"  {label:<36} {value}" for label, value in rows])


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = driver_arguments(__doc__.splitlines()[0])  # --config and --set, as the drivers
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small grid and model, CPU, < 2 min")
    mode.add_argument("--demo", action="store_true", help="grid and model of --config")
    mode.add_argument("--gpu-check", action="store_true", help="full size on one GPU, < 5 min")
    parser.add_argument("--epochs", type=int, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--volumes", type=int, help="training volumes")
    parser.add_argument("--batch-size", type=int, help="default: [training] batch_size")
    parser.add_argument("--compile", action="store_true", help="torch.compile the pipeline")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), help="default: [training] precision"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument(
        "--work-dir", type=Path, help="folder for the temporary files (made if missing)"
    )
    parser.add_argument(
        "--spacing",
        action="store_true",
        help="only the spacing-mode row (patches/s, s/scan) with --config's settings",
    )
    mode.add_argument(
        "--peer",
        action="store_true",
        help="--config's setting beside a plain MONAI script, --minutes each (bench_peer.py)",
    )
    parser.add_argument("--split-seed", type=int, help="--peer: default [training] split_seed")
    parser.add_argument(
        "--peer-network",
        choices=("monai", "project"),
        default="monai",
        help="--peer: the peer recipe's network, MONAI's UNet or --config's [model] network",
    )
    parser.add_argument(
        "--project-run",
        type=Path,
        help="--peer: a finished project run folder to score instead of training one",
    )
    mode.add_argument(
        "--profile",
        action="store_true",
        help="where a training epoch's time goes, for --config's setting (bench_profile.py)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="--profile: steps in M min (default 30); --peer: the peer's training minutes "
        "(default 30, or as long as --project-run's run trained)",
    )
    parser.add_argument(
        "--inference-only",
        action="store_true",
        help="measure only the end-to-end inference (e.g. the seed model on a CPU)",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "volumes", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.project_run is not None and not args.peer:
        parser.error("--project-run goes with --peer")
    if args.minutes is None and args.project_run is None:  # else the run's own minutes
        args.minutes = DEFAULT_MINUTES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    config = load_config(args.config, args.overrides)
    if args.work_dir is not None:  # the temporary folders are made inside it
        args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.peer or args.profile:  # modules of their own: bench_peer.py, bench_profile.py
        configure_threads(args.threads, 1)
        module = importlib.import_module("bench_peer" if args.peer else "bench_profile")
        with tempfile.TemporaryDirectory(prefix="bench-", dir=args.work_dir) as folder:
            text, record = module.command(config, args, Path(folder))
        print(text)
        print(json.dumps(record))
        return 0
    preset = choose_preset(args, config)
    training = replace(
        config.training,
        batch_size=args.batch_size or config.training.batch_size,
        learning_rate=preset.learning_rate,
        precision=args.precision or config.training.precision,
    )
    device = pick_device("cuda" if args.gpu_check and args.device == "auto" else args.device)
    run = Run(preset, training, device, args.compile)
    amp_dtype, channels_last = run.fast_settings
    configure_threads(args.threads, 1)
    name = torch.cuda.get_device_name(device) if run.cuda else platform.machine()
    record: dict[str, object] = {
        "device": {"type": device.type, "name": name, "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "simpleitk": HAVE_SITK,
        "settings": asdict(preset)
        | {
            "batch_size": training.batch_size,
            "learning_rate": training.learning_rate,
            "weight_decay": training.weight_decay,
            "compile": args.compile,
            "precision": "bf16" if amp_dtype else "fp32",
            "channels_last": channels_last,
            "dice_tolerance": DICE_TOLERANCE,
        },
    }
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.work_dir) as folder:
        work = Path(folder).resolve()
        if args.gpu_check:
            import gpu_check

            record["gpu_check"] = gpu_check.check(run, work)
            print(gpu_check.table(record["gpu_check"], gpu_check.header(run, name)))
            print(json.dumps(record))
            return 0
        if args.spacing:
            import bench_spacing

            log("spacing mode: patch training and sliding-window inference")
            record["spacing_mode"] = bench_spacing.spacing_mode_speed(config, device, work)
            print(bench_spacing.table(record))
            print(json.dumps(record))
            return 0
        not_asked = {"skipped": "--inference-only"}
        record["training"] = not_asked if args.inference_only else compare_training(run, work)
        record["inference"] = record["preprocessing"] = {"skipped": NO_SITK}
        if HAVE_SITK:
            log("inference latency")
            settings = replace(config.preprocessing, grid=preset.grid)
            record["inference"] = inference_latency(run, work, settings)
            record["preprocessing"] = not_asked
            if not args.inference_only:
                log("preprocessing throughput")
                record["preprocessing"] = preprocessing_throughput(run, work, args.config.resolve())
    print(table(record))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
