"""Driver: configuration -> every usable case on the fixed grid + manifest.csv.

    python preprocess_script.py [--config FILE] [--set section.key=value ...]

Reads [paths] raw_dir (SPIDER layout: images/, masks/, optional overview.csv) and writes
preprocessed_dir/images/<case>.mha (float32 grid image), preprocessed_dir/masks/<case>.mha
(uint8 class indices), preprocessed_dir/records/<case>.json (what makes a rerun skip the case)
preprocessed_dir/manifest.csv (one row per case, ok or skipped with the reason) and
preprocessed_dir/plan.json (every setting that decides the data: training checks it against the
configuration, and each checkpoint carries it). Test cases, [paths] test_raw_dir included, are
not preprocessed here: the test loop segments them from their raw scans, as a user's scans are.
With [data] synthetic_demo = true a missing raw_dir is filled with the synthetic demo set first.

Exit status: 0 all cases ok, 3 some cases skipped (the summary says how many), 1 no usable case
or a configuration error, 130 interrupted.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from atomic import remove_stale_temporaries
from config import (
    Config,
    ConfigError,
    PreprocessingConfig,
    driver_arguments,
    load_config,
    patch_size,
    target_spacing,
)
from plan import make_plan, mark_incomplete, write_plan
from safety import check_writable
from spacing_mode import auto_patch_size, auto_target_spacing, format_spacing, pir_spacing_and_size
from synthetic_spine import generate_dataset
from vertebraeseg import atomic_write_text, discover_cases, preprocess_case, read_overview

EXIT_SKIPPED = 3
OUTPUT_FOLDERS = ("images", "masks", "records")  # what preprocess_case writes in out_dir


def _single_threaded_worker() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def preprocess_dataset(
    raw_dir: Path,
    out_dir: Path,
    sequences: tuple[str, ...],
    settings: PreprocessingConfig,
    lookup: dict[int, int],
    require_masks: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Preprocess every case of raw_dir into out_dir, in parallel; write out_dir/manifest.csv.

    Returns the manifest: one row per discovered case or problem file, status ok/skipped.
    Up-to-date cases are reused, not recomputed. Raw files are only read.
    """
    cases, problems = discover_cases(raw_dir, sequences, require_masks)
    overview = read_overview(raw_dir)  # a bad overview.csv is named before any work
    if not cases and not problems:
        raise ConfigError(f"{raw_dir / 'images'} holds no image: nothing to preprocess")
    remove_stale_temporaries([out_dir] + [out_dir / sub for sub in OUTPUT_FOLDERS])
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = settings.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(cases)))
    work = partial(preprocess_case, out_dir=out_dir, settings=settings, lookup=lookup)
    rows = [
        {"case_id": name, "status": "skipped", "reason": reason, "reused": False}
        for name, reason in problems
    ]
    bar = tqdm(total=len(cases), desc="preprocess", unit="case", disable=not progress)
    if workers == 1:
        for files in cases:
            rows.append(work(files))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, context, _single_threaded_worker) as pool:
            futures = {pool.submit(work, files): files for files in cases}
            for future in as_completed(futures):
                rows.append(future.result())
                bar.update()
    bar.close()
    manifest = pd.DataFrame(rows).sort_values("case_id", kind="stable").reset_index(drop=True)
    if overview is not None:
        known = set(overview["new_file_name"].astype(str))
        manifest["in_overview"] = manifest["case_id"].isin(known)
    atomic_write_text(manifest.to_csv(index=False), out_dir / "manifest.csv")
    return manifest


def ensure_raw_data(config: Config) -> None:
    """Generate the synthetic demo set when configured so and missing; else demand raw_dir."""
    raw_dir = config.paths.raw_dir
    if raw_dir.exists():
        return
    if not config.data.synthetic_demo:
        raise ConfigError(f"[paths] raw_dir = {raw_dir} does not exist")
    print(
        f"raw_dir {raw_dir} does not exist: generating the synthetic SPIDER-format demo set "
        f"({config.data.demo_patients} patients, seed {config.data.demo_seed})"
    )
    generate_dataset(raw_dir, config.data.demo_patients, config.data.demo_seed)


