"""Disc instance Dice on references without instance numbering (e.g. the real SPIDER slabs).

    python slab_disc_instances.py --config configuration_spider_slabs.txt [--run-dir RUN]

The real slabs' masks are semantic (one value for every disc), so they carry no instance
reference. Discs are physically separate, though: each connected component (full connectivity)
of the reference's disc class, numbered 201, 202, ... from the bottom, serves as the reference
instance. The predicted discs are the labels > 200 of predictions/<case>_instances.mha written
by the test loop with [testing] instances = true. Both go through spider_metrics.spider_scores
(the SPIDER challenge's rules: matching by largest overlap, Dice < 0.1 counts as missed).
Prints one row per test case and the mean; writes RUN/test_disc_instances_from_components.csv.
Reference components smaller than [testing] min_instance_mm3 are left out (label noise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from config import ConfigError, driver_arguments, load_config
from spider_metrics import spider_scores
from store_plot_metrics import write_csv
from trainandtest_script import read_manifest


def disc_reference(mask: sitk.Image, disc_values: tuple[int, ...], min_mm3: float) -> sitk.Image:
    """Connected components of the disc values, numbered 201.. from the most inferior (PIR row
    order of their centroids), in the mask's geometry (uint16)."""
    in_discs = np.isin(sitk.GetArrayFromImage(mask), disc_values).astype(np.uint8)
    discs = sitk.GetImageFromArray(in_discs)
    discs.CopyInformation(mask)
    components = sitk.RelabelComponent(
        sitk.ConnectedComponent(discs, True),
        minimumObjectSize=int(np.ceil(min_mm3 / np.prod(mask.GetSpacing()))),
    )
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(components)
    inferior = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation("PIR")[1::3]
    height = {
        label: float(np.dot(shapes.GetCentroid(label), inferior)) for label in shapes.GetLabels()
    }
    order = sorted(height, key=height.get, reverse=True)  # most inferior first
    array = sitk.GetArrayFromImage(components)
    numbered = np.zeros(array.shape, np.uint16)
    for rank, label in enumerate(order):
        numbered[array == label] = 201 + rank
    result = sitk.GetImageFromArray(numbered)
    result.CopyInformation(mask)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = driver_arguments(__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="default: [paths] output_dir")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    run_dir = args.run_dir or config.paths.output_dir
    disc_values = dict(config.labels.classes)["intervertebral_discs"]
    split = pd.read_csv(run_dir / "splits.csv", dtype=str)
    manifest = read_manifest(config.paths.preprocessed_dir)
    test = manifest[manifest["case_id"].isin(split.loc[split["split"] == "test", "case_id"])]
    rows = []
    for case in test.itertuples():
        reference = disc_reference(
            sitk.ReadImage(case.mask_path), disc_values, config.testing.min_instance_mm3
        )
        predicted = sitk.ReadImage(str(run_dir / "predictions" / f"{case.case_id}_instances.mha"))
        discs_only = sitk.Cast(
            predicted * sitk.Cast(predicted > 200, predicted.GetPixelID()), sitk.sitkUInt16
        )
        discs_only.CopyInformation(reference)
        scores = spider_scores(reference, discs_only)
        rows.append({"case_id": case.case_id, **{k: v for k, v in scores.items() if "disc" in k}})
    table = pd.DataFrame(rows)
    write_csv(table, run_dir / "test_disc_instances_from_components.csv")
    print(table.to_string(index=False))
    print(
        f"mean disc instance Dice {table['discs_dice'].mean():.3f}, "
        f"detection {table['discs_detection'].mean():.3f} over {len(table)} cases"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
