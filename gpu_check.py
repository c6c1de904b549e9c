"""The first numbers to take on a GPU: `python bench.py --gpu-check` (one GPU, a few minutes).

Prints one table (then one JSON line):
- training volumes/s of the pipeline (bench.train_pipeline: cached data, run_epoch with
  augmentation, AdamW) at the preset's grid and model, in fp32 and bf16 (bf16 where the device
  has it natively, devices.bf16_supported), each with and without channels_last_3d. The
  pipeline's own choice (devices.fast_settings: no channels_last with instance norm on CUDA) is
  marked; the table is the evidence for or against that choice on this GPU;
- inference seconds per 512 x 512 x 15 scan end to end (bench.inference_latency), as the
  pipeline predicts;
- a resume on this device: the real drivers (preprocess_script, trainandtest_script) train a
  tiny synthetic set for 3 epochs straight, and for 2 epochs then resumed to 3; the two final
  weights must be bit-identical (torch.use_deterministic_algorithms on for this part, with
  CUBLAS_WORKSPACE_CONFIG set before CUDA starts; warn_only, since CUDA's cross-entropy has no
  deterministic kernel: its reduction order can differ run to run). The largest difference is
  printed either way.

`check(run, work)` takes bench's Run; tests.py calls it on the CPU at a tiny size, so the code
is exercised even where no GPU is.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA


def training_layouts(run, images, masks) -> list[dict[str, object]]:
    """Pipeline volumes/s per (precision, channels_last) that the device can run."""
    from bench import train_pipeline
    from devices import bf16_supported, fast_settings

    norm = run.preset.model.norm
    chosen = fast_settings(run.device, run.training.precision, run.training.channels_last, norm)
    precisions = [None] + ([torch.bfloat16] if bf16_supported(run.device) else [])
    rows = []
    for amp_dtype in precisions:
        for channels_last in (False, True):
            _, speed = train_pipeline(run, images, masks, (amp_dtype, channels_last))
            rows.append(
                {
                    "precision": "bf16" if amp_dtype else "fp32",
                    "channels_last": channels_last,
                    "volumes_per_s": speed,
                    "pipeline_choice": (amp_dtype, channels_last) == chosen,
                }
            )
    return rows


def resume_is_exact(device: torch.device, work: Path) -> dict[str, object]:
    """3 epochs straight against 2 + a resumed third, through the drivers, on `device`."""
    import preprocess_script
    import trainandtest_script
    from synthetic_spine import generate_dataset
    from train import load_checkpoint

    raw = work / "resume_raw"
    generate_dataset(raw, n_patients=6, seed=1, small=True)
    common = [
        "--set", f"paths.raw_dir={raw}",
        "--set", f"paths.preprocessed_dir={work / 'resume_pre'}",
        "--set", "data.synthetic_demo=false",
        "--set", "preprocessing.grid=32, 16, 8",
        "--set", "model.base_channels=4",
        "--set", "model.depth=3",
        "--set", "training.scheduler=none",
        "--set", f"training.device={device.type}",
        "--set", "testing.figures=0",
    ]  # fmt: skip
    if preprocess_script.main(common) != 0:
        raise RuntimeError("gpu check: preprocessing the resume set failed")
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for name, epochs in (("resumed", 2), ("resumed", 3), ("straight", 3)):
            out = ["--set", f"paths.output_dir={work / name}", "--set", f"training.epochs={epochs}"]
            if trainandtest_script.main(common + out) != 0:
                raise RuntimeError(f"gpu check: the {name} run ({epochs} epochs) failed")
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    resumed, straight = (
        load_checkpoint(work / name / "checkpoints" / "last.pt")["model"]
        for name in ("resumed", "straight")
    )
    largest = max(float((resumed[k].float() - straight[k].float()).abs().max()) for k in straight)
    exact = all(torch.equal(resumed[k], straight[k]) for k in straight)
    return {"bit_exact": exact, "max_abs_difference": largest}


def check(run, work: Path) -> dict[str, object]:
    """The GPU record: training per layout and precision, inference, resume."""
    from bench import inference_latency, synthetic_volumes
    from config import PreprocessingConfig

    images, masks = synthetic_volumes(run.preset.volumes, run.preset.grid, seed=1)
    return {
        "training": training_layouts(run, images, masks),
        "inference": inference_latency(
            run, work, replace(PreprocessingConfig(), grid=run.preset.grid)
        ),
        "resume": resume_is_exact(run.device, work),
    }


def header(run, device_name: str) -> str:
    """The table's first line: device, torch, sizes."""
    preset, model = run.preset, run.preset.model
    return (
        f"bench gpu-check on {device_name}, torch {torch.__version__}: grid "
        f"{'x'.join(map(str, preset.grid))} (HxWxD), UNet3D base {model.base_channels} depth "
        f"{model.depth} {model.norm} norm, {preset.volumes} volumes, batch "
        f"{run.training.batch_size}, 1 warm-up + {preset.epochs} timed epochs"
    )


def table(record: dict, header: str) -> str:
    """The --gpu-check table."""
    lines = [header]
    for row in record["training"]:
        layout = "channels_last_3d" if row["channels_last"] else "contiguous"
        mark = "  <- the pipeline's choice" if row["pipeline_choice"] else ""
        label = f"training, {row['precision']}, {layout}"
        lines.append(f"  {label:<40} {row['volumes_per_s']:.2f} volumes/s{mark}")
    inference = record["inference"]
    size = "x".join(map(str, inference["scan_size"]))
    lines.append(f"  {'inference per ' + size + ' scan':<40} {inference['seconds_per_scan']:.2f} s")
    resume = record["resume"]
    verdict = "yes" if resume["bit_exact"] else "NO"
    lines.append(
        f"  {'resume continues bit-exactly':<40} {verdict} "
        f"(max |difference| {resume['max_abs_difference']:.3g})"
    )
    return "\n".join(lines)