def summarise(manifest: pd.DataFrame, out_dir: Path) -> str:
    ok = manifest[manifest["status"] == "ok"]
    skipped = manifest[manifest["status"] != "ok"]
    widened = int(ok["crop_widened"].eq(True).sum()) if "crop_widened" in ok else 0
    lines = [
        f"{out_dir}: {len(ok)} cases ok ({int(ok['reused'].sum())} up to date, reused), "
        f"{len(skipped)} skipped; {widened} crops widened to keep every label"
    ]
    lines += [f"  skipped {r.case_id}: {r.reason}" for r in skipped.itertuples()]
    return "\n".join(lines)


def resolve_target_spacing(config: Config) -> tuple[float, float, float]:
    """[preprocessing] target_spacing, or (auto) nnU-Net's rule over the spacings of every
    readable scan of raw_dir (spacing_mode.auto_target_spacing), in mm (S-I, A-P, slices)."""
    explicit = target_spacing(config.preprocessing.target_spacing)
    if explicit is not None:
        return explicit
    cases, _ = discover_cases(config.paths.raw_dir, config.data.sequences)
    found = []
    for files in cases:
        try:
            found.append(pir_spacing_and_size(files.image_path))
        except RuntimeError:
            continue  # preprocessing reports the unreadable file
    if not found:
        raise ConfigError(
            f"[preprocessing] target_spacing = auto: no readable scan in {config.paths.raw_dir}"
        )
    spacings, sizes = (np.array(values) for values in zip(*found, strict=True))
    return auto_target_spacing(spacings, sizes)


def resolve_patch_size(config: Config, manifest: pd.DataFrame) -> tuple[int, int, int]:
    """[training] patch_size, or (auto) spacing_mode.auto_patch_size of the median size of the
    preprocessed cases (S-I, A-P, slices)."""
    explicit = patch_size(config.training.patch_size, config.model.size_multiple)
    if explicit is not None:
        return explicit
    sizes = [
        pir_spacing_and_size(config.paths.preprocessed_dir / path)[1]
        for path in manifest.loc[manifest["status"] == "ok", "out_image"]
    ]
    if not sizes:
        raise ConfigError("[training] patch_size = auto: no preprocessed case to size it from")
    median = np.median(np.array(sizes), axis=0)
    return auto_patch_size(tuple(int(v) for v in median), config.model.size_multiple)


def run(config: Config, progress: bool | None = None) -> int:
    """Preprocess raw_dir, record plan.json, print the summary; return the exit status.

    progress: a tqdm bar (default: only when stderr is a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    out_dir = config.paths.preprocessed_dir
    check_writable(out_dir, "[paths] preprocessed_dir =")  # before any case is processed
    ensure_raw_data(config)
    settings = config.preprocessing
    plan = make_plan(settings, config.labels, config.training.patch_size)
    if settings.mode == "spacing":
        spacing = resolve_target_spacing(config)
        settings = replace(settings, target_spacing=format_spacing(spacing))
        plan["spacing_mm"] = list(spacing)
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_incomplete(plan, out_dir)
    manifest = preprocess_dataset(
        config.paths.raw_dir,
        out_dir,
        config.data.sequences,
        settings,
        config.labels.lookup(),
        progress=progress,
    )
    if settings.mode == "spacing":
        plan["patch_size"] = list(resolve_patch_size(config, manifest))
        print(f"spacing mode: {plan['spacing_mm']} mm, patch {plan['patch_size']} voxels")
    plan_path = write_plan(plan, out_dir)
    print(summarise(manifest, out_dir))
    print(f"manifest: {out_dir / 'manifest.csv'}; plan: {plan_path}")
    if (manifest["status"] == "ok").sum() == 0:
        return 1
    return EXIT_SKIPPED if (manifest["status"] != "ok").any() else 0


def main(argv: list[str] | None = None) -> int:
    args = driver_arguments(__doc__.splitlines()[0]).parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        return run(config)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError; OSError names its file
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished cases are kept; run again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
