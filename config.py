"""Typed configuration: configuration.txt (configparser INI) -> frozen dataclasses.

Only the drivers call `load_config`; library functions take explicit arguments.
Every key of every section is declared here with its type; unknown sections or keys,
values of the wrong type and impossible values raise ConfigError naming file, key and value.
Relative paths are resolved against the folder of the configuration file.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from safety import UnsafePathError, check_apart

BACKGROUND = "background"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the value."""


@dataclass(frozen=True)
class PathsConfig:
    raw_dir: Path
    preprocessed_dir: Path
    output_dir: Path
    test_raw_dir: Path | None = None


@dataclass(frozen=True)
class DataConfig:
    sequences: tuple[str, ...] = ("t1", "t2", "t2_SPACE")
    synthetic_demo: bool = False
    demo_patients: int = 24
    demo_seed: int = 0


@dataclass(frozen=True)
class LabelsConfig:
    """Foreground classes in index order (background is class 0).

    classes: ((name, (raw values...)), ...). With one_class_per_value=True every raw value is
    its own class, named "<name>_<value>", in the order the values are listed. (Not to be
    confused with [testing] instances, which separates vertebrae and discs after prediction.)
    """

    classes: tuple[tuple[str, tuple[int, ...]], ...]
    one_class_per_value: bool = False

    @property
    def class_names(self) -> tuple[str, ...]:
        return (BACKGROUND,) + tuple(name for name, _ in self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    def lookup(self) -> dict[int, int]:
        """Raw mask value -> class index (0 -> 0)."""
        table = {0: 0}
        for index, (_, values) in enumerate(self.classes, start=1):
            for value in values:
                table[value] = index
        return table


@dataclass(frozen=True)
class PreprocessingConfig:
    """mode grid: every crop stretched to `grid`; mode spacing: every crop resampled to
    `target_spacing` (mm, in grid order: S-I, A-P, slices), its size following."""

    mode: str = "grid"
    grid: tuple[int, int, int] = (256, 128, 32)
    target_spacing: str = "auto"
    normalisation: str = "zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    padding_value: float = -1000.0
    crop: bool = True
    crop_margin_mm: float = 10.0
    closing_radius_mm: float = 5.0
    image_interpolation: str = "linear"
    mask_interpolation: str = "nearest"  # or linear: per class (sitkLabelLinear), nnU-Net's way
    workers: int = 0


@dataclass(frozen=True)
class ModelConfig:
    base_channels: int = 32
    depth: int = 5
    norm: str = "instance"
    stem_stride: tuple[int, int, int] = (1, 1, 1)  # (height, width, slices), each 1 or 2
    residual: bool = False
    deep_supervision: bool = False
    head_kernel: int = 1  # the full-resolution head's convolution: 1 (1x1x1) or 3 (3x3x3)
    channels: tuple[int, ...] = ()  # one width per level; () = base_channels * 2**level
    network: str = "unet3d"  # or residual_unet (unet_model.NETWORKS)

    @property
    def size_multiple(self) -> tuple[int, int, int]:
        """What every grid or patch size (height, width, slices) must be a multiple of."""
        if self.network == "residual_unet":  # every level strided by 2 on every axis
            return (2 ** (self.depth - 1),) * 3
        return tuple(s * 2 ** (self.depth - 1) for s in self.stem_stride)  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 100
    batch_size: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_background: bool = False
    batch_dice: bool = False  # the soft Dice over the whole batch as one volume (nnU-Net's)
    # deep supervision's coarse targets: torch's nearest-exact (nnU-Net's), or at the voxels
    # the network centres its coarse features on (UNet3D.supervision_centres)
    deep_supervision_targets: str = "nearest_exact"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    seed: int = 0
    augment: bool = True
    aug_rotation_deg: float = 10.0
    aug_scale: float = 0.1
    aug_intensity: float = 0.1
    aug_gamma: float = 0.2
    aug_noise: float = 0.05
    aug_flip_lr: bool = True
    aug_spatial_probability: float = 1.0  # per volume, of the rotation and of the scaling
    aug_mask_interpolation: str = "nearest"  # or linear: per class, as nnU-Net's augmentation
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    cache_on_device: bool = True
    loader_workers: int = 0
    resume: bool = True
    overwrite: bool = False
    threads: int = 0
    patch_size: str = "auto"
    foreground_fraction: float = 0.33
    steps_per_epoch: int = 0
    val_every: int = 1
    folds: int = 0
    fold: str = "all"
    members: int = 1


@dataclass(frozen=True)
class TestingConfig:
    checkpoint: str = "best"
    map_probabilities: bool = True
    map_log: bool = False  # with map_probabilities: resample log-probabilities (nnU-Net's logits)
    figures: int = 4
    instances: bool = False
    min_instance_mm3: float = 100.0
    ensemble: bool = False
    overlap: float = 0.5
    tta_flip: bool = False
    tta_shift: bool = False  # a second pass on the grid shifted half a voxel in-plane
    min_component_mm3: float = 0.0


@dataclass(frozen=True)
class Config:
    source: Path
    paths: PathsConfig
    data: DataConfig
    labels: LabelsConfig
    preprocessing: PreprocessingConfig
    model: ModelConfig
    training: TrainingConfig
    testing: TestingConfig

    def as_dict(self) -> dict[str, dict[str, object]]:
        """Plain-typed nested dict (paths as str): stored in checkpoints and run folders."""
        out: dict[str, dict[str, object]] = {}
        for field in dataclasses.fields(self):
            if field.name == "source":
                continue
            section = getattr(self, field.name)
            if field.name == "labels":
                values = {name: format_values(vals) for name, vals in section.classes}
                values["one_class_per_value"] = section.one_class_per_value
                out["labels"] = values
                continue
            out[field.name] = {
                f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)
            }
        return out


