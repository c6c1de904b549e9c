"""Planted bugs: a dozen-odd realistic one-line bugs, each planted alone in a copy of the
project, against the value tests; prints which test caught each (or SURVIVED).

    python planted_bugs.py [NAME ...]      (names from BUGS; none: all of them)

The copy lives in a temporary folder: the working tree is never edited. Complements mutation
testing (docs/development.md): these are the bug classes an audit found the suite missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = [
    "tests_metrics.py",
    "tests_levels.py",
    "tests_io.py",
    "tests_preprocessing.py",
    "tests_prediction.py",
    "tests_training.py",
    "tests.py::test_optimizer_state_takes_the_parameters_layout_after_loading",
]

# (name, module, the line as it is, the line with the bug)
BUGS = [
    (
        "hd95 pooled",
        "test_unet.py",
        "hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))",
        "hd95 = np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95)",
    ),
    (
        "assd mean of means",
        "test_unet.py",
        "assd = float(np.concatenate([pred_to_ref, ref_to_pred]).mean())",
        "assd = float((pred_to_ref.mean() + ref_to_pred.mean()) / 2)",
    ),
    (
        "level other-kind floor",
        "instances.py",
        "move = 2 * max(0, int(np.floor((s - 1) / 2 + 0.5))) + 1",
        "move = 2 * max(0, int(np.floor((s - 1) / 2))) + 1",
    ),
    (
        "level same-kind floor",
        "instances.py",
        "move = 2 * int(np.floor(s / 2 + 0.5)) if s >= 1 else 0",
        "move = 2 * int(np.floor(s / 2)) if s >= 1 else 0",
    ),
    ("atomic in place", "atomic.py", "        yield tmp\n", "        yield path\n"),
    (
        "text written directly",
        "vertebraeseg.py",
        '        tmp.write_text(text, encoding="utf-8")',
        '        path.write_text(text, encoding="utf-8")',
    ),
    (
        "qc written directly",
        "measure.py",
        '        tmp.write_text(json.dumps(qc, indent=2), encoding="utf-8")',
        '        path.write_text(json.dumps(qc, indent=2), encoding="utf-8")',
    ),
    (
        "zscore no std",
        "vertebraeseg.py",
        "out = (array - mean) / max(std, 1e-6)",
        "out = array - mean",
    ),
    (
        "minmax wrong",
        "vertebraeseg.py",
        "out = (array - low) / (high - low)",
        "out = (array - low) / high",
    ),
    (
        "small components kept",
        "test_unet.py",
        "small = small[small > 0]",
        "small = small[small < 0]",
    ),
    (
        "components 6-connected",
        "test_unet.py",
        "components = sitk.ConnectedComponent(classes == int(label), True)",
        "components = sitk.ConnectedComponent(classes == int(label), False)",
    ),
    (
        "cosine inverted",
        "train.py",
        "0.5 * (1 + math.cos(math.pi * progress))",
        "0.5 * (1 - math.cos(math.pi * progress))",
    ),
    ("warmup wrong", "train.py", "return (epoch + 1) / (warmup + 1)", "return 1.0"),
    (
        "moments zeroed",
        "train.py",
        "state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)",
        "state[key] = torch.zeros_like(parameter, dtype=value.dtype)",
    ),
    (
        "measure swapped",
        "measure_script.py",
        "vertebra, disc, canal = instance_classes(config.labels.class_names)",
        "disc, vertebra, canal = instance_classes(config.labels.class_names)",
    ),
    (
        "labels-nearest inverted",
        "predict_script.py",
        "map_probabilities=not args.labels_nearest",
        "map_probabilities=args.labels_nearest",
    ),
    (
        "labels_to_scan linear",
        "vertebraeseg.py",
        "return sitk.Resample(grid_labels, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0)",
        "return sitk.Resample(grid_labels, scan, sitk.Transform(), sitk.sitkLinear, 0)",
    ),
    (
        "confusion dice halved",
        "metrics.py",
        "2 * true_positive / denominator",
        "true_positive / denominator",
    ),
    (
        "f1 over present only",
        "metrics.py",
        '"f1_macro": float(np.nanmean(dice))',
        '"f1_macro": float(np.nanmean(np.where(dice > 0, dice, np.nan)))',
    ),
    (
        "grid origin half voxel",
        "vertebraeseg.py",
        "shift = direction @ ((spacing - old_spacing) / 2 + np.array(phase) * spacing)",
        "shift = direction @ ((spacing - old_spacing) / 2 + (np.array(phase) + 0.5) * spacing)",
    ),
    (
        "probabilities nearest",
        "vertebraeseg.py",
        "resampled = sitk.Resample(grid_map, scan, sitk.Transform(), sitk.sitkLinear, outside)",
        "resampled = sitk.Resample("
        "grid_map, scan, sitk.Transform(), sitk.sitkNearestNeighbor, outside)",
    ),
    (
        "spider asd means",
        "spider_metrics.py",
        "    return float(pooled.mean())",
        "    return float("
        "(pooled[: pred_border.sum()].mean() + pooled[pred_border.sum() :].mean()) / 2)",
    ),
]


def main(names: list[str]) -> int:
    """Plant each bug of BUGS (or of `names`) in a fresh copy; return 1 if any survived."""
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "project"
        ignore = shutil.ignore_patterns(".*", "mutants", "demo_data", "runs", "__pycache__")
        shutil.copytree(HERE, copy, ignore=ignore)
        for name, module, old, new in BUGS:
            if names and name not in names:
                continue
            path = copy / module
            text = path.read_text()
            if text.count(old) != 1:
                print(f"{name:28s} NOT PLANTED: the line is not in {module} once")
                survived += 1
                continue
            path.write_text(text.replace(old, new))
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                    cwd=copy,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
            finally:
                path.write_text(text)
            failed = [line[7:] for line in result.stdout.splitlines() if line.startswith("FAILED")]
            if result.returncode:
                print(f"{name:28s} caught by {failed[0].split(' - ')[0] if failed else '?'}")
            else:
                print(f"{name:28s} SURVIVED")
                survived += 1
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
