"""Shared fixtures and helpers of the test files (tests.py, tests_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import preprocess_script
import trainandtest_script
from config import load_config
from synthetic_spine import generate_dataset

ROOT = Path(__file__).resolve().parent
SLABS = ROOT.parent / "shared" / "data" / "spider_t2space_slabs"
SPIDER_LABELS = load_config(ROOT / "configuration.txt").labels
SPIDER_LOOKUP = SPIDER_LABELS.lookup()
TINY_GRID = "32, 16, 8"


def write_config(folder: Path, raw_dir: Path, **sections: dict[str, object]) -> Path:
    """A tiny configuration (grid 32x16x8, 3-level U-Net with 4 base channels, 2 epochs)."""
    values: dict[str, dict[str, object]] = {
        "paths": {
            "raw_dir": raw_dir,
            "preprocessed_dir": folder / "pre",
            "output_dir": folder / "run",
        },
        "data": {"sequences": "t1, t2"},
        "labels": {
            "vertebrae": "1-25, 101-125",
            "intervertebral_discs": "201-225",
            "spinal_canal": "100",
        },
        "preprocessing": {"grid": TINY_GRID, "workers": 1},
        "model": {"base_channels": 4, "depth": 3},
        "training": {
            "epochs": 2,
            "batch_size": 2,
            "val_fraction": 0.25,
            "test_fraction": 0.25,
            "threads": 1,
        },
        "testing": {"figures": 1},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
        for section, keys in values.items()
    )
    path = folder / "config.txt"
    path.write_text(text)
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def digest(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    """Six small synthetic patients (12 series) in SPIDER layout."""
    raw = tmp_path_factory.mktemp("data") / "raw"
    generate_dataset(raw, n_patients=6, seed=1, small=True)
    return raw


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_raw) -> Path:
    """A finished 2-epoch run (preprocess + train + test, instance step on) on the tiny set."""
    folder = tmp_path_factory.mktemp("run")
    cfg = write_config(folder, tiny_raw, testing={"figures": 1, "instances": "true"})
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    return folder