SECTIONS = {
    "paths": PathsConfig,
    "data": DataConfig,
    "preprocessing": PreprocessingConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "testing": TestingConfig,
}
CHOICES = {
    ("preprocessing", "mode"): ("grid", "spacing"),
    ("preprocessing", "normalisation"): ("zscore", "minmax"),
    ("preprocessing", "image_interpolation"): ("linear", "bspline"),
    ("preprocessing", "mask_interpolation"): ("nearest", "linear"),
    ("model", "norm"): ("instance", "batch", "group"),
    ("training", "scheduler"): ("cosine", "none"),
    ("training", "aug_mask_interpolation"): ("nearest", "linear"),
    ("training", "deep_supervision_targets"): ("nearest_exact", "centred"),
    ("training", "device"): ("auto", "cpu", "cuda", "mps"),
    ("training", "precision"): ("auto", "bf16", "fp32"),
    ("testing", "checkpoint"): ("best", "last"),
}
POSITIVE = {
    ("data", "demo_patients"),
    ("model", "base_channels"),
    ("model", "depth"),
    ("training", "epochs"),
    ("training", "batch_size"),
    ("training", "val_every"),
    ("training", "learning_rate"),
}
FRACTIONS = {
    ("training", "val_fraction"),
    ("training", "test_fraction"),
    ("training", "foreground_fraction"),
    ("testing", "overlap"),
}


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def format_values(values: tuple[int, ...]) -> str:
    """(1, 2, 3, 100) -> '1-3, 100': the inverse of parse_values."""
    parts: list[str] = []
    start = prev = None
    for value in list(values) + [None]:
        if start is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = value
    return ", ".join(parts)


def parse_values(text: str, where: str) -> tuple[int, ...]:
    """'1-25, 101-125' -> (1, ..., 25, 101, ..., 125). Values must be positive integers."""
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ConfigError(f"{where} = {text!r}: {part!r} is not an integer or a range a-b")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if low < 1 or high < low:
            raise ConfigError(f"{where} = {text!r}: range {part!r} must be increasing and >= 1")
        values.extend(range(low, high + 1))
    if len(set(values)) != len(values):
        raise ConfigError(f"{where} = {text!r}: a value is listed twice")
    return tuple(values)


def _convert(text: str, kind: object, where: str, base: Path) -> object:
    """Convert one INI string to the annotated type `kind`."""
    text = text.strip()
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if text == "" else _convert(text, inner, where, base)
    if kind is Path:
        if text == "":
            raise ConfigError(f"{where} is empty: a path is required")
        path = Path(text).expanduser()
        return (path if path.is_absolute() else base / path).resolve()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where} = {text!r}: expected true or false")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{where} = {text!r}: expected {kind.__name__}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where} = {text!r}: expected a finite number")
        return value
    if kind is str:
        return text
    if origin is tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        item_kind = args[0]
        if args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{where} = {text!r}: expected {len(args)} comma-separated values")
        return tuple(_convert(item, item_kind, where, base) for item in items)
    raise TypeError(f"unsupported config type {kind!r}")


def _typed_section(parser: configparser.ConfigParser, name: str, cls: type, base: Path):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for key, text in parser.items(name):
        where = f"[{name}] {key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
        values[key] = _convert(text, hints[key], where, base)
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"[{name}]: {err}") from None


