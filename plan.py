"""The preprocessing plan (nnU-Net's "plans"): every setting that decides the data, recorded once.

preprocess_script.py writes preprocessed_dir/plan.json; training refuses a preprocessed folder
whose plan differs from the configuration; every checkpoint carries the plan of its data, and
prediction (predict_script.py, the test loop) obeys the checkpoint's plan, never the current
configuration file.

A plan is a flat JSON-compatible dict:
    preprocessing_version  int, bumped when the same settings would give other data
    mode                   "grid" (every crop stretched to one grid) or "spacing" (every crop
                           resampled to one spacing; patch training, sliding-window inference)
    orientation            canonical orientation of every array ("PIR")
    grid                   grid mode: [height S-I, width A-P, sagittal slices]
    target_spacing         spacing mode: the setting ("auto" or three mm values)
    spacing_mm             spacing mode: the spacing used, mm [S-I, A-P, slices] (derived)
    patch_size_setting     spacing mode: [training] patch_size ("auto" or three sizes)
    patch_size             spacing mode: the training/inference patch, voxels (derived)
    normalisation, clip_percentiles, padding_value, crop, crop_margin_mm, closing_radius_mm,
    body_mask_resolution_mm, image_interpolation, mask_interpolation
    class_names            ["background", ...] in class-index order
    label_map              {"raw mask value": class index}, keys as strings (JSON)
"""

from __future__ import annotations

import json
from pathlib import Path

from config import ConfigError, LabelsConfig, PreprocessingConfig
from config import patch_size as parse_patch_size
from config import target_spacing as parse_target_spacing
from spacing_mode import format_spacing
from vertebraeseg import (
    BODY_MASK_RESOLUTION_MM,
    CANONICAL,
    PREPROCESSING_VERSION,
    atomic_write_text,
)

PLAN_FILE = "plan.json"
# Present while a preprocessing run is under way (or was killed): the folder may then hold
# cases of two settings, and training refuses it until a run finishes.
INCOMPLETE_FILE = "preprocessing_incomplete.json"
# PreprocessingConfig fields that do not change the data (left out of the plan).
NOT_IN_PLAN = ("workers",)
# Keys preprocess_script.py derives from the data: a configuration cannot state them.
DERIVED = ("spacing_mm", "patch_size")


def make_plan(
    settings: PreprocessingConfig, labels: LabelsConfig, patch_size: str = "auto"
) -> dict[str, object]:
    """The plan that `settings`, `labels` and [training] patch_size produce, without the keys
    derived from the data (DERIVED; preprocess_script.py adds them in spacing mode)."""
    plan: dict[str, object] = {
        "preprocessing_version": PREPROCESSING_VERSION,
        "mode": "grid",
        "orientation": CANONICAL,
        "body_mask_resolution_mm": BODY_MASK_RESOLUTION_MM,
    }
    unused = ("target_spacing",) if settings.mode == "grid" else ("grid",)
    for key, value in settings.__dict__.items():
        if key not in NOT_IN_PLAN + unused:
            plan[key] = list(value) if isinstance(value, tuple) else value
    if settings.mode == "spacing":
        plan["patch_size_setting"] = patch_size
    plan["class_names"] = list(labels.class_names)
    plan["label_map"] = {str(raw): index for raw, index in sorted(labels.lookup().items())}
    return plan


def plan_settings(plan: dict[str, object]) -> PreprocessingConfig:
    """The PreprocessingConfig a plan was made with (workers: the default; in spacing mode
    target_spacing is the resolved spacing_mm, never auto)."""
    fields = PreprocessingConfig.__dataclass_fields__
    values = {key: plan[key] for key in fields if key in plan}
    values["clip_percentiles"] = tuple(values["clip_percentiles"])
    if "grid" in values:
        values["grid"] = tuple(values["grid"])
    if plan.get("mode") == "spacing":
        values["target_spacing"] = format_spacing(plan["spacing_mm"])
    return PreprocessingConfig(**values)


def plan_lookup(plan: dict[str, object]) -> dict[int, int]:
    """Raw mask value -> class index, as the plan's data were labelled."""
    return {int(raw): int(index) for raw, index in plan["label_map"].items()}


def mark_incomplete(plan: dict[str, object], preprocessed_dir: Path) -> None:
    """Before a preprocessing run writes any case: preprocessed_dir/INCOMPLETE_FILE (the plan
    being made), which write_plan removes when the run has finished."""
    atomic_write_text(json.dumps(plan, indent=2) + "\n", Path(preprocessed_dir) / INCOMPLETE_FILE)


def write_plan(plan: dict[str, object], preprocessed_dir: Path) -> Path:
    """preprocessed_dir/plan.json, written atomically; the folder is then complete."""
    path = Path(preprocessed_dir) / PLAN_FILE
    atomic_write_text(json.dumps(plan, indent=2) + "\n", path)
    (Path(preprocessed_dir) / INCOMPLETE_FILE).unlink(missing_ok=True)
    return path


def check_complete(preprocessed_dir: Path) -> None:
    """ConfigError naming the folder when a preprocessing run into it did not finish."""
    if (Path(preprocessed_dir) / INCOMPLETE_FILE).is_file():
        raise ConfigError(
            f"{preprocessed_dir} is incomplete: a preprocessing run into it was interrupted, "
            "so it may hold cases of two settings; run preprocess_script.py again to finish it"
        )


def read_plan(preprocessed_dir: Path) -> dict[str, object]:
    """preprocessed_dir/plan.json of a complete folder (check_complete); FileNotFoundError
    that says how to make it."""
    check_complete(preprocessed_dir)
    path = Path(preprocessed_dir) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run preprocess_script.py with this configuration first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def canonical_settings(plan: dict[str, object]) -> dict[str, object]:
    """The plan with its spacing and patch settings written one way ('1.0,1.0,1.3' and
    '1, 1, 1.3' are the same setting; 'AUTO' is 'auto'), for comparing plans."""
    plan = dict(plan)
    if isinstance(plan.get("target_spacing"), str):
        spacing = parse_target_spacing(plan["target_spacing"])
        plan["target_spacing"] = "auto" if spacing is None else format_spacing(spacing)
    if isinstance(plan.get("patch_size_setting"), str):
        size = parse_patch_size(plan["patch_size_setting"], (1, 1, 1))
        plan["patch_size_setting"] = "auto" if size is None else ", ".join(map(str, size))
    return plan


def plan_differences(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """'key (old -> new)' for every key whose value differs between two plans, derived keys
    included (canonical_settings: the spacing and patch settings compared as values)."""
    old, new = canonical_settings(old), canonical_settings(new)
    return [
        f"{key} ({old.get(key)!r} -> {new.get(key)!r})"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def check_plan(found: dict[str, object], expected: dict[str, object], where: Path) -> None:
    """Raise ConfigError naming every key whose value differs, with both values (the spacing
    and patch settings compared as values, not as text: canonical_settings)."""
    found, expected = canonical_settings(found), canonical_settings(expected)
    changed = [
        f"{key}: preprocessed with {found.get(key)!r}, the configuration says {expected.get(key)!r}"
        for key in sorted(set(found) | set(expected))
        if key not in DERIVED and found.get(key) != expected.get(key)
    ]
    if changed:
        raise ConfigError(
            f"{where} was made with other preprocessing settings ("
            + "; ".join(changed)
            + "): run preprocess_script.py with the same configuration and --set options, "
            "or point [paths] preprocessed_dir elsewhere"
        )
