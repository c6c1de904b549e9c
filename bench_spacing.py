"""`python bench.py --spacing --config FILE`: the spacing mode's speed with FILE's model, patch
and spacing: training patches/s and seconds per slab-sized scan of sliding-window inference."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from bench import CLASS_MEANS, synthetic_volumes
from config import Config, patch_size, target_spacing
from devices import fast_settings
from steps import make_loss, run_epoch
from train import build_model, make_optimizer, network_arguments

SPACING_STEPS = 4  # timed training steps of the spacing-mode row, after one warm-up step
SLAB_GRID, SLAB_SPACING = (640, 512, 24), (0.469, 0.469, 0.9)  # a real T2 SPACE slab, PIR


def spacing_mode_speed(config: Config, device: torch.device, work: Path) -> dict[str, object]:
    """The spacing mode's row: training patches/s and seconds per scan end to end.

    Uses --config's model, [training] batch_size, patch_size (auto: 160 x 160 x 16 rounded to
    the network) and [preprocessing] target_spacing (auto: 1 mm). Training: patches.PatchVolumes
    over 8 synthetic volumes of 1.5 patches per axis, foreground-oversampled batches through
    steps.run_epoch with augmentation. Inference: test_unet.segment_scan (read excluded) of a
    synthetic scan of a real slab's size and spacing, 512 x 640 x 24 at 0.47 x 0.47 x 0.9 mm
    (the body crop where [preprocessing] crop is on, resample to the target spacing, sliding
    window with [testing] overlap, tta_flip and tta_shift, probabilities back onto the scan;
    no instance step), by [training] members networks (an ensemble costs each member's
    inference).
    """
    import SimpleITK as sitk

    from patches import PatchVolumes
    from plan import make_plan
    from synthetic_spine import synth_patient
    from test_unet import Predictor, segment_scan
    from vertebraeseg import resample_to_grid

    training, model_settings = config.training, config.model
    multiple = model_settings.size_multiple
    patch = patch_size(training.patch_size, multiple) or tuple(
        max(f, v // f * f) for v, f in zip((160, 160, 16), multiple, strict=True)
    )
    spacing = target_spacing(config.preprocessing.target_spacing) or (1.0, 1.0, 1.0)
    height, width, slices = patch
    volume_grid = (height * 3 // 2, width * 3 // 2, slices * 3 // 2)
    images, masks = synthetic_volumes(8, volume_grid, seed=5)
    paths = []
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        pair = (work / f"patch_image_{i}.mha", work / f"patch_mask_{i}.mha")
        sitk.WriteImage(sitk.GetImageFromArray(image), str(pair[0]))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(pair[1]))
        paths.append(pair)
    volumes = PatchVolumes(
        [str(a) for a, _ in paths], [str(b) for _, b in paths], (slices, height, width), device
    )
    amp_dtype, channels_last = fast_settings(
        device, training.precision, training.channels_last, config.model.norm
    )
    model_args = network_arguments(model_settings, len(CLASS_MEANS))
    torch.manual_seed(0)
    model = build_model(model_args, device, channels_last)
    optimizer = make_optimizer(model, training)
    loss_fn = make_loss(model, len(CLASS_MEANS), training)
    generator = torch.Generator().manual_seed(0)

    def steps(count: int) -> None:
        batches = volumes.batches(
            count, training.batch_size, training.foreground_fraction, generator
        )
        run_epoch(model, batches, loss_fn, device, optimizer, training, amp_dtype, channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps(1)
    start = time.perf_counter()
    steps(SPACING_STEPS)
    patches_per_s = SPACING_STEPS * training.batch_size / (time.perf_counter() - start)
    scan_images, _ = synth_patient(np.random.default_rng(3))
    scan = resample_to_grid(scan_images["t2"], SLAB_GRID, sitk.sitkLinear)
    scan.SetSpacing(SLAB_SPACING)  # the real slabs' size and spacing (anatomy stretched)
    plan = {
        **make_plan(replace(config.preprocessing, mode="spacing"), config.labels),
        "spacing_mm": list(spacing),
        "patch_size": list(patch),
    }
    testing = replace(config.testing, instances=False)  # the segmentation alone
    members = (model.eval(),) * training.members  # the same weights: the time is what counts
    predictor = Predictor(members, plan, device, training.precision, testing)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        segment_scan(predictor, scan)
        timings.append(time.perf_counter() - start)
    return {
        "patch_size": list(patch),
        "target_spacing_mm": list(spacing),
        "batch_size": training.batch_size,
        "model": asdict(model_settings),
        "precision": "bf16" if amp_dtype else "fp32",
        "train_patches_per_s": patches_per_s,
        "scan_size": list(scan.GetSize()),
        "overlap": config.testing.overlap,
        "tta_flip": config.testing.tta_flip,
        "tta_shift": config.testing.tta_shift,
        "members": training.members,
        "seconds_per_scan": float(np.mean(timings[1:])),
    }


def table(record: dict) -> str:
    """The --spacing summary."""
    s = record["spacing_mode"]
    return "\n".join(
        [
            f"bench spacing on {record['device']['name']} ({record['device']['threads']} CPU "
            f"threads), torch {record['torch']}: patch {'x'.join(map(str, s['patch_size']))} "
            f"(HxWxD) at {'x'.join(f'{v:g}' for v in s['target_spacing_mm'])} mm, UNet3D base "
            f"{s['model']['base_channels']} depth {s['model']['depth']}, batch {s['batch_size']}, "
            f"{s['precision']}",
            f"  {'training':<36} {s['train_patches_per_s']:.2f} patches/s",
            f"  {'inference per ' + 'x'.join(map(str, s['scan_size'])) + ' scan':<36} "
            f"{s['seconds_per_scan']:.2f} s (overlap {s['overlap']}, flip TTA {s['tta_flip']}, "
            f"shift TTA {s['tta_shift']}, "
            f"{s['members']} network{'s' if s['members'] > 1 else ''})",
        ]
    )