def _labels_section(parser: configparser.ConfigParser) -> LabelsConfig:
    if not parser.has_section("labels"):
        raise ConfigError("[labels] is missing: name at least one foreground class")
    one_class_per_value = False
    classes: list[tuple[str, tuple[int, ...]]] = []
    for key, text in parser.items("labels"):
        where = f"[labels] {key}"
        if key == "instances":
            raise ConfigError(
                f"{where}: renamed to one_class_per_value (every raw value its own class); "
                "vertebra and disc instances after prediction are [testing] instances"
            )
        if key == "one_class_per_value":
            one_class_per_value = typing.cast(bool, _convert(text, bool, where, Path()))
        elif key == BACKGROUND or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ConfigError(f"{where}: class names are lower-case identifiers, not {key!r}")
        else:
            classes.append((key, parse_values(text, where)))
    if not classes:
        raise ConfigError("[labels] names no foreground class")
    seen: dict[int, str] = {}
    for name, values in classes:
        for value in values:
            if value in seen:
                raise ConfigError(f"[labels] value {value} is in both {seen[value]} and {name}")
            seen[value] = name
    if one_class_per_value:
        classes = [(f"{name}_{v}", (v,)) for name, values in classes for v in values]
    return LabelsConfig(classes=tuple(classes), one_class_per_value=one_class_per_value)


