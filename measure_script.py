"""Measurements per level, quality flags and a labelled picture for masks you already have.

    python measure_script.py MASK [MASK ...] --output-dir DIR [--image SCAN] [--config FILE]
        [--mask-kind auto|spider|classes|values]

Each MASK's kind is recognised (mask_kind; --mask-kind sets it) and printed with its line:
SPIDER numbering (vertebrae 1-25, partially visible 101-125, canal 100, discs 201-225; the
canal, a disc or a partial vertebra among its values) is measured as it is. Class indices
(0 background, then FILE's [labels] classes in order, as predict_script.py writes them) and
the raw values of FILE's [labels] (default configuration.txt: SPIDER's values;
configuration_spider_slabs.txt: the slabs' 76 / 29 / 150) go through the instance step first
(instances.separate_instances, [testing] min_instance_mm3).
Writes DIR/<mask>_instances.mha, <mask>_instances.csv (one row per level with disc_height_mm,
disc_height_anterior_mm, disc_height_posterior_mm, body_height_mm, canal_ap_mm, canal_area_mm2,
notes), <mask>_qc.json and <mask>_levels.png (on SCAN's mid-sagittal
slice with --image, which needs one MASK of SCAN's geometry; else on the mask alone), as
predict_script.py --instances does. Prints one line per mask with its flags ("ok" when none).
A bad mask is reported and skipped; the exit status is 1 when any was, 2 for an output that
would overwrite an input or an output folder that cannot be written (nothing is read then).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from config import ConfigError, driver_arguments, load_config
from instances import (
    REPORT_SUFFIXES,
    instance_classes,
    output_stem,
    separate_instances,
    write_instances,
)
from measure import flag_line
from safety import EXIT_UNSAFE, UnsafePathError, check_outputs, interruptible, output_names
from vertebraeseg import CaseError, check_same_geometry, map_labels, read_scan

SPIDER_VALUES = {0, 100} | set(range(1, 26)) | set(range(101, 126)) | set(range(201, 226))
KINDS = ("auto", "spider", "classes", "values")


def mask_kind(values: set[int], class_names: tuple[str, ...], lookup: dict[int, int]) -> str:
    """What a mask's values are: 'spider' (SPIDER numbering: SPIDER values, the canal or a
    disc or a partial vertebra among them), 'classes' (class indices 0..len(class_names)-1,
    as predict_script.py writes), or 'values' (the configuration's [labels] raw values).
    CaseError when none fits."""
    if values <= SPIDER_VALUES and max(values, default=0) >= 100:
        return "spider"
    if values <= set(range(len(class_names))):
        return "classes"
    if values <= set(lookup):
        return "values"
    raise ValueError(
        f"values {sorted(values)[:8]} are neither SPIDER numbers, nor class indices "
        f"0-{len(class_names) - 1}, nor values of the configuration's [labels]"
    )


def spider_mask(mask: sitk.Image, config, path: Path, kind: str = "auto") -> tuple[sitk.Image, str]:
    """The mask in SPIDER numbering, and its kind (mask_kind, or `kind` when not auto): as it
    is, or (class indices, raw values) mapped to classes and separated by the instance step.
    CaseError names the file and the values that do not fit the kind."""
    values = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
    lookup = config.labels.lookup()
    try:
        found = mask_kind(values, config.labels.class_names, lookup)
    except ValueError as err:
        if kind == "auto":
            raise CaseError(f"mask {path.name}: {err}") from None
        found = None
    kind = found if kind == "auto" else kind
    allowed = {
        "spider": SPIDER_VALUES,
        "classes": set(range(len(config.labels.class_names))),
        "values": set(lookup),
    }[kind]
    if not values <= allowed:
        raise CaseError(f"mask {path.name} holds values {sorted(values - allowed)[:8]}: not {kind}")
    if kind == "spider":
        return sitk.Cast(mask, sitk.sitkUInt16), kind
    array = sitk.GetArrayFromImage(mask)
    classes = array.astype(np.uint8) if kind == "classes" else map_labels(array, lookup)
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(mask)
    vertebra, disc, canal = instance_classes(config.labels.class_names)
    instances = separate_instances(image, vertebra, disc, canal, config.testing.min_instance_mm3)
    return instances, kind


def main(argv: list[str] | None = None) -> int:
    parser = driver_arguments(__doc__.splitlines()[0])
    parser.add_argument("masks", type=Path, nargs="+", metavar="MASK")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the report")
    parser.add_argument("--image", type=Path, help="the scan of a single MASK, for the picture")
    parser.add_argument(
        "--mask-kind",
        choices=KINDS,
        default="auto",
        help="spider (SPIDER numbering), classes (class indices, as predict_script.py "
        "writes), values (the configuration's [labels] values); auto: recognised per mask",
    )
    args = parser.parse_args(argv)
    if args.image is not None and len(args.masks) != 1:
        parser.error("--image goes with one MASK")
    try:
        names = output_names(args.masks, output_stem)
        image_input = [] if args.image is None else [("--image", args.image)]
        check_outputs(args.output_dir, names, REPORT_SUFFIXES, other_inputs=image_input)
    except UnsafePathError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNSAFE
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    failed = 0
    for path in args.masks:
        try:
            mask = read_scan(path, "mask")
            scan = None
            if args.image is not None:
                scan = read_scan(args.image, "image")
                check_same_geometry(scan, mask)
            instances, kind = spider_mask(mask, config, path, args.mask_kind)
        except (CaseError, ValueError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        written, _, qc = write_instances(instances, args.output_dir, names[path], scan)
        print(f"{path} ({KIND_WORDS[kind]}) -> {', '.join(map(str, written))}; qc: {flag_line(qc)}")
    return 1 if failed else 0


KIND_WORDS = {
    "spider": "SPIDER numbering",
    "classes": "class indices",
    "values": "the configuration's label values",
}


if __name__ == "__main__":
    sys.exit(interruptible(main))
