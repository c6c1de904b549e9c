"""Driver: configuration -> patient-level split -> train -> test -> printed summary.

    python trainandtest_script.py [--config FILE] [--set section.key=value ...]
    torchrun --nproc_per_node N trainandtest_script.py [...]      (DistributedDataParallel)

Reads preprocessed_dir/manifest.csv (run preprocess_script.py first) and writes the run folder
[paths] output_dir: run_config.json, splits.csv, checkpoints/{best,last}.pt,
metrics_epochs.csv, loss/accuracy/f1/dice.png, predictions/, test_metrics.csv,
test_summary.csv, figures/ and, with [testing] instances, predictions/<case>_instances.mha/.csv
and test_instance_metrics.csv, test_instance_summary.csv (SPIDER's rules and the level agreement;
references without SPIDER numbering: discs only, as connected components).
Rerunning the same command resumes an interrupted run.
Exit status: 0 done; 1 an error, printed as one line that names the file, key or value (a bad
configuration or path, an incomplete or missing preprocessed folder, a non-finite loss, a test
phase in which no case could be tested); 130 interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from config import Config, driver_arguments, load_config
from devices import Distributed, configure_threads, pick_device
from plan import check_complete, check_plan, make_plan, read_plan
from safety import check_writable
from spider_metrics import summarise_spider
from store_plot_metrics import write_csv
from test_unet import evaluate_checkpoint, summarise
from train import (
    NonFiniteLossError,
    fit,
    fold_split,
    load_checkpoint,
    load_or_make_split,
    patient_folds,
)
from vertebraeseg import atomic_write_text, discover_cases

RUN_RECORD = "run_config.json"
MUST_MATCH = ("data", "labels", "preprocessing", "model", "training")  # a resume may not change
# [training] keys that do not change the result: a resumed run may change them freely.
RESUME_MAY_CHANGE = (
    "resume",
    "overwrite",
    "threads",
    "loader_workers",
    "device",
    "cache_on_device",
    "channels_last",
    "compile",
    "fold",  # which folds this invocation trains, not what they are
)


def changed_settings(previous: dict, record: dict) -> list[str]:
    """'[section] key (old -> new)' for every setting a resumed run may not change.

    `epochs` may grow only with scheduler = none: the cosine schedule is laid over `epochs`,
    so a longer run would jump back up the curve (from 0.02 to 0.5 of the learning rate at
    40 -> 80 epochs). Such an extension is refused; start a new run instead.
    """
    changed = []
    for section in MUST_MATCH:
        old, new = previous.get(section, {}), record[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key):
                continue
            if section == "training" and key in RESUME_MAY_CHANGE:
                continue
            if section == "training" and key == "epochs" and new.get("scheduler") == "none":
                continue
            changed.append(f"[{section}] {key} ({old.get(key)!r} -> {new.get(key)!r})")
    return changed


def read_manifest(preprocessed_dir: Path) -> pd.DataFrame:
    """The usable (status ok) rows of preprocessed_dir/manifest.csv, out_image and out_mask
    made absolute (the manifest holds them relative to its folder, so that the folder can be
    copied or moved). FileNotFoundError names a listed file that is missing; an incomplete
    folder is refused (plan.check_complete)."""
    check_complete(preprocessed_dir)
    path = preprocessed_dir / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run preprocess_script.py first")
    manifest = pd.read_csv(path, dtype={"case_id": str, "patient_id": str}, keep_default_na=False)
    usable = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    if usable.empty:
        raise ValueError(f"{path} lists no usable case")
    for column in ("out_image", "out_mask"):
        files = [preprocessed_dir / name for name in usable[column]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}: "
                "run preprocess_script.py again"
            )
        usable[column] = [str(f) for f in files]
    return usable


# What a run writes into its folder (and its fold_*/member_* run folders): the only entries
# overwrite = true deletes. Anything else in the folder is the user's and stays.
RUN_OUTPUTS = (
    RUN_RECORD,
    "checkpoints",
    "predictions",
    "figures",
    "cv",
    "fold_[0-9]*",
    "member_[0-9]*",
    "splits.csv",
    "folds.csv",
    "metrics_epochs.csv",
    "test_*.csv",
    "cv_*.csv",
    "loss.png",
    "accuracy.png",
    "f1.png",
    "dice.png",
)


class TestFailedError(RuntimeError):
    """No test case could be tested: the run trained, but its test phase produced nothing."""


def remove_run_outputs(run_dir: Path) -> list[str]:
    """Delete the entries of run_dir that match RUN_OUTPUTS (folders with what is in them);
    return the names of the entries left, which are not the project's."""
    for pattern in RUN_OUTPUTS:
        for entry in run_dir.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    return [entry.name for entry in run_dir.iterdir()]


