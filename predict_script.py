"""Segment new scans (no mask needed) with a trained checkpoint.

    python predict_script.py --checkpoint RUN/checkpoints/best.pt INPUT [INPUT ...] --output-dir DIR

INPUT: any 3-D scalar image SimpleITK reads (.mha, .nii.gz, .nrrd, ...), in any orientation.
Writes DIR/<input name>.mha: uint8 class indices (0 background, then the [labels] classes in
order, listed in DIR/classes.csv) with exactly the scan's size, spacing, origin and direction.
The scan is preprocessed by the plan stored in the checkpoint (never the current configuration
file), through the same function the test loop uses. A bad input is reported
with its reason and skipped; the exit status is 0 when every input was segmented, else 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from store_plot_metrics import write_csv
from test_unet import Predictor, segment_scan
from train import configure_threads, load_checkpoint, pick_device
from vertebraeseg import CaseError, atomic_write_image, read_scan, split_suffix


def output_name(path: Path) -> str:
    parts = split_suffix(path.name)
    return (parts[0] if parts else path.stem) + ".mha"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="RUN/checkpoints/best.pt")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="scans to segment")
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the masks")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument(
        "--labels-nearest",
        action="store_true",
        help="map grid labels back by nearest neighbour instead of resampling probabilities",
    )
    args = parser.parse_args(argv)
    configure_threads(0, 1)
    try:
        state = load_checkpoint(args.checkpoint)
        predictor = Predictor.from_checkpoint(
            state, pick_device(args.device), not args.labels_nearest
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    classes = pd.DataFrame(
        {"index": range(len(state["class_names"])), "class": state["class_names"]}
    )
    write_csv(classes, args.output_dir / "classes.csv")
    failed = 0
    for path in tqdm(args.inputs, desc="predict", unit="scan", disable=not sys.stderr.isatty()):
        try:
            scan = read_scan(path, "input")
            mask = segment_scan(predictor, scan).classes
        except (CaseError, OSError) as err:
            tqdm.write(f"error: {path}: {err}")
            failed += 1
            continue
        target = args.output_dir / output_name(path)
        atomic_write_image(mask, target)
        tqdm.write(f"{path} -> {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
