"""Side-by-side table of finished runs, with the mean over runs that differ only in their seeds.

    python compare_runs.py RUN [RUN ...] [--csv FILE]

RUN: a run folder ([paths] output_dir) of trainandtest_script.py with run_config.json,
metrics_epochs.csv and test_summary.csv. Runs whose configurations are equal except for paths,
[training] split_seed / seed and settings that do not change the result (threads, resume, ...)
form one setting; each setting gets one row per run and a "mean" row. Columns: mode, split
seed, training minutes (the sum of the epochs' seconds, validation included), and per class the
test Dice, HD95 (mm) and ASSD (mm) means of test_summary.csv. A cross-validated run folder
([training] folds) gives its cross-validation means (cv_summary.csv) with the Dice sd per class,
and the training minutes of all folds. Used for the README's comparison of the grid and the
spacing mode over two split seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from store_plot_metrics import write_csv
from trainandtest_script import RESUME_MAY_CHANGE, RUN_RECORD

SEED_KEYS = ("split_seed", "seed")
MEASURES = (("dice_mean", "Dice"), ("hd95_mm_mean", "HD95"), ("assd_mm_mean", "ASSD"))


def setting_of(run_config: dict) -> str:
    """The part of a run_config.json that decides the result, seeds left out, as one string."""
    kept = {section: values for section, values in run_config.items() if section != "paths"}
    kept["training"] = {
        key: value
        for key, value in kept.get("training", {}).items()
        if key not in SEED_KEYS and key not in RESUME_MAY_CHANGE
    }
    return json.dumps(kept, sort_keys=True)


def read_cv_run(run_dir: Path) -> dict[str, object]:
    """A cross-validated run folder (folds.csv, fold_*/, cv_summary.csv) as a flat row: the
    cross-validation means and their sd per class, training minutes summed over the folds."""
    summary = pd.read_csv(run_dir / "cv_summary.csv").set_index("class")
    run_config = json.loads((run_dir / RUN_RECORD).read_text(encoding="utf-8"))
    epochs = [pd.read_csv(f) for f in sorted(run_dir.glob("fold_*/metrics_epochs.csv"))]
    row: dict[str, object] = {
        "run": f"{run_dir} (cross-validation, {int(summary['n'].max())} cases)",
        "setting": setting_of(run_config),
        "mode": run_config["preprocessing"].get("mode", "grid"),
        "split_seed": run_config["training"]["split_seed"],
        "epochs": int(max(e["epoch"].max() for e in epochs)),
        "train_min": float(sum(e["seconds"].sum() for e in epochs)) / 60.0,
    }
    for column, name in MEASURES:
        for class_name, value in summary[column].items():
            row[f"{name} {class_name}"] = float(value)
    for class_name, value in summary["dice_std"].items():
        row[f"Dice sd {class_name}"] = float(value)
    return row


def read_run(run_dir: Path) -> dict[str, object]:
    """One run folder as a flat row: mode, seeds, training minutes and the test summary (a
    cross-validated folder: read_cv_run)."""
    if (run_dir / "cv_summary.csv").is_file():
        return read_cv_run(run_dir)
    files = [run_dir / RUN_RECORD, run_dir / "metrics_epochs.csv", run_dir / "test_summary.csv"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: not a finished run, missing {', '.join(missing)}")
    run_config = json.loads(files[0].read_text(encoding="utf-8"))
    epochs = pd.read_csv(files[1])
    summary = pd.read_csv(files[2]).set_index("class")
    row: dict[str, object] = {
        "run": str(run_dir),
        "setting": setting_of(run_config),
        "mode": run_config["preprocessing"].get("mode", "grid"),
        "split_seed": run_config["training"]["split_seed"],
        "epochs": int(epochs["epoch"].max()),
        "train_min": float(epochs["seconds"].sum()) / 60.0,
    }
    for column, name in MEASURES:
        for class_name, value in summary[column].items():
            row[f"{name} {class_name}"] = float(value)
    return row


def compare(run_dirs: list[Path]) -> pd.DataFrame:
    """Rows of every run, followed within each setting by the mean over its runs (run = "mean",
    split_seed = the seeds joined by "+"). Settings are numbered in order of first appearance."""
    runs = pd.DataFrame([read_run(Path(d)) for d in run_dirs])
    runs["setting"] = pd.factorize(runs["setting"])[0] + 1
    blocks = []
    for _, group in runs.groupby("setting", sort=True):
        blocks.append(group)
        if len(group) > 1:
            mean = {
                **group.mean(numeric_only=True).to_dict(),
                "run": "mean",
                "mode": group["mode"].iloc[0],
                "split_seed": "+".join(str(s) for s in group["split_seed"]),
            }
            blocks.append(pd.DataFrame([mean]))
    table = pd.concat(blocks, ignore_index=True)
    table["setting"] = table["setting"].astype(int)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    try:
        table = compare(args.runs)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        print(f"compare_runs: {err}", file=sys.stderr)
        return 1
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.drop(columns=["epochs"]).round(3).to_string(index=False))
    if args.csv:
        write_csv(table, args.csv)
        print(f"table: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
