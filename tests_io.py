"""Every write path is atomic: when the final rename fails (a kill, a full disk), the file
that was there before is untouched and no temporary is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import atomic
import measure
import store_plot_metrics
import train
import vertebraeseg
from atomic import atomic_path
from config import PreprocessingConfig
from conftest import SPIDER_LOOKUP
from synthetic_spine import synth_patient, write_case
from vertebraeseg import discover_cases

OLD = b"the file as it was before"


def _image() -> sitk.Image:
    return sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


WRITERS = {
    "image": ("mask.mha", lambda path: vertebraeseg.atomic_write_image(_image(), path)),
    "text": ("plan.json", lambda path: vertebraeseg.atomic_write_text("{}", path)),
    "csv": ("table.csv", lambda path: store_plot_metrics.write_csv(pd.DataFrame({"a": [1]}), path)),
    "checkpoint": ("last.pt", lambda path: train.save_checkpoint({"w": torch.ones(2)}, path)),
    "qc": ("scan_qc.json", lambda path: measure.write_qc({"flags": []}, path)),
    "plot": (
        "loss.png",
        lambda path: store_plot_metrics.plot_curves(
            pd.DataFrame(
                {"epoch": [1, 2]}
                | {
                    f"{split}_{column}": [0.4, 0.6]
                    for split in ("train", "val")
                    for column in store_plot_metrics.CURVES.values()
                }
            ),
            path.parent,
        ),
    ),
}


class Interrupted(OSError):
    pass


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_failed_rename_leaves_the_old_file_and_no_temporary(kind, tmp_path, monkeypatch):
    name, write = WRITERS[kind]
    target = tmp_path / name
    target.write_bytes(OLD)

    def refuse(source, destination):
        raise Interrupted(f"killed before {source} became {destination}")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(Interrupted):
        write(target)
    assert target.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_writer_writes_its_target_in_full(kind, tmp_path):
    name, write = WRITERS[kind]
    target = tmp_path / name
    target.write_bytes(OLD)
    write(target)
    assert target.read_bytes() != OLD and target.stat().st_size > 0
    if kind == "image":
        assert np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(target))), np.arange(24).reshape(2, 3, 4)
        )
    if kind == "text" or kind == "qc":
        json.loads(target.read_text())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_atomic_path_writes_beside_the_target_then_renames(tmp_path):
    target = tmp_path / "sub" / "scan.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        assert tmp.name.startswith(".") and tmp.name.endswith(".nii.gz")  # the writer's format
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing at the target until the block succeeds
    assert target.read_bytes() == b"new" and not tmp.exists()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"new" and not tmp.exists()


def test_preprocessing_writes_its_outputs_atomically(tmp_path, monkeypatch):
    """A case interrupted at its first rename leaves no grid file that a rerun could take as
    done: preprocess_case's outputs all go through atomic_path."""
    images, mask = synth_patient(np.random.default_rng(0), small=True)
    write_case(tmp_path / "raw", "1", "t2", images["t2"], mask, "LPS")
    (files,), _ = discover_cases(tmp_path / "raw", ("t2",))
    out = tmp_path / "pre"
    calls: list[Path] = []

    def refuse(source, destination):
        calls.append(Path(destination))
        raise Interrupted("killed")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    row = vertebraeseg.preprocess_case(
        files, out, PreprocessingConfig(grid=(32, 16, 8)), SPIDER_LOOKUP
    )
    assert row["status"] == "skipped" and "killed" in row["reason"]
    assert calls == [out / "images" / "1_t2.mha"]
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_mutation_testing_copies_every_module():
    """mutmut runs the tests in a copy holding pyproject.toml's also_copy: a module missing
    there fails every mutant's test run (docs/development.md)."""
    import tomllib

    from conftest import ROOT

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    modules = {p.name for p in ROOT.glob("*.py") if not p.name.startswith("tests")}
    assert modules <= set(config["also_copy"]), sorted(modules - set(config["also_copy"]))
