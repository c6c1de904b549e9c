"""Nothing lost, no traceback: hostile inputs to every driver. Each test checks that the
user's files are byte-identical afterwards, that the error names the file, key or value, and
the documented exit status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import instances
import measure_script
import predict_script
import preprocess_script
import trainandtest_script
from atomic import remove_stale_temporaries
from config import ConfigError, load_config
from conftest import digest, write_config
from safety import EXIT_UNSAFE
from train import load_checkpoint, save_checkpoint


def _checkpoint(trained_run: Path) -> Path:
    return trained_run / "run" / "checkpoints" / "best.pt"


def _scan(tiny_raw: Path) -> Path:
    return sorted((tiny_raw / "images").glob("*.mha"))[0]


# ---------------------------------------------------------------- outputs never harm inputs


def test_a_mask_is_never_written_over_its_scan(trained_run, tiny_raw, tmp_path, capsys):
    folder = tmp_path / "scans"
    shutil.copytree(tiny_raw / "images", folder)
    scan = folder / _scan(tiny_raw).name
    before = digest(folder)
    argv = ["--checkpoint", str(_checkpoint(trained_run)), str(scan), "--output-dir", str(folder)]
    assert predict_script.main(argv) == EXIT_UNSAFE
    err = capsys.readouterr().err
    assert str(scan) in err and "is input" in err
    assert digest(folder) == before


def test_two_inputs_never_share_an_output_name(trained_run, tiny_raw, tmp_path, capsys):
    scan = _scan(tiny_raw)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(scan, tmp_path / sub / "scan.mha")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "a" / "scan.mha"), str(tmp_path / "b" / "scan.nii.gz")]
    sitk.WriteImage(sitk.ReadImage(inputs[0]), inputs[1])
    argv = ["--checkpoint", str(_checkpoint(trained_run)), *inputs, "--output-dir", str(out)]
    assert predict_script.main(argv) == EXIT_UNSAFE
    err = capsys.readouterr().err
    assert inputs[0] in err and inputs[1] in err and "'scan'" in err
    assert not out.exists()
    masks = [str(tmp_path / "a" / "scan.mha"), str(tmp_path / "b" / "scan.nii.gz")]
    assert instances.main([*masks, "--output-dir", str(out)]) == EXIT_UNSAFE
    assert measure_script.main([*masks, "--output-dir", str(out)]) == EXIT_UNSAFE
    assert not out.exists()


def test_an_output_folder_that_is_a_file_is_refused_first(trained_run, tiny_raw, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    argv = ["--checkpoint", str(_checkpoint(trained_run)), str(_scan(tiny_raw))]
    assert predict_script.main([*argv, "--output-dir", str(blocker)]) == EXIT_UNSAFE
    assert f"--output-dir {blocker} is a file, not a folder" in capsys.readouterr().err
    below = blocker / "deeper"
    assert predict_script.main([*argv, "--output-dir", str(below)]) == EXIT_UNSAFE
    assert "is not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "a file where the output folder should be"


def test_cli_values_are_checked_before_any_model_loads(trained_run, tiny_raw, tmp_path, capsys):
    argv = ["--checkpoint", str(_checkpoint(trained_run)), str(_scan(tiny_raw))]
    argv += ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        predict_script.main([*argv, "--min-instance-mm3", "-5"])
    assert stop.value.code == 2 and "--min-instance-mm3 -5" in capsys.readouterr().err
    assert predict_script.main([*argv, "--device", "banana"]) == 1
    assert "device 'banana': choose auto, cpu, cuda or mps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_raw_data_inside_the_output_folder_is_refused(tiny_raw, tmp_path):
    output = tmp_path / "runs"
    raw = output / "raw"
    shutil.copytree(tiny_raw, raw)
    before = digest(raw)
    cfg = write_config(tmp_path, raw, paths={"output_dir": output, "raw_dir": raw})
    with pytest.raises(ConfigError, match=r"raw_dir = \S+ lies inside \[paths\] output_dir"):
        load_config(cfg, ["training.overwrite=true"])
    assert trainandtest_script.main(["--config", str(cfg), "--set", "training.overwrite=true"]) == 1
    assert digest(raw) == before


def test_raw_data_inside_the_preprocessed_folder_is_refused(tiny_raw, tmp_path, capsys):
    """preprocessed_dir = the raw folder's parent: refused, and a user's file that looks like a
    temporary survives; the clean-up deletes only the project's own temporaries."""
    raw = tmp_path / "data" / "raw"
    shutil.copytree(tiny_raw, raw)
    (raw / ".notes.tmp.txt").write_text("the user's notes")
    before = digest(tmp_path / "data")
    cfg = write_config(tmp_path, raw, paths={"preprocessed_dir": tmp_path / "data"})
    assert preprocess_script.main(["--config", str(cfg)]) == 1
    assert "lies inside [paths] preprocessed_dir" in capsys.readouterr().err
    assert digest(tmp_path / "data") == before