def _check(config: Config) -> None:
    """Cross-field checks: impossible values stop here with key and value named."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"[{section}] {key} = {value!r}: choose one of {', '.join(allowed)}")
    for section, key in POSITIVE:
        value = getattr(getattr(config, section), key)
        if value <= 0:
            raise ConfigError(f"[{section}] {key} = {value!r}: must be > 0")
    for section, key in FRACTIONS:
        value = getattr(getattr(config, section), key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"[{section}] {key} = {value!r}: must be a fraction in 0..1")
    t = config.training
    if t.val_fraction + t.test_fraction >= 1.0:
        raise ConfigError(
            f"[training] val_fraction + test_fraction = {t.val_fraction + t.test_fraction}: "
            "leaves no training data"
        )
    for key in ("weight_decay", "ce_weight", "dice_weight", "warmup_epochs", "loader_workers"):
        if getattr(t, key) < 0:
            raise ConfigError(f"[training] {key} = {getattr(t, key)!r}: must be >= 0")
    if not 0.0 <= t.aug_spatial_probability <= 1.0:
        raise ConfigError(
            f"[training] aug_spatial_probability = {t.aug_spatial_probability}: a probability "
            "in [0, 1]"
        )
    if t.ce_weight + t.dice_weight == 0:
        raise ConfigError("[training] ce_weight and dice_weight are both 0: no loss to train on")
    p, m = config.preprocessing, config.model
    if m.network not in ("unet3d", "residual_unet"):
        raise ConfigError(f"[model] network = {m.network!r}: choose unet3d or residual_unet")
    if m.network == "residual_unet" and (
        m.stem_stride != (1, 1, 1) or m.residual or m.deep_supervision or m.head_kernel != 1
    ):
        raise ConfigError(
            "[model] network = residual_unet strides every level and has residual units and no "
            "deep supervision of its own: stem_stride, residual, deep_supervision and head_kernel "
            "are options of unet3d (leave them at 1, 1, 1 / false / false / 1)"
        )
    if m.head_kernel not in (1, 3):
        raise ConfigError(f"[model] head_kernel = {m.head_kernel}: 1 (1x1x1) or 3 (3x3x3)")
    if any(s not in (1, 2) for s in m.stem_stride):
        raise ConfigError(f"[model] stem_stride = {m.stem_stride}: each value must be 1 or 2")
    if m.channels and (len(m.channels) != m.depth or min(m.channels) < 1):
        raise ConfigError(
            f"[model] channels = {', '.join(map(str, m.channels))}: one positive width per "
            f"level, [model] depth = {m.depth} of them (or empty: base_channels * 2^level)"
        )
    for axis, size, factor in zip(
        ("height", "width", "slices"), p.grid, m.size_multiple, strict=True
    ):
        if size <= 0 or size % factor:
            raise ConfigError(
                f"[preprocessing] grid = {', '.join(map(str, p.grid))}: {axis} {size} is not a "
                f"positive multiple of {factor} = stem stride x 2^(depth-1), [model] depth = "
                f"{m.depth}, stem_stride = {', '.join(map(str, m.stem_stride))}"
            )
    low, high = p.clip_percentiles
    if not 0.0 <= low < high <= 100.0:
        raise ConfigError(
            f"[preprocessing] clip_percentiles = {low}, {high}: need 0 <= low < high <= 100"
        )
    for key in ("crop_margin_mm", "closing_radius_mm", "workers"):
        if getattr(p, key) < 0:
            raise ConfigError(f"[preprocessing] {key} = {getattr(p, key)!r}: must be >= 0")
    if config.testing.figures < 0:
        raise ConfigError(f"[testing] figures = {config.testing.figures}: must be >= 0")
    if config.testing.map_log and not config.testing.map_probabilities:
        raise ConfigError(
            "[testing] map_log = true needs map_probabilities = true (it changes how the "
            "probabilities are resampled; nearest-neighbour labels have none)"
        )
    if config.testing.tta_shift and not config.testing.map_probabilities:
        raise ConfigError(
            "[testing] tta_shift = true needs map_probabilities = true (the two grids' "
            "predictions meet on the scan as probabilities)"
        )
    for key in ("min_instance_mm3", "min_component_mm3"):
        if getattr(config.testing, key) < 0:
            raise ConfigError(f"[testing] {key} = {getattr(config.testing, key)}: must be >= 0")
    if t.folds == 1 or t.folds < 0:
        raise ConfigError(f"[training] folds = {t.folds}: 0 (off) or at least 2")
    if t.fold != "all" and not (t.fold.isdigit() and int(t.fold) < max(t.folds, 1)):
        raise ConfigError(
            f"[training] fold = {t.fold!r}: all, or a fold number 0..{max(t.folds, 1) - 1} "
            f"([training] folds = {t.folds})"
        )
    if t.members < 1:
        raise ConfigError(f"[training] members = {t.members}: at least 1")
    if t.members > 1 and t.folds:
        raise ConfigError(
            f"[training] members = {t.members} with folds = {t.folds}: the folds are already "
            "an ensemble ([testing] ensemble); set one of the two"
        )
    if t.steps_per_epoch < 0:
        raise ConfigError(f"[training] steps_per_epoch = {t.steps_per_epoch}: must be >= 0")
    target_spacing(p.target_spacing)
    patch_size(t.patch_size, config.model.size_multiple)
    if not config.data.sequences:
        raise ConfigError("[data] sequences is empty")
    _check_paths(config.paths)


def target_spacing(text: str) -> tuple[float, float, float] | None:
    """[preprocessing] target_spacing: None for auto, else three mm values > 0 (S-I, A-P,
    slices); ConfigError naming the key otherwise."""
    if text.strip().lower() == "auto":
        return None
    where = "[preprocessing] target_spacing"
    values = _convert(text, tuple[float, float, float], where, Path())
    if any(v <= 0 for v in values):
        raise ConfigError(f"{where} = {text!r}: every spacing must be > 0 mm (or auto)")
    return values  # type: ignore[return-value]


def patch_size(text: str, multiple: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """[training] patch_size: None for auto, else three sizes (S-I, A-P, slices), each a
    positive multiple of `multiple` (ModelConfig.size_multiple); ConfigError naming the key
    otherwise."""
    if text.strip().lower() == "auto":
        return None
    where = "[training] patch_size"
    values = _convert(text, tuple[int, int, int], where, Path())
    if any(v <= 0 or v % f for v, f in zip(values, multiple, strict=True)):
        raise ConfigError(
            f"{where} = {text!r}: the sizes must be positive multiples of "
            f"{', '.join(map(str, multiple))} ([model] stem stride x 2^(depth-1)) (or auto)"
        )
    return values  # type: ignore[return-value]


def _check_paths(paths: PathsConfig) -> None:
    """Outputs may never be a raw folder or lie inside one (raw data is never written), and
    no raw folder may lie inside an output folder (a run may replace its own outputs there);
    compared through symlinks (safety.check_apart)."""
    raw = [("raw_dir =", paths.raw_dir)]
    if paths.test_raw_dir is not None:
        raw.append(("test_raw_dir =", paths.test_raw_dir))
    outputs = [
        ("[paths] preprocessed_dir =", paths.preprocessed_dir),
        ("[paths] output_dir =", paths.output_dir),
    ]
    try:
        check_apart(outputs, raw, deletable=outputs)
    except UnsafePathError as err:
        raise ConfigError(str(err)) from None


def load_config(path: Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read, override and type-check a configuration file.

    overrides: "section.key=value" strings, applied before typing (as if written in the file).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"configuration file {path} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    for item in overrides:
        match = re.fullmatch(r"\s*([a-z_]+)\.([a-z0-9_]+)\s*=(.*)", item, flags=re.S)
        if not match:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, key, value = match.groups()
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, key, value.strip())
    unknown = set(parser.sections()) - set(SECTIONS) - {"labels"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(set(SECTIONS) | {'labels'}))})"
        )
    base = path.parent
    typed = {}
    for name, cls in SECTIONS.items():
        if not parser.has_section(name):
            parser.add_section(name)
        typed[name] = _typed_section(parser, name, cls, base)
    config = Config(source=path, labels=_labels_section(parser), **typed)
    _check(config)
    return config


def driver_arguments(description: str) -> argparse.ArgumentParser:
    """The --config / --set arguments shared by every driver script."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(__file__).resolve().parent / "configuration.txt",
        help="configuration file (default: configuration.txt next to this script)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting; repeatable, e.g. --set training.epochs=2",
    )
    return parser
