"""The preprocessing plan (nnU-Net's "plans"): every setting that decides the data, recorded once.

preprocess_script.py writes preprocessed_dir/plan.json; training refuses a preprocessed folder
whose plan differs from the configuration; every checkpoint carries the plan of its data, and
prediction (predict_script.py, the test loop) obeys the checkpoint's plan, never the current
configuration file.

A plan is a flat JSON-compatible dict:
    preprocessing_version  int, bumped when the same settings would give other data
    mode                   "grid" (the fixed grid; later modes add their own keys)
    orientation            canonical orientation of every array ("PIR")
    grid                   [height S-I, width A-P, sagittal slices]
    normalisation, clip_percentiles, padding_value, crop, crop_margin_mm, closing_radius_mm,
    body_mask_resolution_mm, image_interpolation, mask_interpolation
    class_names            ["background", ...] in class-index order
    label_map              {"raw mask value": class index}, keys as strings (JSON)
"""

from __future__ import annotations

import json
from pathlib import Path

from config import ConfigError, LabelsConfig, PreprocessingConfig
from vertebraeseg import (
    BODY_MASK_RESOLUTION_MM,
    CANONICAL,
    PREPROCESSING_VERSION,
    atomic_write_text,
)

PLAN_FILE = "plan.json"
# PreprocessingConfig fields that do not change the data (left out of the plan).
NOT_IN_PLAN = ("workers",)


def make_plan(settings: PreprocessingConfig, labels: LabelsConfig) -> dict[str, object]:
    """The plan that `settings` and `labels` produce (what preprocess_script.py records)."""
    plan: dict[str, object] = {
        "preprocessing_version": PREPROCESSING_VERSION,
        "mode": "grid",
        "orientation": CANONICAL,
        "body_mask_resolution_mm": BODY_MASK_RESOLUTION_MM,
        "mask_interpolation": "nearest",
    }
    for key, value in settings.__dict__.items():
        if key not in NOT_IN_PLAN:
            plan[key] = list(value) if isinstance(value, tuple) else value
    plan["class_names"] = list(labels.class_names)
    plan["label_map"] = {str(raw): index for raw, index in sorted(labels.lookup().items())}
    return plan


def plan_settings(plan: dict[str, object]) -> PreprocessingConfig:
    """The PreprocessingConfig a plan was made with (workers: the default)."""
    fields = PreprocessingConfig.__dataclass_fields__
    values = {key: plan[key] for key in fields if key in plan}
    for key in ("grid", "clip_percentiles"):
        values[key] = tuple(values[key])
    return PreprocessingConfig(**values)


def plan_lookup(plan: dict[str, object]) -> dict[int, int]:
    """Raw mask value -> class index, as the plan's data were labelled."""
    return {int(raw): int(index) for raw, index in plan["label_map"].items()}


def write_plan(plan: dict[str, object], preprocessed_dir: Path) -> Path:
    """preprocessed_dir/plan.json, written atomically."""
    path = Path(preprocessed_dir) / PLAN_FILE
    atomic_write_text(json.dumps(plan, indent=2) + "\n", path)
    return path


def read_plan(preprocessed_dir: Path) -> dict[str, object]:
    """preprocessed_dir/plan.json; FileNotFoundError that says how to make it."""
    path = Path(preprocessed_dir) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run preprocess_script.py with this configuration first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def check_plan(found: dict[str, object], expected: dict[str, object], where: Path) -> None:
    """Raise ConfigError naming every key whose value differs, with both values."""
    changed = [
        f"{key}: preprocessed with {found.get(key)!r}, the configuration says {expected.get(key)!r}"
        for key in sorted(set(found) | set(expected))
        if found.get(key) != expected.get(key)
    ]
    if changed:
        raise ConfigError(
            f"{where} was made with other preprocessing settings ("
            + "; ".join(changed)
            + "): run preprocess_script.py with the same configuration and --set options, "
            "or point [paths] preprocessed_dir elsewhere"
        )