def test_clean_up_deletes_only_the_projects_own_temporaries(tmp_path):
    folder = tmp_path / "pre"
    (folder / "images").mkdir(parents=True)
    ours = folder / "images" / ".spineseg.1_t2.mha.4242.tmp.mha"
    ours.write_bytes(b"half")
    also_ours = folder / "images" / ".spineseg.2_t2.mha.77.tmp.mha"
    also_ours.write_bytes(b"half")
    theirs = [
        folder / ".notes.tmp.txt",
        folder / "images" / ".1_t2.mha.4242.tmp.mha",  # no project prefix
        folder / "images" / ".spineseg.notes.txt",  # the prefix, not the pattern
        folder / "images" / "deeper" / ".spineseg.a.mha.1.tmp.mha",  # not a folder we clean
    ]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep")
    removed = remove_stale_temporaries([folder, folder / "images"])
    assert sorted(removed) == sorted([ours, also_ours])
    assert not ours.exists() and not also_ours.exists()
    assert all(path.read_text() == "keep" for path in theirs)


def test_overwrite_removes_only_the_runs_own_outputs(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    (run / "thesis.docx").write_text("precious")
    (run / "my_notes").mkdir()
    (run / "my_notes" / "a.txt").write_text("mine")
    kept = trainandtest_script.remove_run_outputs(run)
    assert sorted(kept) == ["my_notes", "thesis.docx"]
    assert (run / "thesis.docx").read_text() == "precious"
    assert (run / "my_notes" / "a.txt").read_text() == "mine"


# ---------------------------------------------------------------- checked inputs


@pytest.mark.parametrize(
    "override, key",
    [
        ("preprocessing.crop_margin_mm=nan", "crop_margin_mm"),
        ("preprocessing.closing_radius_mm=inf", "closing_radius_mm"),
        ("training.learning_rate=nan", "learning_rate"),
        ("testing.min_instance_mm3=-inf", "min_instance_mm3"),
    ],
)
def test_non_finite_numbers_are_refused_when_the_configuration_loads(tmp_path, override, key):
    cfg = write_config(tmp_path, tmp_path / "raw")
    with pytest.raises(ConfigError, match=rf"{key} = '-?(nan|inf)': expected a finite number"):
        load_config(cfg, [override])


def test_a_configuration_that_is_not_utf8_is_named(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "raw")
    cfg.write_bytes(cfg.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{cfg.name} is not UTF-8 text"):
        load_config(cfg)


def test_empty_image_folders_are_named(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    cfg = write_config(tmp_path, raw)
    assert preprocess_script.main(["--config", str(cfg)]) == 1
    assert f"{raw / 'images'} holds no image" in capsys.readouterr().err


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 3.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def test_bad_masks_and_geometry_are_refused_with_the_file_named(tmp_path):
    from vertebraeseg import CaseError, read_scan

    labels = np.zeros((6, 8, 8), np.float32)
    labels[2:4, 2:6, 2:6] = 0.5
    path = _write(labels, tmp_path / "fractional.mha")
    with pytest.raises(CaseError, match="mask fractional.mha holds 32 non-integer values"):
        read_scan(path, "mask")
    whole = _write(labels * 2, tmp_path / "whole.mha")  # float, but whole numbers: fine
    assert read_scan(whole, "mask").GetSize() == (8, 8, 6)
    image = np.ones((6, 8, 8), np.float32)
    huge = _write(image, tmp_path / "huge.mha", spacing=(100.0, 1.0, 3.0))
    with pytest.raises(CaseError, match=r"image huge.mha has spacing \(100.0, 1.0, 3.0\) mm"):
        read_scan(huge)
    skewed = _write(image, tmp_path / "skewed.mha", direction=(1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(CaseError, match="skewed.mha has a direction matrix that is not ortho"):
        read_scan(skewed)


@pytest.mark.parametrize("damage", ["missing key", "other network", "nan weights"])
def test_a_damaged_checkpoint_is_refused_by_name(trained_run, tiny_raw, tmp_path, capsys, damage):
    state = load_checkpoint(_checkpoint(trained_run))
    if damage == "missing key":
        del state["model_args"]
    elif damage == "other network":
        state["model_args"] = dict(state["model_args"], base_channels=6)
    else:
        name = next(iter(state["model"]))
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    bad = tmp_path / "bad.pt"
    save_checkpoint(state, bad)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(bad), str(_scan(tiny_raw)), "--output-dir", str(out)]
    assert predict_script.main(argv) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {bad}" in err
    expected = {
        "missing key": "lacks model_args",
        "other network": "do not fit its network arguments",
        "nan weights": "non-finite weights",
    }[damage]
    assert expected in err and not list(out.glob("*.mha"))


def test_measure_script_recognises_class_index_masks(tmp_path, capsys):
    """What predict_script.py writes (0-3) is read as class indices, not as L5/L4/L3."""
    from tests_prediction import _spine_mask

    mask, known = _spine_mask({"vertebra": 1, "disc": 2, "canal": 3})
    path = tmp_path / "pred.mha"
    sitk.WriteImage(mask, str(path))
    out = tmp_path / "out"
    assert measure_script.main([str(path), "--output-dir", str(out)]) == 0
    assert "(class indices)" in capsys.readouterr().out
    import pandas as pd

    table = pd.read_csv(out / "pred_instances.csv", keep_default_na=False)
    assert sorted(table.loc[table["structure"] == "vertebra", "level"]) == [
        "L1",
        "L2",
        "L3",
        "L4",
        "L5",
    ]
    assert (table["structure"] == "canal").sum() == 1


# ---------------------------------------------------------------- preprocessed folders


def test_a_copied_preprocessed_folder_reads_its_own_files(trained_run, tmp_path):
    copy = tmp_path / "pre_copy"
    shutil.copytree(trained_run / "pre", copy)
    manifest = trainandtest_script.read_manifest(copy)
    assert all(Path(p).parent.parent == copy for p in manifest["out_image"])
    victim = Path(manifest["out_image"].iloc[0])
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=str(victim)):
        trainandtest_script.read_manifest(copy)


def test_an_interrupted_preprocessing_leaves_a_folder_training_refuses(trained_run, tmp_path):
    from plan import INCOMPLETE_FILE, read_plan

    copy = tmp_path / "pre_copy"
    shutil.copytree(trained_run / "pre", copy)
    (copy / INCOMPLETE_FILE).write_text("{}")  # as a killed run leaves it
    with pytest.raises(ConfigError, match=f"{copy} is incomplete"):
        read_plan(copy)
    with pytest.raises(ConfigError, match="incomplete"):
        trainandtest_script.read_manifest(copy)


def test_resume_refuses_a_last_checkpoint_of_another_plan(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["plan"] = dict(state["plan"], normalisation="minmax")
    state["epoch"] = 1  # so that a resume would train on
    save_checkpoint(state, last)
    record = json.loads((run / "run_config.json").read_text())
    record["paths"]["output_dir"] = str(run)
    (run / "run_config.json").write_text(json.dumps(record))
    cfg = trained_run / "config.txt"
    argv = ["--config", str(cfg), "--set", f"paths.output_dir={run}"]
    assert trainandtest_script.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "trained on data of another plan" in err and "normalisation ('minmax' -> 'zscore')" in err
    )


# ---------------------------------------------------------------- the test loop


def test_bad_references_are_skipped_and_the_counts_say_so(trained_run, tiny_raw, tmp_path, capsys):
    """A test set with an empty reference mask and a NaN scan: both named and skipped, the rest
    tested, and the printed count is the count tested; all bad: exit 1."""
    raw = tmp_path / "test_raw"
    shutil.copytree(tiny_raw, raw)
    names = sorted(p.name for p in (raw / "masks").glob("*.mha"))
    empty, broken = names[0], names[1]
    mask = sitk.ReadImage(str(raw / "masks" / empty))
    sitk.WriteImage(mask * 0, str(raw / "masks" / empty))
    image = sitk.ReadImage(str(raw / "images" / broken))
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * float("nan"), str(raw / "images" / broken))
    cfg = trained_run / "config.txt"
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    argv = ["--config", str(cfg), "--set", f"paths.output_dir={run}"]
    argv += ["--set", f"paths.test_raw_dir={raw}"]
    capsys.readouterr()
    assert trainandtest_script.main(argv) == 0
    out, err = capsys.readouterr()
    text = out + err
    assert f"mask {empty} is empty" in text and "NaN/inf" in text
    assert f"test on {len(names) - 2} cases, 2 skipped" in out


def test_interrupt_before_the_first_epoch_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, tmp_path / "raw")

    def interrupted(config, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainandtest_script, "run", interrupted)
    assert trainandtest_script.main(["--config", str(cfg)]) == 130
    assert "no epoch had finished, so nothing was saved" in capsys.readouterr().err


def test_prediction_keeps_going_past_bad_scans(trained_run, tiny_raw, tmp_path, capsys):
    """A symlink loop, a scan with a 100 mm voxel and a skewed direction are each named and
    skipped; the good scan is segmented; exit status 1."""
    good = _scan(tiny_raw)
    loop = tmp_path / "loop.mha"
    loop.symlink_to(tmp_path / "loop.mha")
    image = sitk.ReadImage(str(good))
    huge = tmp_path / "huge.mha"
    image.SetSpacing((100.0, 1.0, 1.0))
    sitk.WriteImage(image, str(huge))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(_checkpoint(trained_run)), str(good), str(loop), str(huge)]
    assert predict_script.main([*argv, "--output-dir", str(out)]) == 1
    text = "".join(capsys.readouterr())
    assert f"{loop} is a symlink to nothing (broken or looping)" in text
    assert "huge.mha has spacing (100.0, 1.0, 1.0) mm" in text
    assert sorted(p.name for p in out.glob("*.mha")) == [good.name]


