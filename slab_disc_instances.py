"""Disc instances and their level names on references without instance numbering (e.g. the
real SPIDER slabs).

    python slab_disc_instances.py --config configuration_spider_slabs.txt [--run-dir RUN]
        [--predictions DIR]

The real slabs' masks are semantic (one value for every disc), so they carry no instance
reference. Discs are physically separate, though: each connected component (full
connectivity) of the reference's disc class, numbered 201, 202, ... upward from the most
inferior, is the reference instance (spider_metrics.disc_components_reference); the lowest is
L5/S1 wherever the field of view holds the sacrum, as in the slabs. The predicted discs are the
labels > 200 of DIR/<case>_instances.mha: by default RUN/predictions, written by the test loop
with [testing] instances = true; or any folder that `python instances.py` wrote from saved
class-index predictions. Every case of the manifest with such a file is scored.

Per case, by the SPIDER challenge's rules (spider_metrics.spider_scores: matching by largest
overlap, Dice < 0.1 counts as missed): disc Dice, detection, level agreement (the share of
detected reference discs whose matched predicted disc has the same name), the predicted and
reference disc counts, and where the extra (unmatched predicted) and missed discs lie: at the
scan's top or bottom edge (touching its first or last row along S-I) or inside the column.
Writes RUN/test_disc_instances_from_components.csv (or DIR/disc_instances_from_components.csv
with --predictions) and prints the table and the means: Dice, detection, level agreement
(pooled over discs), cases with every name right, cases with the exact disc count.
Reference components smaller than [testing] min_instance_mm3 are left out (label noise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from config import ConfigError, driver_arguments, load_config
from instances import CANONICAL, discs_only, level_note
from spider_metrics import disc_components_reference, spider_instances, spider_scores
from store_plot_metrics import write_csv
from trainandtest_script import read_manifest


def edge_labels(instances: sitk.Image) -> set[int]:
    """Labels > 0 with a voxel on the first or last row along S-I (rows of the PIR-reoriented
    mask): structures the field of view cuts at its top or bottom."""
    array = sitk.GetArrayViewFromImage(sitk.DICOMOrient(instances, CANONICAL))
    return {int(v) for v in np.unique(np.concatenate([array[:, 0], array[:, -1]]))} - {0}


def score_discs(reference: sitk.Image, predicted: sitk.Image) -> dict[str, object]:
    """Disc scores of one case: reference from disc_components_reference, predicted any
    SPIDER-numbered instance mask of the same geometry (labels <= 200 are ignored)."""
    discs = discs_only(predicted)
    scores = {k: v for k, v in spider_scores(reference, discs).items() if k.startswith("discs")}
    matches = spider_instances(reference, discs)
    predicted_labels = set(np.unique(sitk.GetArrayViewFromImage(discs)).tolist()) - {0}
    extra = predicted_labels - set(matches.loc[matches["detected"], "matched_label"].tolist())
    missed = set(matches.loc[~matches["detected"], "label"].tolist())
    edges = edge_labels(discs), edge_labels(reference)
    return {
        **scores,
        "discs_predicted": len(predicted_labels),
        "extra_at_edge": len(extra & edges[0]),
        "extra_inside": len(extra - edges[0]),
        "missed_at_edge": len(missed & edges[1]),
        "missed_inside": len(missed - edges[1]),
        "level_note": level_note(predicted),
    }


def main(argv: list[str] | None = None) -> int:
    parser = driver_arguments(__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="default: [paths] output_dir")
    parser.add_argument(
        "--predictions", type=Path, help="folder of <case>_instances.mha (default RUN/predictions)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    run_dir = args.run_dir or config.paths.output_dir
    folder = args.predictions or run_dir / "predictions"
    disc_values = dict(config.labels.classes)["intervertebral_discs"]
    manifest = read_manifest(config.paths.preprocessed_dir)
    rows = []
    for case in manifest.itertuples():
        path = folder / f"{case.case_id}_instances.mha"
        if not path.is_file():
            continue
        reference = disc_components_reference(
            sitk.ReadImage(case.mask_path), disc_values, config.testing.min_instance_mm3
        )
        rows.append({"case_id": case.case_id, **score_discs(reference, sitk.ReadImage(str(path)))})
    if not rows:
        print(
            f"error: no <case>_instances.mha of the manifest's cases in {folder}", file=sys.stderr
        )
        return 1
    table = pd.DataFrame(rows)
    name = "disc_instances_from_components.csv"
    write_csv(table, folder / name if args.predictions else run_dir / f"test_{name}")
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.drop(columns=["discs_asd_mm"]).to_string(index=False))
    agreement = table["discs_named"].sum() / max(table["discs_detected"].sum(), 1)
    print(
        f"{len(table)} cases: disc instance Dice {table['discs_dice'].mean():.3f}, detection "
        f"{table['discs_detection'].mean():.3f}, level agreement {agreement:.3f} "
        f"({table['discs_named'].sum()} of {table['discs_detected'].sum()} detected discs); "
        f"every name right in {(table['discs_named'] == table['discs_detected']).sum()}, "
        f"exact disc count in {(table['discs_predicted'] == table['discs_n']).sum()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
