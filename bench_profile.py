"""Where a training epoch's time goes: `python bench.py --profile --config FILE [--epochs N]
[--minutes M] [--set section.key=value ...]`.

Trains N epochs (default 3) of FILE's setting on FILE's preprocessed data (run
preprocess_script.py first), in a temporary run folder, through train.fit with a
steps.Stopwatch, and prints per epoch the seconds and the share of each part: data (loading,
or drawing patches), augmentation, forward, loss, backward, optimizer step, metrics,
validation, writing the checkpoint, CSV and plots, and the rest. The split, model, patch,
batch and validation schedule are FILE's; only the epoch count (so the learning-rate schedule)
differs, and the last profiled epoch always validates. Then: optimizer steps per second over
the epochs after the first (a warm-up), and how many steps M minutes (default 30) hold at
that rate on this machine; and the seconds of one training step of the seed's shape, FILE's
model and the MONAI peer's network at FILE's patch (grid) size, side by side (step_costs).
Prints one JSON line last.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

PARTS = (
    "data",
    "augmentation",
    "forward",
    "loss",
    "backward",
    "optimizer step",
    "metrics",
    "validation",
    "checkpoint, CSV, plots",
)


def profile(config, epochs: int, work: Path) -> dict[str, object]:
    """Train `epochs` epochs of config's setting; the Stopwatch's laps and the step count."""
    from devices import Distributed, configure_threads, pick_device
    from plan import read_plan
    from steps import Stopwatch
    from train import fit, load_or_make_split
    from trainandtest_script import read_manifest

    training = replace(config.training, epochs=epochs, resume=False)
    configure_threads(training.threads, 1)
    manifest = read_manifest(config.paths.preprocessed_dir)
    plan = read_plan(config.paths.preprocessed_dir)
    split = load_or_make_split(
        work / "splits.csv",
        manifest,
        training.val_fraction,
        training.test_fraction,
        training.split_seed,
    )
    rows = {
        name: manifest[manifest["case_id"].isin(split.loc[split["split"] == name, "case_id"])]
        for name in ("train", "val")
    }
    if plan.get("mode", "grid") == "grid":
        steps = math.ceil(len(rows["train"]) / training.batch_size)
    else:
        steps = training.steps_per_epoch or max(
            1, math.ceil(len(rows["train"]) / training.batch_size)
        )
    clock = Stopwatch(pick_device(training.device))
    fit(
        rows["train"],
        rows["val"],
        work / "run",
        config.model,
        training,
        config.labels.class_names,
        config.as_dict(),
        plan,
        Distributed(),
        progress=False,
        clock=clock,
    )
    height, width, slices = plan["patch_size"] if plan.get("mode") == "spacing" else plan["grid"]
    return {
        "steps_per_epoch": steps,
        "batch_size": training.batch_size,
        "patch_or_grid": [slices, height, width],  # tensor order (slices, height, width)
        "laps": clock.laps,
    }


def table(record: dict, minutes: float) -> str:
    """Per epoch: seconds and the share of each part; then steps/s and steps per `minutes`."""
    laps = pd.DataFrame(record["laps"]).reindex(columns=[*PARTS, "total"], fill_value=0.0)
    laps = laps.fillna(0.0)
    laps["rest"] = laps["total"] - laps[list(PARTS)].sum(axis=1)
    columns = [*PARTS, "rest"]
    widths = [max(len(part), 5) for part in columns]
    header = "  ".join(f"{part:>{width}}" for part, width in zip(columns, widths, strict=True))
    lines = [f"{'epoch':<6}{'seconds':>9}  {header}"]
    for epoch, (_, row) in enumerate(laps.iterrows(), start=1):
        shares = "  ".join(
            f"{100 * row[part] / row['total']:>{width - 1}.0f}%"
            for part, width in zip(columns, widths, strict=True)
        )
        lines.append(f"{epoch:<6}{row['total']:>9.1f}  {shares}")
    timed = laps["total"].iloc[1:] if len(laps) > 1 else laps["total"]
    rate = record["steps_per_epoch"] / float(np.mean(timed))
    lines.append(
        f"{rate:.3f} optimizer steps/s (batch {record['batch_size']}; epochs after the first, "
        f"validation included): about {int(rate * minutes * 60)} steps in {minutes:g} minutes "
        "on this machine"
    )
    slices, height, width = record["patch_or_grid"]
    lines.append(
        f"one training step (batch 2, fp32) at {height}x{width}x{slices} (HxWxD), side by side:"
    )
    for row in record.get("step_costs", []):
        ratio = f"{row['x_peer']:.2f} x the peer's" if row["x_peer"] else "(no peer row)"
        lines.append(
            f"  {row['network']:<28} {row['seconds']:>6.2f} s  {ratio}  "
            f"{row['parameters'] / 1e6:.2f} M parameters"
        )
    return "\n".join(lines)


PEER_UNET = {  # the MONAI peer's network (issue 18): residual units, every level strided
    "spatial_dims": 3,
    "in_channels": 1,
    "channels": (16, 32, 64, 128, 256),
    "strides": (2, 2, 2, 2),
    "num_res_units": 2,
}


def step_costs(config, size: tuple[int, int, int], repeats: int = 3) -> list[dict[str, object]]:
    """Seconds per training step (forward, loss, backward, AdamW; batch 2, fp32, CPU threads
    as configured) at one input size (slices, height, width), side by side: the seed's shape at
    config's base and depth, config's model with its options, and the MONAI peer's UNet where
    MONAI is installed (a benchmark-only dependency, requirements-bench.txt) and every size is
    a multiple of 16 (its four strides). Each network:
    one warm-up step, then the median of `repeats` steps."""
    import time

    import torch

    from config import ModelConfig
    from steps import SegmentationLoss
    from train import network_arguments
    from unet_model import make_network

    classes = len(config.labels.class_names)
    model = config.model
    seed_shape = ModelConfig(model.base_channels, model.depth, model.norm)
    configured = make_network(**network_arguments(model, classes))
    networks = [
        ("UNet3D, seed shape", make_network(**network_arguments(seed_shape, classes))),
        (f"{type(configured).__name__}, this configuration", configured),
    ]
    peer_multiple = 2 ** len(PEER_UNET["strides"])
    try:
        from monai.networks.nets import UNet as MonaiUNet
    except ImportError:
        MonaiUNet = None
    if MonaiUNet is not None and all(v % peer_multiple == 0 for v in size):
        networks.append(("MONAI UNet (the peer)", MonaiUNet(out_channels=classes, **PEER_UNET)))
    loss_fn = SegmentationLoss(classes)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, *size, generator=generator)
    masks = torch.randint(0, classes, (2, *size), generator=generator)
    rows = []
    for name, network in networks:
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
        network.train()
        seconds = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            loss = loss_fn(network(images), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - started)
        parameters = sum(p.numel() for p in network.parameters())
        rows.append(
            {"network": name, "seconds": float(np.median(seconds[1:])), "parameters": parameters}
        )
    peer = next((r["seconds"] for r in rows if r["network"].startswith("MONAI")), None)
    for row in rows:
        row["x_peer"] = row["seconds"] / peer if peer else None
    return rows


def command(config, args, work: Path) -> tuple[str, dict]:
    """bench.py --profile: (the table, the record)."""
    record = profile(config, args.epochs or 3, work)
    record["step_costs"] = step_costs(config, tuple(record["patch_or_grid"]))
    return table(record, args.minutes), record