def test_a_checkpoint_whose_plan_does_not_fit_its_network_is_refused(
    trained_run, tiny_raw, tmp_path, capsys
):
    state = load_checkpoint(_checkpoint(trained_run))
    state["plan"] = dict(state["plan"], grid=[30, 16, 8])  # 30: no multiple of 4
    bad = tmp_path / "bad.pt"
    save_checkpoint(state, bad)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(bad), str(_scan(tiny_raw)), "--output-dir", str(out)]
    assert predict_script.main(argv) == 1
    assert "grid 30, 16, 8 (height, width, slices) does not fit" in capsys.readouterr().err
    assert not list(out.glob("*.mha"))


def test_training_refuses_an_output_folder_that_is_a_file(trained_run, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    argv = ["--config", str(trained_run / "config.txt"), "--set", f"paths.output_dir={blocker}"]
    assert trainandtest_script.main(argv) == 1
    assert f"[paths] output_dir = {blocker} is a file, not a folder" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_a_bad_overview_csv_is_named_before_any_case_is_processed(tiny_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    (raw / "overview.csv").write_bytes(b"")  # empty: no columns
    cfg = write_config(tmp_path, raw)
    assert preprocess_script.main(["--config", str(cfg)]) == 1
    assert f"{raw / 'overview.csv'} is not a readable CSV" in capsys.readouterr().err
    assert not (tmp_path / "pre" / "images").exists()


def test_ctrl_c_in_a_command_line_driver_is_one_line(capsys):
    from safety import interruptible

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert interruptible(interrupted) == 130
    assert capsys.readouterr().err.startswith("interrupted: ")
    assert interruptible(lambda: 3) == 3