def prepare_run_dir(run_dir: Path, record: dict, resume: bool, overwrite: bool) -> None:
    """Make sure run_dir may be used, before anything is written (rank 0 only).

    A run folder of this project with the same data/labels/preprocessing/model settings is
    continued (resume); anything else is refused unless overwrite is set, and overwrite only
    ever deletes a folder that holds this project's run record.
    """
    marker = run_dir / RUN_RECORD
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.is_file():
            raise FileExistsError(
                f"[paths] output_dir = {run_dir} exists and is not a run folder of this "
                "project: choose another output_dir"
            )
        if overwrite:
            kept = remove_run_outputs(run_dir)
            if kept:
                print(
                    f"overwrite: kept {len(kept)} entries of {run_dir} that are not this "
                    f"project's run outputs: {', '.join(sorted(kept)[:5])}"
                )
        else:
            previous = json.loads(marker.read_text(encoding="utf-8"))
            changed = changed_settings(previous, record)
            if changed:
                hint = ""
                if any(item.startswith("[training] epochs") for item in changed):
                    hint = (
                        " More epochs under scheduler = cosine would restart the learning-rate "
                        "curve; train the longer schedule as a new run."
                    )
                raise FileExistsError(
                    f"{run_dir} holds a run made with other settings ({', '.join(changed)}): "
                    "choose another output_dir, or set training.overwrite=true to replace it."
                    + hint
                )
            if not resume and (run_dir / "checkpoints" / "last.pt").is_file():
                raise FileExistsError(
                    f"{run_dir} holds a trained run and training.resume is false: choose "
                    "another output_dir, or set training.overwrite=true to replace it"
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(record, indent=2), marker)


