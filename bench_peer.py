"""The project beside a plain MONAI script, on the same patients: `python bench.py --peer
--minutes M --config FILE [--split-seed S]` (MONAI: requirements-bench.txt).

Two systems, trained on the same training patients and scored on the same test patients,
each test scan predicted from its raw file and scored in its own geometry (Dice, HD95, ASSD
per structure, test_unet.case_metrics):
- the project: FILE's setting as it is (trainandtest_script on FILE's preprocessed data, run
  folder WORK/project), its epochs fixed by FILE (set them so that training fits M minutes:
  `bench.py --profile` says how many steps do); or, with `--project-run DIR`, a finished run
  folder of the project (its split, its best checkpoint, its training minutes), so that a run
  made before is set beside the peer without training it again (the peer then trains for
  that run's minutes unless --minutes is given);
- the peer (issue 18's recipe): monai.networks.nets.UNet(3-D, channels 16-32-64-128-256,
  strides 2, 2, 2, 2, 2 residual units), DiceCELoss (softmax, one-hot targets), AdamW (lr 2e-3,
  weight decay 1e-4) with a cosine schedule over the M-minute budget, batches of 2 random
  16 x 160 x 160 patches (slices, S-I, A-P) at 0.94 x 0.94 x 0.9 mm, a third of them centred on
  a random foreground voxel, left-right flips only, no crop, a z-score per volume, no
  validation; inference by monai.inferers.sliding_window_inference (overlap 0.5, Gaussian).
  Its data path (reorientation, resampling, probabilities back onto the scan) is the project's
  spacing-mode geometry (vertebraeseg.to_grid with crop off, grid_to_scan), so that only the
  recipe differs.
Prints one table, a row per system: Dice, HD95 and ASSD per structure (mean over the test
cases), training minutes, optimizer steps, training patches/s and seconds per scan; and one
JSON line, which also holds every test case's row per system and structure ("cases": Dice,
HD95, ASSD, reference and predicted voxels: the size bias of each system, case by case).
`--peer-network project` trains the peer's recipe with FILE's network instead of MONAI's (deep
supervision off): with `--set model.network=residual_unet ...` in the project's own run, the
other way round, it tells the recipe's share from the network's.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

PEER_SPACING = "0.94, 0.94, 0.9"  # mm: S-I, A-P, slices
PEER_PATCH = (16, 160, 160)  # slices, S-I, A-P
PEER_BATCH = 2


PEER_NAMES = {"monai": "MONAI peer", "project": "peer recipe, project net"}


def peer_network(classes: int, model=None):
    """The peer's network: MONAI's UNet, or with `model` ([model] of a configuration) the
    project's network without deep supervision (the recipe's loss takes one output)."""
    if model is not None:
        from train import network_arguments
        from unet_model import make_network

        plain = replace(model, deep_supervision=False)
        return make_network(**network_arguments(plain, classes))
    from monai.networks.nets import UNet

    from bench_profile import PEER_UNET

    return UNet(out_channels=classes, **PEER_UNET)


def peer_case(scan: sitk.Image, labels: sitk.Image | None, preprocessing, spacing: str):
    """The peer's view of a scan (and its class-index labels, or None): the whole field of
    view, PIR, z-scored, at `spacing` (mm: S-I, A-P, slices; vertebraeseg.to_grid with the
    crop off), labels nearest neighbour (a MONAI script's Spacingd, whatever FILE says)."""
    from vertebraeseg import CANONICAL, to_grid

    settings = replace(
        preprocessing,
        mode="spacing",
        target_spacing=spacing,
        crop=False,
        mask_interpolation="nearest",
    )
    oriented = None if labels is None else sitk.DICOMOrient(labels, CANONICAL)
    return to_grid(sitk.DICOMOrient(scan, CANONICAL), oriented, settings)


def train_peer(
    volumes, classes: int, minutes: float, patch, seed: int, model=None
) -> tuple[object, int]:
    """The peer's training loop for `minutes` of wall time: (network, optimizer steps).
    volumes: (image (1, D, H, W), mask (D, H, W)) tensors, padded to at least the patch.
    model: None for the peer's network, or a [model] for the project's (peer_network)."""
    from monai.losses import DiceCELoss

    from patches import foreground_index, sample_batch

    torch.manual_seed(seed)
    network = peer_network(classes, model)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    foreground = [foreground_index(mask) for _, mask in volumes]
    generator = torch.Generator().manual_seed(seed)
    budget, started, steps = minutes * 60.0, time.perf_counter(), 0
    network.train()
    while (elapsed := time.perf_counter() - started) < budget:
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        images, masks = sample_batch(volumes, PEER_BATCH, patch, 1 / 3, generator, foreground)
        flip = torch.rand(PEER_BATCH, generator=generator) < 0.5  # left-right: the slice axis
        images[flip], masks[flip] = images[flip].flip(2), masks[flip].flip(1)
        loss = loss_fn(network(images), masks[:, None].long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return network, steps


@torch.no_grad()
def predict_peer(network, scan: sitk.Image, preprocessing, patch, spacing: str) -> sitk.Image:
    """A raw scan -> class indices on the scan (sliding window, probabilities mapped back)."""
    from monai.inferers import sliding_window_inference

    from vertebraeseg import grid_to_scan

    grid = peer_case(scan, None, preprocessing, spacing)
    image = torch.from_numpy(sitk.GetArrayFromImage(grid.image).astype(np.float32))[None, None]
    network.eval()
    logits = sliding_window_inference(image, patch, PEER_BATCH, network, 0.5, mode="gaussian")
    return grid_to_scan(logits[0].softmax(0).numpy(), grid.image, scan)


def scores(rows: list[dict]) -> dict[str, float]:
    """Mean Dice, HD95, ASSD per class over the cases."""
    table = pd.DataFrame(rows)
    means = table.groupby("class")[["dice", "hd95_mm", "assd_mm"]].mean()
    return {f"{c}_{m}": float(means.loc[c, m]) for c in means.index for m in means.columns}


def compare(
    config,
    config_path: Path,
    overrides: list[str],
    split_seed: int,
    minutes: float | None,
    work: Path,
    patch: tuple[int, int, int] = PEER_PATCH,
    spacing: str = PEER_SPACING,
    project_run: Path | None = None,
    peer_net: str = "monai",
) -> dict[str, object]:
    """Train and test both systems; returns the record (see the module docstring). config:
    load_config(config_path, overrides); patch (slices, S-I, A-P) and spacing: the peer's.
    project_run: a finished project run folder to score instead of training one (its own split
    seed is the record's; minutes None: the peer trains as long as that run did).
    peer_net: "monai", or "project" for the peer's recipe with config's [model] network (which
    of the two, the recipe or the network, makes the difference)."""
    import trainandtest_script
    from patches import pad_to_patch
    from plan import plan_lookup, read_plan
    from test_unet import Predictor, case_metrics, read_reference, segment_scan
    from train import load_checkpoint

    if project_run is None:
        run_dir = work / "project"
        args = ["--config", str(config_path)] + [f"--set={o}" for o in overrides]
        args += ["--set", f"training.split_seed={split_seed}"]
        args += ["--set", f"paths.output_dir={run_dir}", "--set", "testing.figures=0"]
        if trainandtest_script.main(args) != 0:
            raise RuntimeError("the project's run failed")
    else:
        run_dir = project_run
        training = finished_run_training(run_dir)  # the run's own split, steps and batch
        config = replace(config, training=replace(config.training, **training))
        split_seed = config.training.split_seed
    networks = run_networks(run_dir)
    history = pd.concat([pd.read_csv(folder / "metrics_epochs.csv") for folder in networks])
    split = pd.read_csv(run_dir / "splits.csv", dtype=str)
    manifest = trainandtest_script.read_manifest(config.paths.preprocessed_dir)
    lookup = plan_lookup(read_plan(config.paths.preprocessed_dir))
    class_names = config.labels.class_names
    rows = {
        name: manifest[manifest["case_id"].isin(split.loc[split["split"] == name, "case_id"])]
        for name in ("train", "test")
    }
    states = [load_checkpoint(folder / "checkpoints" / "best.pt") for folder in networks]
    steps_per_epoch = config.training.steps_per_epoch or math.ceil(
        len(rows["train"]) / config.training.batch_size
    )
    project = {
        "system": "project",
        "training_minutes": float(history["seconds"].sum()) / 60,
        "steps": int(len(history) * steps_per_epoch),
        "batch_size": config.training.batch_size,
    }
    if minutes is None:
        minutes = project["training_minutes"]
    volumes = []
    for case in rows["train"].itertuples():
        scan, reference, _ = read_reference(Path(case.image_path), Path(case.mask_path), lookup)
        grid = peer_case(scan, reference, config.preprocessing, spacing)
        image = torch.from_numpy(sitk.GetArrayFromImage(grid.image).astype(np.float32))[None]
        mask = torch.from_numpy(sitk.GetArrayFromImage(grid.mask).astype(np.uint8))
        image, mask, _ = pad_to_patch(image, mask, patch, float(image.min()))
        volumes.append((image, mask))
    started = time.perf_counter()
    peer_name = PEER_NAMES[peer_net]
    model = config.model if peer_net == "project" else None
    network, steps = train_peer(volumes, len(class_names), minutes, patch, split_seed, model)
    peer = {
        "system": peer_name,
        "training_minutes": (time.perf_counter() - started) / 60,
        "steps": steps,
        "batch_size": PEER_BATCH,
    }
    predictor = Predictor.from_checkpoint(states, torch.device("cpu"))
    metric_rows = {"project": [], peer_name: []}
    seconds = {"project": [], peer_name: []}
    for case in rows["test"].itertuples():
        scan, reference, _ = read_reference(Path(case.image_path), Path(case.mask_path), lookup)
        for name, predict in (
            ("project", lambda s: segment_scan(predictor, s).classes),
            (
                peer_name,
                lambda s: predict_peer(network, s, config.preprocessing, patch, spacing),
            ),
        ):
            clock = time.perf_counter()
            prediction = predict(scan)
            seconds[name].append(time.perf_counter() - clock)
            for row in case_metrics(prediction, reference, class_names):
                metric_rows[name].append({"system": name, "case_id": case.case_id} | row)
    records = []
    for system in (project, peer):
        name = system["system"]
        system["patches_per_s"] = (
            system["steps"] * system["batch_size"] / (60 * system["training_minutes"])
        )
        system["seconds_per_scan"] = float(np.mean(seconds[name]))
        records.append(system | scores(metric_rows[name]))
    cases = metric_rows["project"] + metric_rows[peer_name]
    return {
        "split_seed": split_seed,
        "test_cases": len(rows["test"]),
        "systems": records,
        "cases": cases,
    }


def run_networks(run_dir: Path) -> list[Path]:
    """The folders of a project run's networks: member_*/ of [training] members (tested as
    their ensemble, their training minutes and steps added up), else the run folder itself."""
    from predict_script import ensemble_members

    return [path.parents[1] for path in ensemble_members(run_dir)] or [run_dir]


def finished_run_training(run_dir: Path) -> dict[str, int]:
    """split_seed, steps_per_epoch and batch_size of a finished project run folder (its
    run_config.json); a folder without its best checkpoint, epoch table, split or
    configuration is refused by name."""
    import json

    from trainandtest_script import RUN_RECORD

    needed = ["splits.csv", RUN_RECORD] + [
        str((folder / name).relative_to(run_dir))
        for folder in run_networks(run_dir)
        for name in ("checkpoints/best.pt", "metrics_epochs.csv")
    ]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: not a finished run folder, missing {', '.join(missing)}"
        )
    training = json.loads((run_dir / RUN_RECORD).read_text(encoding="utf-8"))["training"]
    return {key: int(training[key]) for key in ("split_seed", "steps_per_epoch", "batch_size")}


def table(record: dict, class_names: tuple[str, ...]) -> str:
    """One row per system."""
    names = class_names[1:]
    lines = [
        f"split seed {record['split_seed']}, {record['test_cases']} test cases; per structure "
        f"({', '.join(names)}): Dice / HD95 mm / ASSD mm"
    ]
    for system in record["systems"]:
        per = "  ".join(
            f"{system[f'{n}_dice']:.3f}/{system[f'{n}_hd95_mm']:.1f}/{system[f'{n}_assd_mm']:.2f}"
            for n in names
        )
        lines.append(
            f"  {system['system']:<11} {per}  {system['training_minutes']:.1f} min, "
            f"{system['steps']} steps, {system['patches_per_s']:.2f} patches/s, "
            f"{system['seconds_per_scan']:.1f} s/scan"
        )
    return "\n".join(lines)


def command(config, args, work: Path) -> tuple[str, dict]:
    """bench.py --peer: (the table, the record)."""
    seed = config.training.split_seed if args.split_seed is None else args.split_seed
    record = compare(
        config,
        args.config,
        args.overrides,
        seed,
        args.minutes,
        work,
        project_run=args.project_run,
        peer_net=args.peer_network,
    )
    return table(record, config.labels.class_names), record
