"""Measurements per level, quality flags and a labelled picture for masks you already have.

    python measure_script.py MASK [MASK ...] --output-dir DIR [--image SCAN] [--config FILE]

MASK in SPIDER numbering (vertebrae 1-25, partially visible 101-125, canal 100, discs 201-225)
is measured as it is. Any other mask is semantic: its values are mapped to classes by FILE's
[labels] (default configuration.txt: SPIDER's values; configuration_spider_slabs.txt: the
slabs' 76 / 29 / 150) and go through the instance step first (instances.separate_instances,
[testing] min_instance_mm3). Writes DIR/<mask>_instances.mha, <mask>_instances.csv (one row per
level with disc_height_mm, disc_height_anterior_mm, disc_height_posterior_mm, body_height_mm,
canal_ap_mm, canal_area_mm2, notes), <mask>_qc.json and <mask>_levels.png (on SCAN's mid-sagittal
slice with --image, which needs one MASK of SCAN's geometry; else on the mask alone), as
predict_script.py --instances does. Prints one line per mask with its flags ("ok" when none).
A bad mask is reported and skipped; the exit status is 1 when any was.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from config import ConfigError, driver_arguments, load_config
from instances import instance_classes, output_stem, separate_instances, write_instances
from measure import flag_line
from vertebraeseg import CaseError, check_same_geometry, read_scan

SPIDER_VALUES = {0, 100} | set(range(1, 26)) | set(range(101, 126)) | set(range(201, 226))


def spider_mask(mask: sitk.Image, config, path: Path) -> sitk.Image:
    """The mask in SPIDER numbering: as it is, or (semantic values) mapped by config's
    [labels] and separated by the instance step. CaseError names values no class takes."""
    values = set(np.unique(sitk.GetArrayViewFromImage(mask)).tolist())
    if values <= SPIDER_VALUES and values & (set(range(1, 26)) | set(range(201, 226))):
        return sitk.Cast(mask, sitk.sitkUInt16)
    lookup = {
        value: index for index, (_, raws) in enumerate(config.labels.classes, 1) for value in raws
    }
    unknown = sorted(values - set(lookup) - {0})
    if unknown:
        raise CaseError(
            f"mask {path.name} holds values {unknown[:8]} that are neither SPIDER numbers nor "
            "values of the configuration's [labels]"
        )
    array = sitk.GetArrayFromImage(mask)
    classes = np.zeros(array.shape, np.uint8)
    for value, index in lookup.items():
        classes[array == value] = index
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(mask)
    vertebra, disc, canal = instance_classes(config.labels.class_names)
    return separate_instances(image, vertebra, disc, canal, config.testing.min_instance_mm3)


def main(argv: list[str] | None = None) -> int:
    parser = driver_arguments(__doc__.splitlines()[0])
    parser.add_argument("masks", type=Path, nargs="+", metavar="MASK")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the report")
    parser.add_argument("--image", type=Path, help="the scan of a single MASK, for the picture")
    args = parser.parse_args(argv)
    if args.image is not None and len(args.masks) != 1:
        parser.error("--image goes with one MASK")
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
            instances = spider_mask(mask, config, path)
        except (CaseError, ValueError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        written, _, qc = write_instances(instances, args.output_dir, output_stem(path), scan)
        print(f"{path} -> {', '.join(map(str, written))}; qc: {flag_line(qc)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
