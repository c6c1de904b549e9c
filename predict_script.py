"""Segment new scans (no mask needed) with a trained checkpoint.

    python predict_script.py --checkpoint RUN/checkpoints/best.pt INPUT [INPUT ...] \
        --output-dir DIR [--instances]
    python predict_script.py --checkpoint A.pt B.pt ... (or CV_RUN_DIR) INPUT ... --output-dir DIR

Several checkpoints (or an ensemble's run folder: every fold_*/ or member_*/
checkpoints/best.pt in it) predict as an ensemble: the mean of their class probabilities on the
scan's grid, then the arg-max, then the instance step once; checkpoints whose plans or class
names differ are refused with the key and both values. The outputs are named as for one model.

INPUT: any 3-D scalar image SimpleITK reads (.mha, .nii.gz, .nrrd, ...), in any orientation,
or a folder holding one DICOM series (read with SimpleITK's series reader; a folder with no
series or several is an error that names it).
Writes DIR/<input name>.mha: uint8 class indices (0 background, then the [labels] classes in
order, listed in DIR/classes.csv) with exactly the scan's size, spacing, origin and direction.
With --instances also DIR/<input name>_instances.mha (one label per vertebra and disc in SPIDER
numbering: 1 = L5 upward, 201 = L5/S1 upward, 100 canal) and DIR/<input name>_instances.csv
(label, structure, level, volume in mm^3, centroid in LPS mm, S-I extent in mm, level_note:
why the level names may be wrong, which the scan's printed line repeats).
The scan is preprocessed by the plan stored in the checkpoint (never the current configuration
file), through the same function the test loop uses. A bad input is reported with its reason
and skipped; the exit status is 0 when every input was segmented, else 1 (a skipped input, a
bad checkpoint or value), 2 when an output would overwrite an input or a checkpoint, two
inputs would share an output name, or the output folder cannot be written: all checked before
any model loads (safety.py), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from devices import configure_threads, pick_device
from instances import REPORT_SUFFIXES, level_note
from measure import flag_line
from safety import EXIT_UNSAFE, UnsafePathError, check_outputs, interruptible, output_names
from store_plot_metrics import write_csv
from test_unet import Predictor, check_same_plans, segment_scan, testing_from_checkpoint
from train import load_checkpoint
from vertebraeseg import CaseError, check_geometry, read_scan, split_suffix


def output_name(path: Path) -> str:
    """'scan.nii.gz' -> 'scan'; a DICOM folder -> its name."""
    parts = split_suffix(path.name)
    return parts[0] if parts else path.stem if path.is_file() else path.name


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in `folder` as a 3-D image; CaseError names the folder when it
    holds no series or several."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise CaseError(f"folder {folder} holds no DICOM series")
    if len(series) > 1:
        raise CaseError(
            f"folder {folder} holds {len(series)} DICOM series ({', '.join(series)}): "
            "give a folder with one series"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise CaseError(f"DICOM series in {folder} is unreadable ({str(err)[:160]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"DICOM series in {folder} is not a 3-D scalar image")
    check_geometry(image, f"DICOM series in {folder}")
    return image


def read_input(path: Path) -> sitk.Image:
    """An image file, or a folder of one DICOM series."""
    if path.is_dir():
        return read_dicom_series(path)
    return read_scan(path, "input")


def summary_row(name: str, table: pd.DataFrame, qc: dict) -> dict[str, object]:
    """One scan in summary.csv: counts of vertebrae and discs, the flags, and the disc heights
    per level side by side ('L5/S1 disc_height_mm', ...)."""
    row: dict[str, object] = {
        "scan": name,
        "vertebrae": int(table["structure"].isin(["vertebra", "partial vertebra"]).sum()),
        "discs": int((table["structure"] == "disc").sum()),
        "qc_ok": bool(qc["ok"]),
        "flags": ", ".join(flag["name"] for flag in qc["flags"]),
    }
    for disc in table[table["structure"] == "disc"].itertuples():
        row[f"{disc.level} disc_height_mm"] = disc.disc_height_mm
    return row


def ensemble_members(run_dir: Path) -> list[Path]:
    """The best checkpoints of the networks of an ensemble's run folder: fold_*/ of
    [training] folds, or member_*/ of [training] members; [] for any other folder."""
    for pattern in ("fold_*/checkpoints/best.pt", "member_*/checkpoints/best.pt"):
        found = sorted(run_dir.glob(pattern))
        if found:
            return found
    return []


def checkpoint_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """--checkpoint's values -> (checkpoint files, the scans that argparse took along).
    A .pt file is a checkpoint; a cross-validated run folder gives every
    fold_*/checkpoints/best.pt in it, a run folder of [training] members every
    member_*/checkpoints/best.pt, a run folder its checkpoints/best.pt; the first value
    that is none of these and everything after it are input scans."""
    checkpoints: list[Path] = []
    for position, path in enumerate(paths):
        members = ensemble_members(path) if path.is_dir() else []
        if path.suffix == ".pt":
            checkpoints.append(path)
        elif members:
            checkpoints += members
        elif path.is_dir() and (path / "checkpoints" / "best.pt").is_file():
            checkpoints.append(path / "checkpoints" / "best.pt")
        else:
            return checkpoints, list(paths[position:])
    return checkpoints, []


OUTPUT_SUFFIXES = (".mha",) + REPORT_SUFFIXES  # per scan
RUN_FILES = ("classes.csv", "summary.csv")  # one per output folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        required=True,
        help="RUN/checkpoints/best.pt; several, or a folds or members run folder: an ensemble",
    )
    parser.add_argument(
        "inputs", type=Path, nargs="*", metavar="INPUT", help="scans or DICOM series folders"
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="folder for the masks")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument(
        "--labels-nearest",
        action="store_true",
        help="map grid labels back by nearest neighbour instead of resampling probabilities",
    )
    parser.add_argument(
        "--instances",
        action="store_true",
        help="also write one label per vertebra and disc (SPIDER numbering) and a table",
    )
    parser.add_argument(
        "--min-instance-mm3",
        type=float,
        default=None,
        help="drop instance fragments smaller than this (default: the checkpoint's "
        "[testing] min_instance_mm3)",
    )
    args = parser.parse_args(argv)
    checkpoints, inputs = checkpoint_files(args.checkpoint)
    inputs += args.inputs
    if not inputs:
        parser.error("no INPUT scan given")
    if args.min_instance_mm3 is not None and not (
        math.isfinite(args.min_instance_mm3) and args.min_instance_mm3 >= 0
    ):
        parser.error(f"--min-instance-mm3 {args.min_instance_mm3}: a volume in mm^3, >= 0")
    configure_threads(0, 1)
    try:  # every path checked before a model loads
        names = output_names(inputs, output_name)
        checkpoint_inputs = [("checkpoint", path) for path in checkpoints]
        check_outputs(args.output_dir, names, OUTPUT_SUFFIXES, RUN_FILES, checkpoint_inputs)
    except UnsafePathError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNSAFE
    try:
        device = pick_device(args.device)
    except (ValueError, RuntimeError) as err:
        print(f"error: --device: {err}", file=sys.stderr)
        return 1
    try:
        if not checkpoints:
            raise FileNotFoundError(f"no checkpoint in {', '.join(map(str, args.checkpoint))}")
        states = [load_checkpoint(path) for path in checkpoints]
        check_same_plans(states, [str(path) for path in checkpoints])
        state = states[0]
        testing = testing_from_checkpoint(state)  # overlap, TTA, post-processing of the run
        testing = replace(
            testing,
            map_probabilities=not args.labels_nearest,
            instances=args.instances,
            min_instance_mm3=(
                testing.min_instance_mm3 if args.min_instance_mm3 is None else args.min_instance_mm3
            ),
        )
        predictor = Predictor.from_checkpoint(states, device, testing)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    classes = pd.DataFrame(
        {"index": range(len(state["class_names"])), "class": state["class_names"]}
    )
    write_csv(classes, args.output_dir / "classes.csv")
    failed = 0
    if len(states) > 1:
        print(f"ensemble of {len(states)} models: {', '.join(map(str, checkpoints))}")
    summary = []
    for path in tqdm(inputs, desc="predict", unit="scan", disable=not sys.stderr.isatty()):
        try:
            scan = read_input(path)
            segmentation = segment_scan(predictor, scan)
        except (CaseError, OSError, ValueError, RuntimeError) as err:  # reported, skipped
            tqdm.write(f"error: {path}: {err}")
            failed += 1
            continue
        written, table, qc = segmentation.write(args.output_dir, names[path], scan)
        line = f"{path} -> {', '.join(str(p) for p in written)}"
        if qc is not None:
            note = level_note(segmentation.instances)
            line += (f" (levels: {note})" if note else "") + f"; qc: {flag_line(qc)}"
            summary.append(summary_row(names[path], table, qc))
        tqdm.write(line)
    if summary:
        write_csv(pd.DataFrame(summary), args.output_dir / "summary.csv")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(interruptible(main))