def select_test_cases(config: Config, split: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Raw files (case_id, image_path, mask_path) of the test cases: the split's test part, or
    every labelled case of [paths] test_raw_dir. Both are segmented from their raw scans."""
    if config.paths.test_raw_dir is None:
        names = split.loc[split["split"] == "test", "case_id"]
        return manifest.loc[manifest["case_id"].isin(names), ["case_id", "image_path", "mask_path"]]
    cases, problems = discover_cases(config.paths.test_raw_dir, config.data.sequences)
    for name, reason in problems:
        print(f"external test case {name} skipped: {reason}")
    rows = [(c.case_id, str(c.image_path), str(c.mask_path)) for c in cases]
    return pd.DataFrame(rows, columns=["case_id", "image_path", "mask_path"])


def format_summary(summary: pd.DataFrame) -> str:
    """The printed test summary: means and, beside them, the cases they leave out."""
    lines = [
        f"{'class':<24}{'n':>4}{'Dice':>8}{'HD95 mm':>10}{'ASSD mm':>10}"
        f"{'n dist':>8}{'missed':>8}{'false':>7}"
    ]
    for row in summary.itertuples():
        lines.append(
            f"{row[1]:<24}{row.n:>4}{row.dice_mean:>8.3f}{row.hd95_mm_mean:>10.2f}"
            f"{row.assd_mm_mean:>10.2f}{row.n_assd:>8}{row.n_missed:>8}{row.n_false:>7}"
        )
    lines.append(
        "n dist: cases behind the HD95/ASSD means; missed: the reference has the class and the "
        "prediction none; false: the other way round"
    )
    return "\n".join(lines)


def format_measurements(table: pd.DataFrame) -> str:
    """Mean absolute difference, prediction against reference, per measurement."""
    lines = ["measurements per level, prediction - reference (test_measurements.csv):"]
    for name, group in table.groupby("measurement", sort=False):
        values = group["difference"].dropna().abs()
        lines.append(
            f"  {name:<28} mean |difference| {values.mean():.2f} over {len(values)} levels"
        )
    return "\n".join(lines)


def format_instance_summary(summary: pd.DataFrame) -> str:
    """The printed SPIDER-rules summary: instance Dice over detected instances, detection,
    ASD, and the share of detected instances named at the right level; structures the
    references do not have (NaN Dice) are left out."""
    lines = [f"{'structure':<24}{'cases':>6}{'Dice':>8}{'detection':>11}{'ASD mm':>9}{'levels':>8}"]
    for row in summary.itertuples():
        if row.dice_n == 0:
            continue
        lines.append(
            f"{row.structure:<24}{row.n_cases:>6}{row.dice_mean:>8.3f}"
            f"{row.detection_mean:>11.3f}{row.asd_mm_mean:>9.2f}{row.level_agreement_mean:>8.3f}"
        )
    return "\n".join(lines)


def run(config: Config, progress: bool | None = None) -> int:
    """One run, or with [training] folds the cross-validation (run_folds).

    progress: tqdm bars (default: only when stderr is a terminal; a log file or CI gets the
    one line per epoch without bars)."""
    if progress is None:
        progress = sys.stderr.isatty()
    check_writable(config.paths.output_dir, "[paths] output_dir =")  # before any training
    if config.training.folds:
        return run_folds(config, progress)
    if config.training.members > 1:
        return run_members(config, progress)
    return run_one(config, progress)


def split_fractions(config: Config) -> tuple[float, float]:
    """(validation, test) fractions of the patients: no test part when test_raw_dir is the
    test set."""
    t = config.training
    return (t.val_fraction, 0.0 if config.paths.test_raw_dir is not None else t.test_fraction)


def run_one(
    config: Config, progress: bool, split: pd.DataFrame | None = None, test: bool = True
) -> int:
    """Split (or the given split: case_id, patient_id, split), train (possibly distributed),
    test on rank 0 unless test is false; print where everything is."""
    t = config.training
    os.environ.setdefault("LOCAL_RANK", "0")
    device_kind = pick_device(t.device, int(os.environ["LOCAL_RANK"])).type
    dist_info = Distributed.from_environment(device_kind)
    try:
        configure_threads(t.threads, int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size)))
        run_dir = config.paths.output_dir
        record = config.as_dict()
        plan = read_plan(config.paths.preprocessed_dir)
        check_plan(
            plan,
            make_plan(config.preprocessing, config.labels, t.patch_size),
            config.paths.preprocessed_dir / "plan.json",
        )
        manifest = read_manifest(config.paths.preprocessed_dir)
        fractions = split_fractions(config)
        if dist_info.is_main:
            prepare_run_dir(run_dir, record, t.resume, t.overwrite)
            if split is None:
                split = load_or_make_split(
                    run_dir / "splits.csv", manifest, *fractions, t.split_seed
                )
            write_csv(split, run_dir / "splits.csv")
        dist_info.barrier()
        split = load_or_make_split(run_dir / "splits.csv", manifest, *fractions, t.split_seed)
        parts = {
            name: manifest[manifest["case_id"].isin(split.loc[split["split"] == name, "case_id"])]
            for name in ("train", "val")
        }
        if dist_info.is_main:
            counts = split.groupby("split")["patient_id"].nunique().to_dict()
            print(f"patients per split: {counts}; run folder {run_dir}")
            unsplit = sorted(set(manifest["case_id"]) - set(split["case_id"]))
            if unsplit:
                print(
                    f"note: {len(unsplit)} cases of the manifest are not in the saved "
                    f"{run_dir / 'splits.csv'} and are not used ({', '.join(unsplit[:5])}"
                    f"{', ...' if len(unsplit) > 5 else ''}): a run keeps its split; use a new "
                    "output_dir to split again with them"
                )
        best = fit(
            parts["train"],
            parts["val"],
            run_dir,
            config.model,
            t,
            config.labels.class_names,
            record,
            plan,
            dist_info,
            progress,
        )
        # every rank past its last collective before any tears its group down: a gloo rank
        # destroyed while a peer still talks to it can abort at exit
        dist_info.barrier()
    finally:
        dist_info.close()
    if not dist_info.is_main or not test:
        return 0
    cases = select_test_cases(config, split, manifest)
    path = best if config.testing.checkpoint == "best" else best.with_name("last.pt")
    test_and_report(config, [path], cases, run_dir, path.name, progress)
    return 0


def test_and_report(
    config: Config,
    checkpoints: list[Path],
    cases: pd.DataFrame,
    run_dir: Path,
    model_name: str,
    progress: bool,
) -> None:
    """Test one checkpoint, or the ensemble of several (evaluate_checkpoint: the mean of their
    class probabilities), on `cases` with the files in run_dir, and print the summaries;
    model_name says which model in the first line. No cases: a line says testing is skipped."""
    if cases.empty:
        print("no test cases (test_fraction = 0 and no test_raw_dir): testing skipped")
        return
    states = [load_checkpoint(path) for path in checkpoints]
    metrics, summary, instance_summary = evaluate_checkpoint(
        states,
        cases,
        run_dir,
        pick_device(config.training.device),
        config.testing,
        progress,
    )
    tested = metrics["case_id"].nunique()
    if tested == 0:
        raise TestFailedError(
            f"none of the {len(cases)} test cases could be tested (each skipped case is named "
            "above with its reason)"
        )
    skipped = f", {len(cases) - tested} skipped" if tested < len(cases) else ""
    print(
        f"test on {tested} cases{skipped} with {model_name}, each segmented from its raw scan "
        "(metrics in the scan's own geometry):"
    )
    print(format_summary(summary))
    measurements = run_dir / "test_measurements.csv"
    if measurements.is_file():
        print(format_measurements(pd.read_csv(measurements)))
    if instance_summary is not None:
        print(
            "SPIDER challenge metric (instances; test_instance_summary.csv; levels: share of "
            "detected instances named right; semantic references: discs only, as connected "
            "components numbered from L5/S1):"
        )
        print(format_instance_summary(instance_summary))
    print(
        f"outputs: {run_dir}/test_summary.csv, test_metrics.csv, predictions/, figures/, "
        "metrics_epochs.csv, *.png, checkpoints/"
    )


def member_config(config: Config, member: int) -> Config:
    """The configuration of one member of [training] members: its own folder
    output_dir/member_<member> and seed (seed + member), one network."""
    return replace(
        config,
        paths=replace(config.paths, output_dir=config.paths.output_dir / f"member_{member}"),
        training=replace(config.training, seed=config.training.seed + member, members=1),
    )


def run_members(config: Config, progress: bool) -> int:
    """[training] members = N: N networks trained on one split (seeds seed, seed + 1, ...),
    each a run folder output_dir/member_<i> (run_one without its test: resumed when
    interrupted, nothing trained when finished); when all have finished, the test part with
    their ensemble, its files in output_dir itself."""
    t, output = config.training, config.paths.output_dir
    manifest = read_manifest(config.paths.preprocessed_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        prepare_run_dir(output, config.as_dict(), t.resume, t.overwrite)
    split = load_or_make_split(
        output / "splits.csv", manifest, *split_fractions(config), t.split_seed
    )
    if main_rank:
        write_csv(split, output / "splits.csv")
    for member in range(t.members):
        member_run = member_config(config, member)
        if main_rank:
            print(f"member {member} of {t.members}: {member_run.paths.output_dir}")
        code = run_one(member_run, progress, split, test=False)
        if code:
            return code
    if not main_rank:
        return 0
    cases = select_test_cases(config, split, manifest)
    name = f"{config.testing.checkpoint}.pt"
    checkpoints = [
        member_config(config, m).paths.output_dir / "checkpoints" / name for m in range(t.members)
    ]
    test_and_report(
        config, checkpoints, cases, output, f"the ensemble of the {t.members} members", progress
    )
    return 0


def run_folds(config: Config, progress: bool) -> int:
    """k-fold cross-validation ([training] folds, fold): folds.csv written once in output_dir
    and reused; each fold a run folder output_dir/fold_<f> (run_one with that fold's split:
    resumed when interrupted, nothing trained when finished). When every fold has finished:
    cross-validation results (cross_validate) and, with [testing] ensemble, the test part
    with the ensemble of the fold models in output_dir itself."""
    t, output = config.training, config.paths.output_dir
    manifest = read_manifest(config.paths.preprocessed_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    folds_path = output / "folds.csv"
    if folds_path.is_file():
        folds = pd.read_csv(folds_path, dtype={"case_id": str, "patient_id": str})
        if folds["fold"].max() + 1 != t.folds:
            raise ValueError(
                f"{folds_path} holds {folds['fold'].max() + 1} folds, the configuration "
                f"{t.folds}: use another output_dir"
            )
    else:
        folds = patient_folds(manifest, t.folds, t.test_fraction, t.split_seed)
        if main_rank:
            prepare_run_dir(output, config.as_dict(), t.resume, t.overwrite)
            write_csv(folds, folds_path)
    todo = range(t.folds) if t.fold == "all" else [int(t.fold)]
    for fold in todo:
        fold_config = replace(
            config, paths=replace(config.paths, output_dir=output / f"fold_{fold}")
        )
        if main_rank:
            print(f"fold {fold} of {t.folds}: {fold_config.paths.output_dir}")
        code = run_one(fold_config, progress, fold_split(folds, fold), not config.testing.ensemble)
        if code:
            return code
    if not main_rank:
        return 0
    unfinished = [f for f in range(t.folds) if not fold_finished(output / f"fold_{f}", t.epochs)]
    if unfinished:
        print(f"folds {unfinished} are not trained yet: cross-validation results wait for them")
        return 0
    device = pick_device(t.device)
    cross_validate(config, folds, manifest, device, progress)
    held_out = folds.assign(split=np.where(folds["fold"] < 0, "test", "train"))
    cases = select_test_cases(config, held_out, manifest)  # or every case of test_raw_dir
    if config.testing.ensemble and not cases.empty:
        checkpoints = [output / f"fold_{f}" / "checkpoints" / "best.pt" for f in range(t.folds)]
        name = f"the ensemble of the {t.folds} fold models"
        test_and_report(config, checkpoints, cases, output, name, progress)
    return 0


def fold_finished(run_dir: Path, epochs: int) -> bool:
    """Whether a fold's run folder holds its last epoch (checkpoints/last.pt)."""
    last = run_dir / "checkpoints" / "last.pt"
    return last.is_file() and load_checkpoint(last)["epoch"] >= epochs


def cross_validate(
    config: Config, folds: pd.DataFrame, manifest: pd.DataFrame, device, progress: bool
) -> None:
    """Each fold's validation patients, segmented from their raw scans by that fold's best
    model (evaluate_checkpoint, files in fold_<f>/cv/): output_dir/cv_metrics.csv (one row per
    case and class, with the fold), cv_summary.csv (as test_summary.csv) and, where the
    instance step is scored, cv_instance_metrics.csv and cv_instance_summary.csv."""
    output, class_names = config.paths.output_dir, config.labels.class_names
    metrics, instances = [], []
    for fold in range(config.training.folds):
        run_dir = output / f"fold_{fold}"
        names = folds.loc[folds["fold"] == fold, "case_id"]
        cases = manifest.loc[
            manifest["case_id"].isin(names), ["case_id", "image_path", "mask_path"]
        ]
        state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
        fold_metrics, _, instance_summary = evaluate_checkpoint(
            state, cases, run_dir / "cv", device, config.testing, progress
        )
        metrics.append(fold_metrics.assign(fold=fold))
        if instance_summary is not None:
            per_case = pd.read_csv(
                run_dir / "cv" / "test_instance_metrics.csv", dtype={"case_id": str}
            )
            instances.append(per_case.assign(fold=fold))
    table = pd.concat(metrics, ignore_index=True)
    summary = summarise(table, class_names)
    write_csv(table, output / "cv_metrics.csv")
    write_csv(summary, output / "cv_summary.csv")
    patients = folds.loc[folds["fold"] >= 0, "patient_id"].nunique()
    print(
        f"cross-validation over {patients} patients ({config.training.folds} folds; each "
        "case predicted from its raw scan by the fold model that did not train on it):"
    )
    print(format_summary(summary))
    if instances:
        per_case = pd.concat(instances, ignore_index=True)
        instance_summary = summarise_spider(per_case)
        write_csv(per_case, output / "cv_instance_metrics.csv")
        write_csv(instance_summary, output / "cv_instance_summary.csv")
        print(format_instance_summary(instance_summary))
    print(f"outputs: {output}/folds.csv, cv_metrics.csv, cv_summary.csv, fold_*/")


def main(argv: list[str] | None = None) -> int:
    args = driver_arguments(__doc__.splitlines()[0]).parse_args(argv)
    config = None
    try:
        config = load_config(args.config, args.overrides)
        return run(config)
    except (ValueError, OSError, NonFiniteLossError, TestFailedError) as err:
        # ConfigError, UnsafePathError and a bad checkpoint are ValueErrors; a missing,
        # unreadable or unwritable file an OSError (which names it)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = config is not None and any(config.paths.output_dir.rglob("last.pt"))
        print(
            "interrupted: "
            + (
                "the last finished epoch is saved in checkpoints/last.pt; run the same "
                "command again to resume"
                if saved
                else "no epoch had finished, so nothing was saved; run the command again"
            ),
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
