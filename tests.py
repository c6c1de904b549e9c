"""The core test suite (fast: tiny grids and models, CPU only). `python -m pytest` runs it
with the tests_*.py files; shared fixtures and helpers are in conftest.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from config import (
    ConfigError,
    PreprocessingConfig,
    TrainingConfig,
    load_config,
    patch_size,
    target_spacing,
)
from conftest import (
    ROOT,
    SLABS,
    SPIDER_LABELS,
    SPIDER_LOOKUP,
    dice,
    digest,
    write_config,
)
from devices import Distributed, bf16_supported
from instances import (
    DISC_PIECE_FRACTION,
    instance_table,
    level_name,
    level_note,
    number_levels,
    separate_instances,
)
from metrics import confusion_matrix, scores_from_confusion
from patches import (
    crop_patches,
    foreground_index,
    foreground_patch_count,
    gaussian_weights,
    pad_to_patch,
    sample_batch,
    sample_patch_starts,
    sliding_window_probabilities,
    window_starts,
)
from plan import check_plan, make_plan
from preprocess_script import preprocess_dataset
from spacing_mode import auto_patch_size, auto_target_spacing
from spider_metrics import (
    disc_components_reference,
    spider_instances,
    spider_scores,
    structure_of,
    summarise_spider,
)
from steps import SegmentationLoss, augment_batch, make_loss, resize_labels, run_epoch
from synthetic_spine import generate_dataset, synth_patient, write_case
from test_unet import (
    Predictor,
    outside_crop_fraction,
    overlap_and_distances,
    segment_scan,
    summarise,
)
from train import NonFiniteLossError, fit, load_checkpoint, patient_split
from trainandtest_script import read_manifest
from training_data import choose_cache
from unet_model import Conv3d, ResidualUNet, UNet3D, make_network
from vertebraeseg import (
    HALF_IN_PLANE,
    CaseError,
    CaseFiles,
    body_mask,
    crop_box,
    discover_cases,
    grid_geometry,
    grid_to_scan,
    load_case,
    map_labels,
    predictions_to_scan,
    to_grid,
)

# ---------------------------------------------------------------- configuration


def test_shipped_configuration_loads_typed():
    cfg = load_config(ROOT / "configuration.txt")
    assert cfg.labels.class_names == (
        "background",
        "vertebrae",
        "intervertebral_discs",
        "spinal_canal",
    )
    assert isinstance(cfg.training.epochs, int) and isinstance(cfg.training.learning_rate, float)
    assert all(isinstance(v, int) for v in cfg.preprocessing.grid)
    assert cfg.paths.raw_dir.is_absolute()


def test_set_overrides_are_typed(tmp_path):
    cfg = load_config(
        write_config(tmp_path, tmp_path / "raw"),
        ["training.epochs=7", "preprocessing.grid=64, 32, 16", "paths.test_raw_dir=elsewhere"],
    )
    assert cfg.training.epochs == 7
    assert cfg.preprocessing.grid == (64, 32, 16)
    assert cfg.paths.test_raw_dir == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bogus.key=1", "unknown section"),
        ("training.epoch=3", "[training] epoch: unknown key"),
        ("training.epochs=three", "[training] epochs = 'three': expected int"),
        ("training.augment=maybe", "expected true or false"),
        ("training.batch_size=-2", "[training] batch_size = -2: must be > 0"),
        ("preprocessing.grid=-32, 16, 8", "grid"),
        ("training.val_fraction=1.5", "[training] val_fraction = 1.5: must be a fraction"),
        ("training.test_fraction=-0.1", "[training] test_fraction = -0.1"),
        ("preprocessing.grid=30, 16, 8", "height 30 is not a positive multiple of 4"),
        ("preprocessing.grid=32, 16", "expected 3 comma-separated values"),
        ("preprocessing.normalisation=robust", "choose one of zscore, minmax"),
        ("labels.spinal_canal=100, 1", "value 1 is in both vertebrae and spinal_canal"),
        ("labels.spinal_canal=5-2", "must be increasing"),
        ("labels.2canal=100", "lower-case identifiers"),
        ("paths.output_dir=raw/run", "output_dir"),
        ("paths.preprocessed_dir=raw", "lies inside raw_dir"),
        ("noequals", "expected section.key=value"),
        ("preprocessing.mode=native", "[preprocessing] mode = 'native': choose one of grid"),
        ("preprocessing.target_spacing=0.9, 0, 3", "[preprocessing] target_spacing = '0.9, 0, 3'"),
        ("preprocessing.target_spacing=fine", "target_spacing = 'fine': expected 3"),
        ("training.patch_size=30, 16, 8", "patch_size = '30, 16, 8': the sizes must be positive"),
        ("model.stem_stride=2, 3, 1", "[model] stem_stride = (2, 3, 1): each value must be 1 or 2"),
        ("training.foreground_fraction=2", "foreground_fraction = 2.0: must be a fraction"),
        ("testing.overlap=1", "[testing] overlap = 1.0: must be a fraction"),
        ("testing.min_component_mm3=-1", "[testing] min_component_mm3 = -1.0: must be >= 0"),
        ("training.members=0", "[training] members = 0: at least 1"),
    ],
)
def test_configuration_errors_name_key_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, tmp_path / "raw"), [override])
    assert message in str(error.value)


def test_a_strided_stem_needs_sizes_it_can_halve(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "raw")
    strided = ["model.stem_stride=2, 2, 2", "model.depth=4"]
    with pytest.raises(ConfigError, match="slices 8 is not a positive multiple of 16 = stem"):
        load_config(cfg, strided)
    config = load_config(cfg, ["model.stem_stride=2, 2, 1", "model.depth=3"])
    assert config.model.size_multiple == (8, 8, 4)


def test_one_class_per_value_option_gives_fixed_indices(tmp_path):
    with pytest.raises(ConfigError, match="renamed to one_class_per_value"):
        load_config(write_config(tmp_path, tmp_path / "raw"), ["labels.instances=true"])
    cfg = load_config(
        write_config(tmp_path, tmp_path / "raw"),
        ["labels.one_class_per_value=true"],
    )
    lookup = cfg.labels.lookup()
    assert cfg.labels.num_classes == 1 + 50 + 25 + 1
    assert cfg.labels.class_names[1] == "vertebrae_1"
    # the index of a value never depends on which values a case holds
    first = map_labels(np.array([0, 3, 201]), lookup)
    second = map_labels(np.array([201, 100]), lookup)
    assert first[2] == second[0] == cfg.labels.class_names.index("intervertebral_discs_201")
    assert second[1] == cfg.labels.num_classes - 1


# ---------------------------------------------------------------- preprocessing


def test_label_mapping_of_spider_values():
    raw = np.array([0, 1, 9, 25, 101, 125, 100, 201, 209, 225])
    assert map_labels(raw, SPIDER_LOOKUP).tolist() == [0, 1, 1, 1, 1, 1, 3, 2, 2, 2]
    with pytest.raises(CaseError, match=r"mask values \[7000\] are not in the \[labels\] map"):
        map_labels(np.array([0, 7000]), SPIDER_LOOKUP)


def _case(tmp_path: Path, orientation: str, seed: int = 0, small: bool = True) -> CaseFiles:
    images, mask = synth_patient(np.random.default_rng(seed), small=small)
    image_path, mask_path = write_case(tmp_path, "7", "t2", images["t2"], mask, orientation)
    return CaseFiles("7_t2", "7", "t2", image_path, mask_path)


def test_crop_never_cuts_labels(tmp_path):
    body = np.zeros((12, 60, 50), np.float32)
    body[3:9, 20:40, 15:35] = 1000.0
    image = sitk.GetImageFromArray(body)
    image.SetSpacing((1.0, 1.0, 3.0))
    labels = np.zeros(body.shape, np.uint8)
    labels[4:8, 25:35, 20:30] = 1
    index, size, widened = crop_box(image, body_mask(image, 2.0), labels, margin_mm=0)
    start, stop = np.array(index), np.array(index) + size
    assert not widened  # the body box, found at 2 mm, holds the body within a voxel or two
    assert (start <= (15, 20, 3)).all() and (start >= (13, 18, 2)).all()
    assert (stop >= (35, 40, 9)).all() and (stop <= (37, 42, 10)).all()
    labels[0, 55, 2] = 2  # a labelled voxel outside the body: the box grows and says so
    index, size, widened = crop_box(image, body_mask(image, 2.0), labels, margin_mm=0)
    assert widened and index[0] == 2 and index[2] == 0 and index[1] + size[1] == 56
    # a real synthetic case keeps every labelled voxel inside its crop
    _, image, labels = load_case(_case(tmp_path, "PIR"), SPIDER_LOOKUP)
    grid = to_grid(image, labels, PreprocessingConfig(grid=(64, 32, 16), crop_margin_mm=0))
    array = sitk.GetArrayFromImage(labels)
    (x0, y0, z0), (sx, sy, sz) = grid.crop_index, grid.crop_size
    inside = array[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx]
    assert np.count_nonzero(inside) == np.count_nonzero(array)


def test_grid_mask_holds_only_class_values_and_grid_geometry(tmp_path):
    _, image, labels = load_case(_case(tmp_path, "PIR"), SPIDER_LOOKUP)
    settings = PreprocessingConfig(grid=(64, 32, 16))
    grid = to_grid(image, labels, settings)
    values = set(np.unique(sitk.GetArrayViewFromImage(grid.mask)).tolist())
    assert values == {0, 1, 2, 3}
    assert grid.mask.GetPixelID() == sitk.sitkUInt8
    assert grid.image.GetSize() == grid.mask.GetSize() == (32, 64, 16)
    # the grid covers the crop's physical extent: first/last voxel edges coincide
    crop = sitk.RegionOfInterest(image, grid.crop_size, grid.crop_index)
    for corner in ([-0.5] * 3, [s - 0.5 for s in crop.GetSize()]):
        point = crop.TransformContinuousIndexToPhysicalPoint(corner)
        grid_corner = grid.image.TransformPhysicalPointToContinuousIndex(point)
        expected = -0.5 if corner[0] < 0 else None
        if expected is not None:
            assert np.allclose(grid_corner, -0.5, atol=1e-4)
        else:
            assert np.allclose(grid_corner, np.array(grid.image.GetSize()) - 0.5, atol=1e-4)


def test_round_trip_dice_at_default_settings(tmp_path):
    """Grid mask -> one-hot probabilities -> back onto the scan: Dice >= 0.95 per structure."""
    files = _case(tmp_path, "LPS", seed=3, small=False)
    scan, image, labels = load_case(files, SPIDER_LOOKUP)
    grid = to_grid(image, labels, PreprocessingConfig())
    grid_labels = sitk.GetArrayFromImage(grid.mask)
    one_hot = np.stack([(grid_labels == c).astype(np.float32) for c in range(4)])
    back = sitk.GetArrayFromImage(grid_to_scan(one_hot, grid.image, scan))
    reference = map_labels(
        sitk.GetArrayFromImage(sitk.ReadImage(str(files.mask_path))), SPIDER_LOOKUP
    )
    assert back.shape == reference.shape
    for c in (1, 2, 3):
        assert dice(back == c, reference == c) >= 0.95, c


def test_log_mapping_compares_geometric_means_between_grid_voxels(tmp_path):
    """Two grid voxels 2 mm apart, the scan's middle voxel halfway between them. Class 1 has
    0.9 then 0.05, class 2 0.1 then 0.5: arithmetic means 0.475 against 0.3 (class 1),
    geometric means 0.21 against 0.22 (class 2). On the grid voxels both mappings agree;
    map_log without map_probabilities is refused."""
    grid = sitk.Image(2, 1, 1, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 1.0, 1.0))
    scan = sitk.Image(3, 1, 1, sitk.sitkInt16)
    probabilities = np.zeros((4, 1, 1, 2), dtype=np.float32)
    probabilities[:, 0, 0, 0] = (0.0, 0.9, 0.1, 0.0)
    probabilities[:, 0, 0, 1] = (0.0, 0.05, 0.5, 0.45)
    linear = sitk.GetArrayFromImage(grid_to_scan(probabilities, grid, scan))[0, 0]
    log = sitk.GetArrayFromImage(grid_to_scan(probabilities, grid, scan, log=True))[0, 0]
    assert linear.tolist() == [1, 1, 2] and log.tolist() == [1, 2, 2]
    (tmp_path / "raw").mkdir()
    cfg = write_config(tmp_path, tmp_path / "raw", testing={"map_log": "true"})
    assert load_config(cfg).testing.map_log
    with pytest.raises(ConfigError, match="map_log = true needs map_probabilities = true"):
        load_config(cfg, ["testing.map_probabilities=false"])


def test_linear_mask_interpolation_takes_each_grid_voxels_majority_class():
    """[preprocessing] mask_interpolation = linear: halving the resolution, each grid voxel
    covers a 2 x 2 x 2 block of scan voxels and takes the class most of them hold; nearest
    takes one voxel's class, so a block whose odd voxel is the one it picks changes class."""
    rng = np.random.default_rng(0)
    classes = np.ones((8, 12, 10), np.uint8)  # (z, y, x): 4 x 6 x 5 blocks of 2 x 2 x 2
    for block in np.ndindex(4, 6, 5):  # one voxel of class 2 in each block, anywhere in it
        classes[tuple(2 * np.array(block) + rng.integers(0, 2, 3))] = 2
    labels = sitk.GetImageFromArray(classes)
    labels.SetSpacing((0.5, 0.5, 0.5))
    image = sitk.GetImageFromArray(rng.random(classes.shape).astype(np.float32))
    image.CopyInformation(labels)
    settings = PreprocessingConfig(mode="spacing", target_spacing="1, 1, 1", crop=False)
    linear = to_grid(image, labels, replace(settings, mask_interpolation="linear")).mask
    nearest = to_grid(image, labels, settings).mask
    assert linear.GetSize() == nearest.GetSize() == (5, 6, 4)
    assert linear.GetOrigin() == nearest.GetOrigin() and linear.GetSpacing() == (1.0, 1.0, 1.0)
    assert (sitk.GetArrayFromImage(linear) == 1).all()
    assert (sitk.GetArrayFromImage(nearest) == 2).any()


def test_shifted_grid_lies_half_a_voxel_over_and_two_grids_meet_on_the_scan(tmp_path):
    """tta_shift's geometry: the shifted grid keeps size and spacing and moves half a grid
    voxel along the region's own A-P and S-I axes (a non-identity direction here). Two grids'
    predictions meet on the scan as the mean of their (log-)probabilities: the more certain
    grid wins. tta_shift without map_probabilities is refused."""
    region = sitk.Image(8, 6, 4, sitk.sitkFloat32)
    region.SetSpacing((0.5, 0.5, 0.9))
    region.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    size, spacing, origin = grid_geometry(region, (3, 4, 2))
    shifted_size, shifted_spacing, shifted_origin = grid_geometry(region, (3, 4, 2), HALF_IN_PLANE)
    assert shifted_size == size == (4, 3, 2) and shifted_spacing == spacing == (1.0, 1.0, 1.8)
    assert np.allclose(np.subtract(shifted_origin, origin), (0.0, 0.5, 0.5))
    region = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 6, 8), np.float32))
    region.SetSpacing((0.5, 0.5, 0.9))
    case = to_grid(region, None, PreprocessingConfig(grid=(3, 4, 2), crop=False), shifted=True)
    assert case.shifted_image.GetSize() == case.image.GetSize()
    assert np.allclose(
        np.subtract(case.shifted_image.GetOrigin(), case.image.GetOrigin()), (0.5, 0.5, 0.0)
    )
    assert (
        to_grid(region, None, PreprocessingConfig(grid=(3, 4, 2), crop=False)).shifted_image is None
    )

    grid = sitk.Image(2, 1, 1, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 1.0, 1.0))
    half_over = sitk.Image(grid)
    half_over.SetOrigin((1.0, 0.0, 0.0))
    scan = sitk.Image(3, 1, 1, sitk.sitkInt16)
    scan.SetOrigin((1.0, 0.0, 0.0))  # voxels at x = 1, 2, 3: inside both grids
    unsure = np.zeros((4, 1, 1, 2), dtype=np.float32)
    unsure[1:3] = np.array([0.6, 0.4])[:, None, None, None]  # class 1, barely
    sure = np.zeros_like(unsure)
    sure[1:3] = np.array([0.1, 0.9])[:, None, None, None]  # class 2, firmly
    for log in (False, True):
        alone = predictions_to_scan([(unsure, grid)], scan, log)
        assert np.array_equal(
            sitk.GetArrayFromImage(alone),
            sitk.GetArrayFromImage(grid_to_scan(unsure, grid, scan, log)),
        )
        both = predictions_to_scan([(unsure, grid), (sure, half_over)], scan, log)
        assert sitk.GetArrayFromImage(alone)[0, 0, :2].tolist() == [1, 1]
        assert sitk.GetArrayFromImage(both)[0, 0, :2].tolist() == [2, 2]
    (tmp_path / "raw").mkdir()
    cfg = write_config(tmp_path, tmp_path / "raw", testing={"tta_shift": "true"})
    assert load_config(cfg).testing.tta_shift
    with pytest.raises(ConfigError, match="tta_shift = true needs map_probabilities = true"):
        load_config(cfg, ["testing.map_probabilities=false"])


def test_lps_and_pir_storage_give_the_same_grid(tmp_path):
    settings = PreprocessingConfig(grid=(64, 32, 16))
    grids = []
    for orientation in ("LPS", "PIR"):
        folder = tmp_path / orientation
        _, image, labels = load_case(_case(folder, orientation, seed=5), SPIDER_LOOKUP)
        grids.append(to_grid(image, labels, settings))
    lps, pir = grids
    assert (
        sitk.ReadImage(str(tmp_path / "LPS" / "images" / "7_t2.mha")).GetSize()
        != sitk.ReadImage(str(tmp_path / "PIR" / "images" / "7_t2.mha")).GetSize()
    )
    assert np.allclose(lps.image.GetOrigin(), pir.image.GetOrigin(), atol=1e-4)
    assert np.allclose(lps.image.GetSpacing(), pir.image.GetSpacing())
    assert np.allclose(
        sitk.GetArrayFromImage(lps.image), sitk.GetArrayFromImage(pir.image), atol=1e-4
    )
    assert (sitk.GetArrayFromImage(lps.mask) == sitk.GetArrayFromImage(pir.mask)).all()


def test_synthetic_set_is_spider_format_and_deterministic(tmp_path):
    first = generate_dataset(tmp_path / "a", n_patients=2, seed=4, small=True)
    generate_dataset(tmp_path / "b", n_patients=2, seed=4, small=True)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert set(first["new_file_name"]) == {"1_t1", "1_t2", "2_t1", "2_t2"}
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "masks" / "1_t1.mha")))
    t2 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "masks" / "1_t2.mha")))
    assert (t1 == t2).all()
    values = set(np.unique(t1).tolist())
    assert {0, 1, 100, 201} <= values and values <= set(SPIDER_LOOKUP)
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path / "a", n_patients=1, seed=4, small=True)


def test_preprocess_manifest_and_rerun_reuses_cases(tmp_path, tiny_raw):
    settings = PreprocessingConfig(grid=(32, 16, 8), workers=1)
    out = tmp_path / "pre"
    first = preprocess_dataset(tiny_raw, out, ("t1", "t2"), settings, SPIDER_LOOKUP, progress=False)
    assert (first["status"] == "ok").all() and len(first) == 12
    assert not first["reused"].any()
    manifest = pd.read_csv(out / "manifest.csv")
    for column in (
        "case_id",
        "patient_id",
        "sequence",
        "status",
        "reason",
        "image_path",
        "mask_path",
        "out_image",
        "out_mask",
        "original_size",
        "original_spacing",
        "original_origin",
        "original_direction",
        "crop_index",
        "crop_size",
        "crop_widened",
        "labels_present",
    ):
        assert column in manifest.columns, column
    second = preprocess_dataset(
        tiny_raw, out, ("t1", "t2"), settings, SPIDER_LOOKUP, progress=False
    )
    assert second["reused"].all()
    changed = PreprocessingConfig(grid=(32, 16, 8), workers=1, crop_margin_mm=4)
    third = preprocess_dataset(tiny_raw, out, ("t1", "t2"), changed, SPIDER_LOOKUP, progress=False)
    assert not third["reused"].any()


def test_preprocess_script_demo_generation_and_missing_raw_dir(tmp_path, capsys):
    import preprocess_script

    cfg = write_config(
        tmp_path, tmp_path / "demo", data={"synthetic_demo": "true", "demo_patients": 2}
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert "generating the synthetic SPIDER-format demo set" in capsys.readouterr().out
    assert (tmp_path / "demo" / "overview.csv").is_file()
    real = write_config(tmp_path, tmp_path / "missing", data={"synthetic_demo": "false"})
    assert preprocess_script.main(["--config", str(real)]) == 1
    assert "raw_dir" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- model, loss, metrics


@pytest.mark.parametrize(("shape", "depth"), [((8, 24, 40), 4), ((4, 12, 20), 3), ((2, 6, 2), 2)])
def test_model_output_shape_on_odd_grids(shape, depth):
    model = UNet3D(num_classes=5, base_channels=4, depth=depth)
    out = model(torch.zeros(2, 1, *shape))
    assert out.shape == (2, 5, *shape)


def test_model_rejects_grid_not_divisible():
    with pytest.raises(ValueError, match=r"not divisible by \(4, 4, 4\)"):
        UNet3D(base_channels=4, depth=3)(torch.zeros(1, 1, 8, 8, 6))


@pytest.mark.parametrize(
    "options",
    [
        {"stem_stride": (2, 2, 1)},
        {"stem_stride": (2, 2, 2), "residual": True},
        {"residual": True},
        {"deep_supervision": True},
        {"stem_stride": (2, 2, 1), "residual": True, "deep_supervision": True},
        {"stem_stride": (2, 2, 2), "deep_supervision": True, "channels": [4, 12, 20]},
        {"stem_stride": (2, 2, 2), "deep_supervision": True, "head_kernel": 3},
        {"head_kernel": 3},
    ],
)
def test_model_options_keep_the_output_at_full_resolution(options):
    model = UNet3D(num_classes=3, base_channels=4, depth=3, **options)
    image = torch.randn(2, 1, 8, 24, 16)  # (slices, height, width): odd multiples of the sizes
    model.train()
    out = model(image)
    if options.get("deep_supervision"):
        strided = options.get("stem_stride", (1, 1, 1)) != (1, 1, 1)
        assert isinstance(out, list) and len(out) == (3 if strided else 2)
        assert out[0].shape == (2, 3, 8, 24, 16)
        sizes = [o.shape[2:] for o in out]
        assert all(np.prod(a) > np.prod(b) for a, b in zip(sizes, sizes[1:], strict=False))
        out[0].mean().backward()
    else:
        assert out.shape == (2, 3, 8, 24, 16)
    model.eval()
    assert model(image).shape == (2, 3, 8, 24, 16)  # eval: the full-resolution logits only
    assert UNet3D(**model.arguments).arguments == model.arguments  # checkpoints rebuild it


@pytest.mark.parametrize("kernel", [1, 3])
def test_head_kernel_sets_how_far_a_voxels_class_sees_at_full_resolution(kernel):
    """The gradient of one voxel's logits reaches the head's input at that voxel alone with a
    1x1x1 head, at its 26 neighbours too with a 3x3x3 one; a checkpoint written before the
    option (no head_kernel in its arguments) rebuilds the 1x1x1 head."""
    model = UNet3D(
        num_classes=3, base_channels=4, depth=2, stem_stride=(2, 2, 2), head_kernel=kernel
    )
    features = {}
    model.head.register_forward_hook(lambda m, inputs, out: features.update(x=inputs[0]))
    logits = model(torch.randn(1, 1, 4, 8, 8))
    features["x"].retain_grad()
    logits[0, :, 2, 4, 4].sum().backward()
    reached = features["x"].grad[0].abs().sum(0) > 0  # (slices, height, width)
    assert reached.sum() == kernel**3 and reached[2, 4, 4]
    assert reached[1:4, 3:6, 3:6].all() == (kernel == 3)
    legacy = {k: v for k, v in model.arguments.items() if k != "head_kernel"}
    assert UNet3D(**legacy).head.kernel_size == (1, 1, 1)


def test_head_kernel_is_1_or_3_and_unet3d_only(tmp_path):
    with pytest.raises(ValueError, match="head_kernel 5: 1 or 3"):
        UNet3D(head_kernel=5)
    (tmp_path / "raw").mkdir()
    cfg = write_config(tmp_path, tmp_path / "raw", model={"head_kernel": 2})
    with pytest.raises(ConfigError, match=r"\[model\] head_kernel = 2: 1 \(1x1x1\) or 3"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="head_kernel are options of unet3d"):
        load_config(cfg, ["model.head_kernel=3", "model.network=residual_unet"])


def test_channels_set_each_level_width_and_a_wrong_count_is_refused(tmp_path):
    model = UNet3D(num_classes=3, depth=3, stem_stride=(2, 2, 2), channels=[4, 12, 20])
    encoder_widths = [block[-3].out_channels for block in model.encoders]  # each block's last conv
    assert encoder_widths == [4, 12, 20]
    assert model.full_resolution[0].out_channels == 2  # half the first level's width
    with pytest.raises(ValueError, match="one positive width per level"):
        UNet3D(depth=3, channels=[4, 8])
    (tmp_path / "raw").mkdir()
    cfg = write_config(tmp_path, tmp_path / "raw", model={"depth": 3, "channels": "4, 8"})
    with pytest.raises(ConfigError, match=r"\[model\] channels = 4, 8: one positive width"):
        load_config(cfg)


def test_strided_stem_costs_less_than_the_seed_shape():
    """The stem's first convolutions run at a quarter of the voxels: fewer multiply-adds."""

    def multiply_adds(model: UNet3D, shape: tuple) -> int:
        total = 0

        def count(module, _inputs, output):
            nonlocal total
            total += (
                output.numel() * module.in_channels * np.prod(module.kernel_size) // (module.groups)
            )

        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, Conv3d)]
        model(torch.zeros(1, 1, *shape))
        for hook in hooks:
            hook.remove()
        return total

    shape = (16, 64, 32)
    seed = multiply_adds(UNet3D(num_classes=4, base_channels=8, depth=4), shape)
    strided = multiply_adds(
        UNet3D(num_classes=4, base_channels=8, depth=4, stem_stride=(2, 2, 1)), shape
    )
    assert strided < 0.4 * seed


def test_strided_stem_convolves_only_the_image_at_full_resolution():
    """At full resolution a 3x3x3 convolution's backward pass is most of a CPU step: the
    stem's light path convolves the image there (no input gradient) and mixes features 1x1x1."""
    shape = (16, 32, 32)
    full = []

    def record(module, inputs, output):
        if tuple(output.shape[2:]) == shape:
            full.append((module.in_channels, module.kernel_size))

    for stride in ((2, 2, 1), (2, 2, 2)):
        model = UNet3D(num_classes=4, base_channels=8, depth=3, stem_stride=stride)
        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Conv3d)]
        full.clear()
        model(torch.zeros(1, 1, *shape))
        for hook in hooks:
            hook.remove()
        assert (1, (3, 3, 3)) in full
        assert [c for c, k in full if k == (3, 3, 3)] == [1]


def test_model_rejects_a_size_the_strided_stem_cannot_take():
    with pytest.raises(ValueError, match="not divisible by"):
        UNet3D(base_channels=4, depth=3, stem_stride=(2, 2, 1))(torch.zeros(1, 1, 8, 12, 16))
    with pytest.raises(ValueError, match="stem_stride"):
        UNet3D(stem_stride=(3, 1, 1))


def test_residual_unet_strides_every_level_and_restores_the_size():
    """network = residual_unet: no convolution at full resolution but the last ones of the
    decoder, whose transposed convolution brings back the input's size; checkpoints rebuild it."""
    model = make_network("residual_unet", num_classes=3, base_channels=4, depth=3)
    shape = (8, 24, 16)
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append((type(m), tuple(o.shape[2:]))))
        for m in model.modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    ]
    assert model(torch.zeros(2, 1, *shape)).shape == (2, 3, *shape)
    for hook in hooks:
        hook.remove()
    at_full = [kind for kind, size in sizes if size == shape]
    assert at_full == [nn.ConvTranspose3d, nn.Conv3d]  # the top decoder level only
    assert min(size for _, size in sizes) == (2, 6, 4)  # two strided levels, the bottom unstrided
    assert make_network(**model.arguments).arguments == model.arguments
    with pytest.raises(ValueError, match="not divisible by"):
        model(torch.zeros(1, 1, 8, 12, 18))


def test_residual_unet_is_monais_unet_with_residual_units():
    """The same weights give MONAI's UNet(strides 2, num_res_units=2) output (MONAI's instance
    norm has no affine parameters; ours start at 1 and 0)."""
    monai_nets = pytest.importorskip("monai.networks.nets", reason="MONAI: requirements-bench.txt")
    torch.manual_seed(0)
    theirs = monai_nets.UNet(3, 1, 4, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)
    ours = ResidualUNet(1, 4, depth=3, channels=(4, 8, 16))
    affine = {
        f"{name}.{p}"
        for name, m in ours.named_modules()
        if isinstance(m, nn.InstanceNorm3d)
        for p in ("weight", "bias")
    }
    state = ours.state_dict()
    ours_keys = [k for k in state if k not in affine]
    for key, value in zip(ours_keys, theirs.state_dict().values(), strict=True):
        assert state[key].shape == value.shape, key
        state[key] = value
    ours.load_state_dict(state)
    image = torch.randn(1, 1, 8, 16, 12)
    assert torch.allclose(ours.eval()(image), theirs.eval()(image), atol=1e-5)


def test_residual_unet_takes_none_of_unet3ds_options(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "raw", model={"network": "residual_unet", "depth": 4})
    assert load_config(cfg).model.size_multiple == (8, 8, 8)
    with pytest.raises(ConfigError, match="deep_supervision and head_kernel are options of unet3d"):
        load_config(cfg, ["model.deep_supervision=true"])
    with pytest.raises(ConfigError, match="network = 'vnet': choose unet3d or residual_unet"):
        load_config(cfg, ["model.network=vnet"])


def test_deep_supervision_loss_weighs_coarser_levels_less():
    loss_fn = SegmentationLoss(3)
    target = torch.zeros(1, 8, 16, 16, dtype=torch.long)
    target[:, 2:6, 4:12, 4:12] = 1
    perfect = F.one_hot(target, 3).movedim(-1, 1).float() * 20
    half = F.one_hot(target[:, ::2, ::2, ::2], 3).movedim(-1, 1).float() * 20
    wrong_half = half.flip(1)
    good = loss_fn([perfect, half], target).item()  # numbers, not 0-d tensors, to approx
    assert good == pytest.approx(loss_fn(perfect, target).item(), abs=1e-4)  # both right
    worse = loss_fn([perfect, wrong_half], target).item()
    coarse_wrong = loss_fn(wrong_half, target[:, ::2, ::2, ::2]).item()
    # the coarse level weighs 1/3 (weights 1 and 1/2, normalised)
    assert worse == pytest.approx(good + (coarse_wrong - good) / 3, rel=1e-4)


def test_coarse_targets_sit_where_the_network_centres_its_coarse_voxels():
    """Deep supervision's coarse targets: without centres, torch's nearest-exact; with the
    strided stem's centres, the target voxel under each coarse voxel's receptive field."""
    target = torch.randint(0, 4, (2, 8, 16, 24))
    for size in [(4, 8, 12), (2, 4, 6), (8, 4, 6)]:
        exact = F.interpolate(target[:, None].float(), size=size, mode="nearest-exact")
        assert torch.equal(resize_labels(target, size), exact[:, 0].long())
    assert torch.equal(
        resize_labels(target, (2, 4, 6), (3.0, 0.0, 1.0)), target[:, 3::4, ::4, 1::4]
    )
    with pytest.raises(ValueError, match=r"coarse size \(3, 8, 12\) does not divide"):
        resize_labels(target, (3, 8, 12))

    model = UNet3D(
        base_channels=2, depth=3, norm="batch", stem_stride=(2, 2, 2), deep_supervision=True
    )
    assert model.supervision_centres == [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]
    assert UNet3D(base_channels=2, depth=3, deep_supervision=True).supervision_centres == [
        (0.5, 0.5, 0.5)
    ]
    assert ResidualUNet(base_channels=2, depth=3).supervision_centres == []
    assert make_loss(model, 4, TrainingConfig()).centres is None  # nearest_exact, the default
    centred = replace(TrainingConfig(), deep_supervision_targets="centred")
    assert make_loss(model, 4, centred).centres == model.supervision_centres
    # Measure the centres: symmetric (constant) kernels, the deeper levels cut off, batch norm
    # with its unit running statistics (voxels independent); the input gradient of one coarse
    # voxel then centres on the input voxel its features are centred on.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
                module.weight.fill_(0.0 if module in model.upsamplers else 0.1)
    model.eval()
    model.training = True  # the coarse outputs, with eval-mode batch norm
    torch.manual_seed(0)
    # far enough from the edges that no receptive field is cut by the padding
    for level, (index, stride) in enumerate([((12, 11, 13), 2), ((6, 5, 6), 4)], start=1):
        weight = torch.zeros(48, 48, 48)
        for _ in range(8):  # max-pooling picks either child: average over inputs
            image = (torch.rand(1, 1, 48, 48, 48) + 1).requires_grad_()
            model(image)[level][0, :, index[0], index[1], index[2]].sum().backward()
            weight += image.grad[0, 0].abs()
        for axis, centre in enumerate(model.supervision_centres[level - 1]):
            profile = weight.sum(dim=tuple(a for a in range(3) if a != axis))
            measured = (profile * torch.arange(len(profile))).sum() / profile.sum()
            assert measured == pytest.approx(stride * index[axis] + centre, abs=0.3)


def test_seed_architecture_channels():
    model = UNet3D(num_classes=20)
    widths = [block[0].out_channels for block in model.encoders]
    assert widths == [32, 64, 128, 256, 512]


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="no native bf16 on this CPU")
def test_bf16_weight_gradients_of_two_slice_inputs_match_fp32():
    """oneDNN's bf16 kernel returns wrong weight gradients for this shape; Conv3d must not."""
    torch.manual_seed(0)
    conv = Conv3d(32, 32, 3, padding=1, bias=False)
    for slices, dtype in [(2, torch.float32), (4, torch.bfloat16)]:
        image, grad = torch.randn(2, 32, slices, 8, 4), torch.randn(2, 32, slices, 8, 4)
        conv(image).backward(grad)
        reference, conv.weight.grad = conv.weight.grad, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(image)
        out.backward(grad.to(out.dtype))
        assert out.dtype == dtype
        error = (conv.weight.grad - reference).abs().max() / reference.abs().max()
        assert error < 0.02, (slices, float(error))
        conv.weight.grad = None


def test_loss_decreases_when_overfitting_one_case():
    torch.manual_seed(0)
    target = torch.zeros(1, 8, 16, 16, dtype=torch.long)
    target[:, 2:6, 4:12, 4:8] = 1
    target[:, 2:6, 4:12, 9:12] = 2
    image = target.float()[:, None] + 0.1 * torch.randn(1, 1, 8, 16, 16)
    model = UNet3D(num_classes=3, base_channels=4, depth=2)
    loss_fn = SegmentationLoss(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        optimizer.zero_grad()
        loss = loss_fn(model(image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_confusion_scores_against_hand_values():
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    confusion = confusion_matrix(pred, truth, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    scores = scores_from_confusion(confusion.numpy())
    assert scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["dice"].tolist() == pytest.approx([4 / 6, 4 / 5, 4 / 5])
    assert scores["f1_macro"] == pytest.approx((4 / 6 + 8 / 5) / 3)


def test_hd95_and_assd_of_shifted_boxes():
    a = np.zeros((20, 30, 40), np.uint8)
    a[5:15, 5:15, 5:15] = 1
    b = np.roll(a, 3, axis=2)  # shifted 3 voxels along x
    images = []
    for array in (a, b):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.5, 1.0, 2.0))
        images.append(image)
    same = overlap_and_distances(images[0], images[0])
    assert same == {"dice": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    shifted = overlap_and_distances(images[1], images[0])
    assert shifted["dice"] == pytest.approx(2 * 700 / 2000)
    assert shifted["hd95_mm"] == pytest.approx(1.5)  # 3 voxels x 0.5 mm
    assert 0 < shifted["assd_mm"] < 1.5
    empty = overlap_and_distances(images[0] * 0, images[0])
    assert empty["dice"] == 0.0 and np.isnan(empty["hd95_mm"])
    both_empty = overlap_and_distances(images[0] * 0, images[0] * 0)
    assert both_empty == {"dice": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}


def test_hd95_of_a_small_mask_inside_a_large_one_against_hand_values():
    """Asymmetric masks: the two directed distances differ (2.5 mm vs up to 17.3 mm)."""
    reference = np.zeros((21, 21, 21), np.uint8)
    reference[5:16, 5:16, 5:16] = 1
    prediction = np.zeros_like(reference)
    prediction[10, 10, 10] = 1
    spacing = (0.5, 1.0, 2.0)  # x, y, z
    images = []
    for array in (prediction, reference):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        images.append(image)
    # by hand: the reference's surface is the cube's shell (11^3 - 9^3 = 602 voxels); the
    # prediction's surface is its one voxel. Distances are between voxel centres, in mm.
    cube = np.argwhere(reference)  # (z, y, x)
    shell = cube[((cube == 5) | (cube == 15)).any(axis=1)]
    assert len(shell) == 602
    to_centre = np.sqrt((((shell - 10) * np.array(spacing[::-1])) ** 2).sum(axis=1))
    prediction_to_reference = to_centre.min()  # 2.5 mm: 5 voxels along x
    expected_hd95 = max(prediction_to_reference, np.percentile(to_centre, 95))
    expected_assd = (to_centre.sum() + prediction_to_reference) / (len(to_centre) + 1)
    scores = overlap_and_distances(*images)
    assert scores["dice"] == pytest.approx(2 / (1 + 11**3))
    assert scores["hd95_mm"] == pytest.approx(expected_hd95, rel=1e-5)
    assert scores["hd95_mm"] > 4 * prediction_to_reference
    assert scores["assd_mm"] == pytest.approx(expected_assd, rel=1e-5)


def test_segmentation_loss_against_a_hand_computed_value():
    # two voxels, two classes: softmax (0.5, 0.5) with target 1, (0.75, 0.25) with target 0
    logits = torch.tensor([[0.0, np.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 2)
    cross_entropy = (-np.log(0.5) - np.log(0.75)) / 2
    soft_dice = (2 * 0.5 + 1) / ((0.5 + 0.25) + 1 + 1)  # class 1: overlap 0.5, sums 0.75 and 1
    assert SegmentationLoss(2, 1.0, 0.0)(logits, target).item() == pytest.approx(cross_entropy)
    assert SegmentationLoss(2, 0.0, 1.0)(logits, target).item() == pytest.approx(1 - soft_dice)
    assert SegmentationLoss(2, 2.0, 1.0)(logits, target).item() == pytest.approx(
        2 * cross_entropy + 1 - soft_dice
    )
    # with the background: class 0 overlaps 0.75 (voxel 2), sums 0.5 + 0.75 and 1
    background_dice = (2 * 0.75 + 1) / ((0.5 + 0.75) + 1 + 1)
    assert SegmentationLoss(2, 0.0, 1.0, dice_background=True)(logits, target).item() == (
        pytest.approx(1 - (soft_dice + background_dice) / 2)
    )
    # a second volume without class 1, both voxels 50:50: alone its Dice is (0 + 1) / (1 + 1);
    # batch Dice pools the two volumes' sums (overlap 0.5, predicted 0.75 + 1, reference 1)
    logits = torch.cat([logits, torch.zeros_like(logits)])
    target = torch.cat([target, torch.zeros_like(target)])
    per_volume = SegmentationLoss(2, 0.0, 1.0)(logits, target).item()
    assert per_volume == pytest.approx(1 - (soft_dice + 0.5) / 2)
    pooled = SegmentationLoss(2, 0.0, 1.0, batch_dice=True)(logits, target).item()
    assert pooled == pytest.approx(1 - (2 * 0.5 + 1) / (1.75 + 1 + 1))


def test_augmentation_keeps_image_and_mask_aligned():
    """A mask that is a threshold of its image is still that threshold after augment_batch."""
    torch.manual_seed(0)
    coarse = torch.randn(2, 1, 4, 8, 6)
    images = torch.nn.functional.interpolate(coarse, size=(16, 48, 40), mode="trilinear")

    def threshold(volume: torch.Tensor) -> torch.Tensor:
        return (volume[:, 0] > 0.3).long() + (volume[:, 0] > 0.9).long()

    masks = threshold(images)
    spatial = TrainingConfig(
        aug_rotation_deg=30, aug_scale=0.2, aug_intensity=0, aug_gamma=0, aug_noise=0
    )
    torch.manual_seed(5)
    moved_images, moved_masks = augment_batch(images, masks, spatial)
    torch.manual_seed(5)  # the same draws: where the moved volume lies inside the original
    _, inside = augment_batch(images, torch.ones_like(masks), spatial)
    inside = inside.bool()
    assert not torch.equal(moved_masks, masks)
    agreement = (threshold(moved_images) == moved_masks)[inside].float().mean().item()
    unmoved = (masks == moved_masks)[inside].float().mean().item()
    assert agreement > 0.9 > unmoved  # aligned after the move, not before it
    torch.manual_seed(5)  # per class (nnU-Net's): the class boundaries move as the image's do
    linear = replace(spatial, aug_mask_interpolation="linear")
    moved_images, moved_masks = augment_batch(images, masks, linear)
    closer = (threshold(moved_images) == moved_masks)[inside].float().mean().item()
    assert closer > agreement
    torch.manual_seed(5)  # the class count given (no read-back from the device): the same
    assert torch.equal(augment_batch(images, masks, linear, num_classes=3)[1], moved_masks)
    for settings in (TrainingConfig(aug_rotation_deg=30, aug_scale=0.2), linear):
        _, full = augment_batch(images, masks, settings)
        assert full.dtype == masks.dtype and set(full.unique().tolist()) <= {0, 1, 2}


def test_flip_only_augmentation_is_exact_and_moves_image_and_mask_together():
    """No rotation, scaling or intensity change: each volume is itself or its left-right
    mirror (the slice axis), unresampled, and its mask is mirrored with it."""
    torch.manual_seed(1)
    images = torch.randn(8, 1, 4, 6, 5)
    masks = torch.randint(0, 3, (8, 4, 6, 5))
    flips = TrainingConfig(
        aug_rotation_deg=0, aug_scale=0, aug_intensity=0, aug_gamma=0, aug_noise=0
    )
    moved_images, moved_masks = augment_batch(images, masks, flips)
    mirrored = [torch.equal(moved_images[i], images[i].flip(1)) for i in range(8)]
    for i in range(8):
        assert torch.equal(moved_images[i], images[i].flip(1) if mirrored[i] else images[i])
        assert torch.equal(moved_masks[i], masks[i].flip(0) if mirrored[i] else masks[i])
    assert 0 < sum(mirrored) < 8  # both outcomes drawn (seeded)
    still = augment_batch(images, masks, replace(flips, aug_flip_lr=False))
    assert torch.equal(still[0], images) and torch.equal(still[1], masks)


def test_spatial_probability_leaves_undrawn_volumes_unresampled(tmp_path):
    """aug_spatial_probability = 0: rotation and scaling configured, yet every volume is itself
    or its mirror (sampled at its own voxel centres) with its mask exact; at 1 the draws are
    those of the default (every volume moved); outside [0, 1] the configuration is refused."""
    torch.manual_seed(2)
    images = torch.randn(8, 1, 8, 24, 16)
    masks = torch.randint(0, 3, (8, 8, 24, 16))
    spatial = TrainingConfig(
        aug_rotation_deg=30, aug_scale=0.2, aug_intensity=0, aug_gamma=0, aug_noise=0
    )
    moved_images, moved_masks = augment_batch(
        images, masks, replace(spatial, aug_spatial_probability=0)
    )
    mirrored = [torch.equal(moved_masks[i], masks[i].flip(0)) for i in range(8)]
    for i in range(8):
        expected = images[i].flip(1) if mirrored[i] else images[i]
        assert torch.allclose(moved_images[i], expected, atol=1e-4)
        assert torch.equal(moved_masks[i], masks[i].flip(0) if mirrored[i] else masks[i])
    assert 0 < sum(mirrored) < 8
    unmoved = replace(spatial, aug_spatial_probability=0, aug_mask_interpolation="linear")
    for moved, mask in zip(augment_batch(images, masks, unmoved)[1], masks, strict=True):
        assert torch.equal(moved, mask) or torch.equal(moved, mask.flip(0))  # exact per class
    torch.manual_seed(3)
    always = augment_batch(images, masks, replace(spatial, aug_spatial_probability=1.0))
    torch.manual_seed(3)
    default = augment_batch(images, masks, spatial)
    assert torch.equal(always[0], default[0]) and torch.equal(always[1], default[1])
    assert not torch.allclose(always[0][0], images[0], atol=1e-2)
    (tmp_path / "raw").mkdir()
    cfg = write_config(tmp_path, tmp_path / "raw", training={"aug_spatial_probability": 1.5})
    with pytest.raises(ConfigError, match="aug_spatial_probability = 1.5: a probability"):
        load_config(cfg)


def test_orphan_masks_are_matched_by_exact_case_id(tmp_path):
    for folder, name in (("images", "11_t1.mha"), ("masks", "11_t1.mha"), ("masks", "1_t1.mha")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"")
    cases, problems = discover_cases(tmp_path, ("t1",))
    assert [c.case_id for c in cases] == ["11_t1"]
    assert problems == [("1_t1", "mask 1_t1.mha has no image in images/")]


def test_dataset_cache_falls_back_to_disk_where_free_memory_is_unknown(monkeypatch, capsys):
    assert choose_cache(1000, torch.device("cpu"), True) == torch.device("cpu")

    def no_such_name(name: str) -> int:
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "sysconf", no_such_name)
    assert choose_cache(1000, torch.device("cpu"), True) is None
    assert "free memory unknown" in capsys.readouterr().out


# ---------------------------------------------------------------- instance step


VERTEBRA, DISC, CANAL = 1, 2, 3  # class indices, as in configuration.txt's [labels]


def _semantic(instances: sitk.Image) -> sitk.Image:
    """SPIDER instance mask -> uint8 class-index mask, same geometry."""
    raw = sitk.GetArrayFromImage(instances)
    classes = np.zeros(raw.shape, np.uint8)
    classes[((raw >= 1) & (raw <= 25)) | ((raw >= 101) & (raw <= 125))] = VERTEBRA
    classes[(raw >= 201) & (raw <= 225)] = DISC
    classes[raw == 100] = CANAL
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(instances)
    return image


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
    )


@pytest.mark.parametrize(
    "seed, small, orientation",
    [
        (0, True, "PIR"),  # 9 vertebrae, all whole
        (0, True, "LPS"),
        (2, True, "LPS"),  # a partially visible topmost vertebra (109)
        (11, True, "PIR"),  # a partial vertebra (105) in two disconnected pieces
        (11, True, "LPS"),
        (5, False, "LPS"),  # full-size spacing (0.87 mm in plane)
    ],
)
def test_instances_recovered_from_the_reference_semantic_mask(tmp_path, seed, small, orientation):
    images, mask = synth_patient(np.random.default_rng(seed), small=small)
    _, mask_path = write_case(tmp_path, "1", "t2", images["t2"], mask, orientation)
    reference = sitk.ReadImage(str(mask_path))
    classes = _semantic(reference)
    assert (
        sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(classes.GetDirection())
        == orientation
    )

    result = separate_instances(classes, VERTEBRA, DISC, CANAL, min_instance_mm3=0.0)

    assert _same_geometry(result, classes)
    assert result.GetPixelID() == sitk.sitkUInt16
    expected = sitk.GetArrayFromImage(reference).astype(int)
    found = sitk.GetArrayFromImage(result).astype(int)
    assert set(np.unique(found)) == set(np.unique(expected))  # the same numbers, 1xx included
    for label in np.unique(expected[expected > 0]):
        assert dice(found == label, expected == label) >= 0.95, label
    # nothing outside the three classes, and every class voxel is kept (no minimum volume)
    assert np.array_equal(found > 0, expected > 0)


@pytest.mark.parametrize("seed, orientation", [(2, "PIR"), (3, "LPS")])
def test_touching_vertebrae_are_split_level_by_level(seed, orientation):
    """Vertebrae grown by one voxel in plane (2.5 mm) fuse into a single connected mass, as a
    coarse prediction might; every vertebra is still recovered (Dice on its own voxels)."""
    _, mask = synth_patient(np.random.default_rng(seed), small=True)  # PIR
    classes = _semantic(mask)
    vertebrae = sitk.BinaryDilate(classes == VERTEBRA, (1, 1, 0), sitk.sitkBox)
    grown = sitk.GetArrayFromImage(classes)
    grown[(sitk.GetArrayFromImage(vertebrae) > 0) & (grown == 0)] = VERTEBRA
    fused = sitk.GetImageFromArray(grown)
    fused.CopyInformation(classes)
    assert sitk.GetArrayFromImage(sitk.ConnectedComponent(fused == VERTEBRA, True)).max() == 1

    result = separate_instances(sitk.DICOMOrient(fused, orientation), VERTEBRA, DISC, CANAL, 0)
    found = sitk.GetArrayFromImage(sitk.DICOMOrient(result, "PIR")).astype(int)
    expected = sitk.GetArrayFromImage(mask).astype(int)
    reference_bone = (expected % 100 >= 1) & (expected < 200) & (expected != 100)
    for label in np.unique(expected[reference_bone]):
        assert dice(found[reference_bone] == label, expected[reference_bone] == label) >= 0.95


def _toy_spine() -> sitk.Image:
    """A hand-built PIR class mask (spacing 1 x 1 x 3 mm): numpy (slices, rows, columns).

    Two whole bodies (rows 20-45 and 55-80) touching through a thin posterior bridge around
    the disc between them, a cut body on the top border (rows 0-10) above a second disc, a
    canal behind them, and one detached 'spinous process' level with each whole body.
    """
    array = np.zeros((8, 100, 80), np.uint8)
    body = np.s_[1:7, :, 10:41]
    array[body[0], 0:11, body[2]] = VERTEBRA  # cut by the top of the field of view
    array[1:7, 13:18, 12:38] = DISC
    array[body[0], 20:46, body[2]] = VERTEBRA
    array[1:7, 47:54, 12:37] = DISC
    array[1:7, 46:55, 38:41] = VERTEBRA  # the bridge
    array[body[0], 55:81, body[2]] = VERTEBRA
    array[2:6, :, 45:56] = CANAL
    array[3:5, 30:41, 60:71] = VERTEBRA  # spinous process of the upper whole body
    array[3:5, 62:73, 60:71] = VERTEBRA  # ... of the lower one
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    image.SetOrigin((12.5, -80.0, 40.0))
    image.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))  # PIR
    return image


@pytest.mark.parametrize("orientation", ["PIR", "LPS", "RAI"])
def test_touching_bodies_and_detached_posterior_elements(orientation):
    classes = sitk.DICOMOrient(_toy_spine(), orientation)
    result = separate_instances(classes, VERTEBRA, DISC, CANAL, min_instance_mm3=0.0)
    assert _same_geometry(result, classes)
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(result, "PIR"))
    assert labels[3, 70, 25] == 1 and labels[3, 30, 25] == 2  # lowest whole body is L5
    assert labels[3, 5, 25] == 103  # small, on the top border: partially visible
    assert labels[3, 50, 39] in (1, 2)  # the bridge goes to one of the two bodies
    assert labels[3, 35, 65] == 2 and labels[3, 67, 65] == 1  # spinous processes follow
    assert labels[3, 50, 20] == 202 and labels[3, 15, 20] == 203  # disc below vertebra k
    assert labels[3, 50, 50] == 100
    assert set(np.unique(labels)) == {0, 1, 2, 103, 100, 202, 203}


def test_fragments_below_the_minimum_volume_are_dropped():
    classes = _toy_spine()
    array = sitk.GetArrayFromImage(classes)
    array[6, 90:92, 70:72] = VERTEBRA  # 4 voxels = 12 mm^3
    array[0, 95:97, 20:22] = DISC  # 12 mm^3
    array[0, 5:7, 60:62] = CANAL  # 12 mm^3
    noisy = sitk.GetImageFromArray(array)
    noisy.CopyInformation(classes)
    kept = sitk.GetArrayFromImage(separate_instances(noisy, VERTEBRA, DISC, CANAL, 0.0))
    assert kept[6, 90, 70] > 0 and kept[0, 95, 20] > 200 and kept[0, 5, 60] == 100
    clean = sitk.GetArrayFromImage(separate_instances(classes, VERTEBRA, DISC, CANAL, 20.0))
    dropped = sitk.GetArrayFromImage(separate_instances(noisy, VERTEBRA, DISC, CANAL, 20.0))
    assert np.array_equal(dropped, clean)  # the fragments are 0, nothing else changes
    assert dropped[6, 90, 70] == 0 and dropped[0, 95, 20] == 0 and dropped[0, 5, 60] == 0
    # without a canal class nothing becomes 100; an empty mask gives an empty result
    no_canal = sitk.GetArrayFromImage(separate_instances(classes, VERTEBRA, DISC, None, 20.0))
    assert 100 not in no_canal and np.array_equal(no_canal[clean != 100], clean[clean != 100])
    empty = sitk.Image(classes.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(classes)
    assert not sitk.GetArrayFromImage(separate_instances(empty, 1, 2, 3, 0.0)).any()


def test_discs_without_vertebrae_are_numbered_from_the_lowest():
    array = np.zeros((4, 60, 30), np.uint8)  # PIR: rows run superior -> inferior
    for top in (5, 25, 45):
        array[1:3, top : top + 5, 5:25] = DISC
    image = sitk.GetImageFromArray(array)
    image.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    labels = sitk.GetArrayFromImage(separate_instances(image, VERTEBRA, DISC, CANAL, 0.0))
    assert labels[1, 47, 10] == 201 and labels[1, 27, 10] == 202 and labels[1, 7, 10] == 203


def test_instance_table_on_a_hand_built_mask():
    array = np.zeros((4, 6, 8), np.uint16)  # (z, y, x), identity direction: LPS
    array[0:3, 1:3, 2:6] = 1  # 24 voxels
    array[3, 0:6, 0:2] = 106  # 12 voxels, a single slice
    array[1, 4:6, 6:8] = 201  # 4 voxels
    array[2, 5, 7] = 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.8, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    table = instance_table(image).set_index("label")

    assert list(table.index) == [1, 100, 106, 201]
    assert list(table["structure"]) == ["vertebra", "canal", "partial vertebra", "disc"]
    assert list(table["level"]) == ["L5", "", "T12", "L5/S1"]
    voxel = 0.5 * 0.8 * 3.0
    assert table["volume_mm3"].to_numpy() == pytest.approx(
        [24 * voxel, voxel, 12 * voxel, 4 * voxel]
    )
    assert table.loc[1, ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].tolist() == (
        pytest.approx([10 + 0.5 * 3.5, 20 + 0.8 * 1.5, 30 + 3.0 * 1])
    )
    # S-I extent: voxel rows along z, each 3 mm thick
    assert table["si_extent_mm"].to_numpy() == pytest.approx([9.0, 3.0, 3.0, 3.0])

    # physical quantities do not depend on how the mask is stored
    for orientation in ("PIR", "RAI"):
        other = instance_table(sitk.DICOMOrient(image, orientation)).set_index("label")
        numbers = ["volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "si_extent_mm"]
        assert np.allclose(other[numbers].to_numpy(float), table[numbers].to_numpy(float))

    # in a PIR scan the rows run along S-I: a 5-row instance at 0.7 mm is 3.5 mm tall
    pir = sitk.GetImageFromArray(np.pad(np.ones((2, 5, 3), np.uint8), 1))
    pir.SetSpacing((0.4, 0.7, 4.0))
    pir.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    assert instance_table(pir)["si_extent_mm"].tolist() == pytest.approx([3.5])
    assert instance_table(sitk.Image(3, 3, 3, sitk.sitkUInt8)).empty


def test_level_names():
    assert [level_name(k) for k in (1, 2, 5, 6, 17, 18, 24)] == [
        "L5",
        "L4",
        "L1",
        "T12",
        "T1",
        "C7",
        "C1",
    ]
    assert level_name(103) == "L3" and level_name(100) == ""
    assert [level_name(k) for k in (201, 202, 205, 206)] == ["L5/S1", "L4/L5", "L1/L2", "T12/L1"]
    for bad in (0, 26, 99, 126, 200, 226):
        with pytest.raises(ValueError, match=str(bad)):
            level_name(bad)


def _pir_levels(instances: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(instances, "PIR")).astype(int)


def _with_sacrum_block(
    mask: sitk.Image, height_mm: float, posterior_mm: float = 0.0
) -> tuple[sitk.Image, np.ndarray]:
    """A PIR SPIDER mask -> its class mask with a block of 'vertebra' painted in the sacrum:
    from 3 mm below the L5/S1 disc, height_mm tall, the disc's A-P extent moved posterior_mm
    back, its slices. Returns (class mask, boolean block)."""
    reference = sitk.GetArrayFromImage(mask)
    classes = sitk.GetArrayFromImage(_semantic(mask))
    sy, sx = mask.GetSpacing()[1], mask.GetSpacing()[0]
    zz, yy, xx = np.nonzero(reference == 201)
    top = yy.max() + 1 + int(round(3 / sy))
    back = int(round(posterior_mm / sx))
    rows = slice(top, top + int(round(height_mm / sy)))
    block = np.zeros(classes.shape, bool)
    block[zz.min() : zz.max() + 1, rows, xx.min() + back : xx.max() + back] = True
    block &= classes == 0
    classes[block] = VERTEBRA
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(mask)
    assert int(round(10 / sx)) < xx.max() - xx.min()  # the block is body-wide, not a speck
    return image, block


@pytest.mark.parametrize(
    "seed, orientation, height_mm, posterior_mm",
    [
        (0, "PIR", 12, 0),
        (4, "LPS", 12, 0),
        (0, "PIR", 30, 25),  # a whole S1 body, tilted behind the discs' column (a CV case)
    ],
)
def test_a_piece_of_sacrum_predicted_as_vertebra_keeps_l5_as_l5(
    seed, orientation, height_mm, posterior_mm
):
    _, mask = synth_patient(np.random.default_rng(seed), small=True)  # PIR, sacrum unlabelled
    classes, block = _with_sacrum_block(mask, height_mm, posterior_mm)
    result = separate_instances(sitk.DICOMOrient(classes, orientation), VERTEBRA, DISC, CANAL, 0)
    found = _pir_levels(result)
    expected = sitk.GetArrayFromImage(mask).astype(int)
    assert not found[block].any()  # the sacrum is unlabelled, as in SPIDER
    for label in np.unique(expected[expected > 0]):
        assert dice(found == label, expected == label) >= 0.95, label
    if not posterior_mm:
        assert level_note(result) == ""


def test_a_stray_disc_blob_in_the_sacrum_does_not_make_a_piece_of_s1_l5():
    """A model's small disc blob low in the sacrum (an S1/S2 remnant, as on a real slab) is no
    landmark: the piece of S1 above it stays sacrum, the blob gets no number, L5 stays L5."""
    _, mask = synth_patient(np.random.default_rng(0), small=True)
    expected = sitk.GetArrayFromImage(mask).astype(int)
    classes_image, block = _with_sacrum_block(mask, 8)
    classes = sitk.GetArrayFromImage(classes_image)
    zz, yy, xx = np.nonzero(block)
    top = yy.max() + 1 + int(round(6 / mask.GetSpacing()[1]))  # 6 mm below the S1 piece
    rows = slice(top, top + int(round(3 / mask.GetSpacing()[1])))  # 3 mm tall
    middle, quarter = (xx.min() + xx.max()) // 2, (xx.max() - xx.min()) // 4
    blob = np.zeros(classes.shape, bool)
    blob[zz.min() : zz.max() + 1, rows, middle - quarter // 2 : middle + quarter // 2] = True
    blob &= classes == 0
    assert 0 < blob.sum() < DISC_PIECE_FRACTION * (expected == 201).sum()
    classes[blob] = DISC
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(mask)
    result = separate_instances(image, VERTEBRA, DISC, CANAL, 0)
    found = _pir_levels(result)
    assert not found[block].any() and not found[blob].any()
    for label in np.unique(expected[expected > 0]):
        assert dice(found == label, expected == label) >= 0.95, label
    assert level_note(result) == ""


def test_a_body_below_the_lowest_disc_is_l5_when_its_disc_was_missed():
    """No L5/S1 disc: the full-height body below the lowest disc is L5, with a note."""
    _, mask = synth_patient(np.random.default_rng(0), small=True)
    reference = sitk.GetArrayFromImage(mask)
    classes = sitk.GetArrayFromImage(_semantic(mask))
    classes[reference == 201] = 0
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(mask)
    found = _pir_levels(separate_instances(image, VERTEBRA, DISC, CANAL, 0))
    for label in (1, 2, 3, 202, 203):
        assert dice(found == label, reference == label) >= 0.95, label
    assert "no disc below the lowest vertebra" in level_note(
        separate_instances(image, VERTEBRA, DISC, CANAL, 0)
    )


@pytest.mark.parametrize("orientation", ["PIR", "RAI"])
def test_a_missed_disc_skips_its_number_and_is_noted(orientation):
    _, mask = synth_patient(np.random.default_rng(2), small=True)
    reference = sitk.GetArrayFromImage(mask)
    classes = sitk.GetArrayFromImage(_semantic(mask))
    classes[reference == 203] = 0  # the L3/L4 disc, inside the column
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(mask)
    result = separate_instances(sitk.DICOMOrient(image, orientation), VERTEBRA, DISC, CANAL, 0)
    found = _pir_levels(result)
    for label in np.unique(reference[(reference > 0) & (reference != 203)]):
        assert dice(found == label, reference == label) >= 0.95, label
    assert 203 not in found
    assert level_note(result) == "not found between L4 and L3: L3/L4 disc"
    table = instance_table(result)
    assert (table["level_note"] == level_note(result)).all()


def test_a_field_of_view_ending_above_l5_is_counted_from_its_lowest_vertebra_and_flagged():
    """Decision: without the sacrum in view the lowest vertebra is still called L5 (SPIDER's
    convention), and the note says that L5 is unconfirmed."""
    _, mask = synth_patient(np.random.default_rng(0), small=True)
    reference = sitk.GetArrayFromImage(mask)
    rows = np.nonzero((reference == 2).any(axis=(0, 2)))[0]  # L4's rows
    cut = int(rows[len(rows) // 2])  # the scan ends in the middle of L4
    cropped = sitk.GetImageFromArray(sitk.GetArrayFromImage(_semantic(mask))[:, :cut])
    cropped.SetSpacing(mask.GetSpacing())
    cropped.SetDirection(mask.GetDirection())
    result = separate_instances(cropped, VERTEBRA, DISC, CANAL, 0)
    found = sitk.GetArrayFromImage(result).astype(int)
    assert dice(found == 1, reference[:, :cut] == 2) >= 0.95  # the cut L4 is called L5 ...
    assert "lower edge of the field of view" in level_note(result)  # ... and flagged


def test_number_levels_from_heights():
    # bottom-up: disc 0 mm, body 15, disc 30, body 45, disc 60, body 75
    vertebrae = {1: 15.0, 2: 45.0, 3: 75.0}
    discs = {7: 0.0, 8: 30.0, 9: 60.0}
    assert number_levels(vertebrae, discs) == ({1: 1, 2: 2, 3: 3}, {7: 1, 8: 2, 9: 3}, [])
    # a fragment high in the column and a disc in two pieces do not rename anything below
    assert number_levels({**vertebrae, 4: 78.0}, {**discs, 10: 2.0})[:2] == (
        {1: 1, 2: 2, 3: 3, 4: 3},
        {7: 1, 10: 1, 8: 2, 9: 3},
    )
    # a missed vertebra between two discs skips a number, and says so
    numbers, disc_numbers, notes = number_levels({1: 15.0, 3: 75.0}, discs)
    assert numbers == {1: 1, 3: 3} and disc_numbers == {7: 1, 8: 2, 9: 3}
    assert notes == ["not found between L4/L5 disc and L3/L4 disc: L4"]
    # the lowest structure a vertebra: it is L5
    numbers, disc_numbers, notes = number_levels(vertebrae, {8: 30.0, 9: 60.0})
    assert numbers == {1: 1, 2: 2, 3: 3} and disc_numbers == {8: 2, 9: 3}
    assert notes == ["no disc below the lowest vertebra: it is called L5 (L5/S1 disc not found)"]
    assert number_levels({}, {}) == ({}, {}, [])
    # small disc pieces are no landmarks: a piece between L5/S1 and L5's body (as a model made
    # on a real slab) joins the nearest disc level instead of opening a level of its own
    numbers, disc_numbers, notes = number_levels(vertebrae, discs, {11: 12.0, 12: 20.0, 13: -9.0})
    assert numbers == {1: 1, 2: 2, 3: 3} and notes == []
    assert disc_numbers == {7: 1, 8: 2, 9: 3, 11: 1, 12: 2, 13: 1}
    # ... and a piece nearer to a disc below L5/S1 (in the sacrum) gets no number
    assert number_levels(vertebrae, discs, {14: -22.0})[1] == {7: 1, 8: 2, 9: 3}
    # a level whose disc is only a small piece is not reported as missing
    assert number_levels(vertebrae, {7: 0.0, 8: 30.0})[2] == [
        "not found between L4 and L3: L3/L4 disc"
    ]
    assert number_levels(vertebrae, {7: 0.0, 8: 30.0}, {9: 61.0}) == (
        {1: 1, 2: 2, 3: 3},
        {7: 1, 8: 2, 9: 3},
        [],
    )


def test_instances_script_on_saved_masks(tmp_path):
    import instances

    _, mask = synth_patient(np.random.default_rng(0), small=True)
    good = tmp_path / "scan_a.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(_semantic(mask), "LPS"), str(good))
    bad = tmp_path / "scan_b.mha"
    sitk.WriteImage(mask, str(bad))  # SPIDER numbers, not class indices
    out = tmp_path / "out"
    assert instances.main([str(good), str(bad), "--output-dir", str(out)]) == 1
    result = sitk.ReadImage(str(out / "scan_a_instances.mha"))
    expected = sitk.GetArrayFromImage(mask).astype(int)
    found = _pir_levels(result)
    for label in np.unique(expected[expected > 0]):
        assert dice(found == label, expected == label) >= 0.95, label
    table = pd.read_csv(out / "scan_a_instances.csv", keep_default_na=False)
    assert set(table["label"]) == set(np.unique(expected[expected > 0]).tolist())
    assert (table["level_note"] == "").all()
    assert not (out / "scan_b_instances.mha").exists()


# ---------------------------------------------------------------- SPIDER instance metric


SPIDER_SPACING = (0.5, 0.5, 3.0)  # x, y, z in mm: slices 3 mm apart


def _mask(array: np.ndarray, spacing=SPIDER_SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint16))
    image.SetSpacing(spacing)
    return image


def _empty() -> np.ndarray:
    return np.zeros((20, 30, 40), np.uint16)  # z, y, x


def _cube(array: np.ndarray, label: int, x0: int) -> None:
    """10 x 10 x 10 voxels (1000) at z 5:15, y 5:15, x x0:x0+10."""
    array[5:15, 5:15, x0 : x0 + 10] = label


def test_spider_structure_of_follows_the_challenge_ranges():
    assert [structure_of(v) for v in (0, 1, 25, 99, 100, 101, 125, 200, 201, 225)] == [
        None, "vertebrae", "vertebrae", "vertebrae", "canal", None, None, None, "discs", "discs",
    ]  # fmt: skip


def test_spider_perfect_prediction():
    ref = _empty()
    _cube(ref, 1, 2)
    _cube(ref, 201, 13)
    _cube(ref, 2, 24)
    ref[:, 20:26, 5:35] = 100
    scores = spider_scores(_mask(ref), _mask(ref))
    for structure in ("vertebrae", "discs", "canal"):
        assert scores[f"{structure}_dice"] == 1.0
        assert scores[f"{structure}_asd_mm"] == 0.0
    assert scores["vertebrae_detection"] == scores["discs_detection"] == 1.0
    assert (scores["vertebrae_n"], scores["vertebrae_detected"]) == (2, 2)
    assert (scores["discs_n"], scores["discs_detected"]) == (1, 1)


def test_spider_split_vertebra_matches_the_larger_part():
    ref = _empty()
    _cube(ref, 1, 5)  # 1000 voxels, x 5:15
    pred = _empty()
    pred[5:15, 5:15, 5:11] = 7  # 600 voxels of it
    pred[5:15, 5:15, 11:15] = 8  # 400 voxels
    instances = spider_instances(_mask(ref), _mask(pred))
    assert instances["matched_label"].tolist() == [7]
    scores = spider_scores(_mask(ref), _mask(pred))
    assert scores["vertebrae_dice"] == pytest.approx(2 * 600 / (1000 + 600))  # 0.75
    assert scores["vertebrae_detection"] == 1.0


def test_spider_equal_split_goes_to_the_smaller_label():
    ref = _empty()
    _cube(ref, 1, 5)
    pred = _empty()
    pred[5:15, 5:15, 5:10] = 9  # 500 voxels each
    pred[5:15, 5:15, 10:15] = 4
    instances = spider_instances(_mask(ref), _mask(pred))
    assert instances["matched_label"].tolist() == [4]  # np.bincount(...).argmax() in the script
    assert instances["dice"].iloc[0] == pytest.approx(2 * 500 / 1500)


def test_spider_merged_vertebrae_both_match_the_merged_label():
    ref = _empty()
    _cube(ref, 1, 5)  # 1000 voxels each
    _cube(ref, 2, 15)
    pred = _empty()
    pred[5:15, 5:15, 5:25] = 5  # both in one label: 2000 voxels
    instances = spider_instances(_mask(ref), _mask(pred))
    assert instances["matched_label"].tolist() == [5, 5]
    assert instances["dice"].tolist() == pytest.approx([2 * 1000 / 3000] * 2)
    scores = spider_scores(_mask(ref), _mask(pred))
    assert scores["vertebrae_dice"] == pytest.approx(2 / 3)
    assert scores["vertebrae_detection"] == 1.0


def test_spider_missed_disc_goes_to_detection_not_dice():
    ref = _empty()
    _cube(ref, 201, 5)
    _cube(ref, 202, 20)
    pred = _empty()
    _cube(pred, 201, 5)  # 202 not predicted at all
    scores = spider_scores(_mask(ref), _mask(pred))
    assert scores["discs_detection"] == 0.5
    assert scores["discs_dice"] == 1.0  # mean over the detected disc only
    assert scores["discs_asd_mm"] == 0.0
    assert (scores["discs_n"], scores["discs_detected"]) == (2, 1)
    assert math.isnan(scores["vertebrae_dice"]) and math.isnan(scores["vertebrae_detection"])
    assert math.isnan(scores["canal_dice"]) and math.isnan(scores["canal_asd_mm"])
    # The published ASD set: every reference disc, NaN when one has no match
    assert math.isnan(spider_scores(_mask(ref), _mask(pred), asd_over="all")["discs_asd_mm"])


def test_spider_dice_below_threshold_counts_as_missed():
    ref = _empty()
    _cube(ref, 201, 5)  # 1000 voxels
    _cube(ref, 202, 20)
    pred = _empty()
    pred[5:15, 5:7, 5:7] = 201  # 40 voxels, all inside disc 201: Dice 80 / 1040 < 0.1
    _cube(pred, 202, 20)
    instances = spider_instances(_mask(ref), _mask(pred))
    assert instances["matched_label"].tolist() == [201, 202]
    assert instances["dice"].iloc[0] == pytest.approx(80 / 1040)
    scores = spider_scores(_mask(ref), _mask(pred))
    assert scores["discs_detection"] == 0.5
    assert scores["discs_dice"] == 1.0
    assert scores["discs_detected"] == 1


def test_spider_dice_of_exactly_the_threshold_counts_as_detected():
    ref = _empty()
    _cube(ref, 3, 5)  # 1000 voxels
    pred = _empty()
    pred[5:15, 5:7, 5:8] = 3  # 60 voxels inside
    pred[5:15, 20:27, 5:7] = 3  # 140 voxels outside: Dice 2 * 60 / 1200 = 0.1
    scores = spider_scores(_mask(ref), _mask(pred))
    assert scores["vertebrae_dice"] == pytest.approx(0.1)
    assert scores["vertebrae_detection"] == 1.0  # the script misses only Dice < 0.1


def test_spider_shifted_canal_uses_per_axis_spacing():
    # Canal box z 4:12, y 10:20, x 10:30 (8 x 10 x 20 voxels), predicted one slice higher
    # (z 5:13, 3 mm). Dice = 2 * 7 / 16. Each border has 1600 - 6 * 8 * 18 = 736 voxels; per
    # direction: the 200 voxels of the face outside the other box lie 3.0 mm from it; the
    # 8 x 18 inner voxels of the face inside the other box lie 0.5 mm * their in-plane voxel
    # distance to its side walls (sum of min(a, b), a in 1,2,3,4,4,3,2,1, b in 1..9,9..1,
    # = 320, so 160 mm), every other border voxel is shared (0). ASD = (600 + 160) / 736 mm.
    ref = _empty()
    ref[4:12, 10:20, 10:30] = 100
    pred = _empty()
    pred[5:13, 10:20, 10:30] = 100
    scores = spider_scores(_mask(ref), _mask(pred))
    assert scores["canal_dice"] == pytest.approx(14 / 16)
    assert scores["canal_asd_mm"] == pytest.approx(760 / 736, rel=1e-6)
    assert math.isnan(scores["vertebrae_asd_mm"]) and math.isnan(scores["discs_detection"])


def test_spider_partially_visible_vertebrae_count_in_no_structure():
    ref = _empty()
    _cube(ref, 1, 5)
    _cube(ref, 101, 20)
    scores = spider_scores(_mask(ref), _mask(ref))
    assert scores["vertebrae_n"] == 1
    structures = spider_instances(_mask(ref), _mask(ref))["structure"]
    assert structures.iloc[0] == "vertebrae" and pd.isna(structures.iloc[1])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda image: image.SetSpacing((0.5, 0.5, 3.3)), "spacing"),
        (lambda image: image.SetOrigin((0.0, 0.0, 1.0)), "origin"),
        (lambda image: image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, -1)), "direction"),
    ],
)
def test_spider_geometry_mismatch_raises(change, message):
    ref = _empty()
    _cube(ref, 1, 5)
    pred = _mask(ref)
    change(pred)
    with pytest.raises(ValueError, match=message):
        spider_scores(_mask(ref), pred)


def test_spider_size_mismatch_raises():
    ref = _empty()
    with pytest.raises(ValueError, match="size"):
        spider_scores(_mask(ref), _mask(ref[:, :, :39]))


def test_spider_level_agreement_counts_detected_instances_named_right():
    ref = _empty()
    _cube(ref, 1, 2)
    _cube(ref, 201, 13)
    _cube(ref, 2, 24)
    shifted = np.where(ref > 0, ref + 1, 0)  # every level one too high, shapes perfect
    scores = spider_scores(_mask(ref), _mask(shifted))
    assert scores["vertebrae_dice"] == 1.0 and scores["discs_detection"] == 1.0
    assert scores["vertebrae_level_agreement"] == 0.0 and scores["discs_level_agreement"] == 0.0
    partial = np.where(ref == 2, 102, ref)  # a partially visible L4 is still L4
    scores = spider_scores(_mask(ref), _mask(partial))
    assert scores["vertebrae_level_agreement"] == 1.0
    assert (scores["vertebrae_named"], scores["discs_named"]) == (2, 1)
    nothing = spider_scores(_mask(ref), _mask(np.zeros_like(ref)))
    assert math.isnan(nothing["discs_level_agreement"])


def test_spider_summary_is_nan_aware():
    per_case = pd.DataFrame(
        {
            "vertebrae_dice": [0.8, 0.6],
            "discs_dice": [0.5, math.nan],
            "canal_dice": [0.9, 0.7],
            "vertebrae_detection": [1.0, 0.5],
            "discs_detection": [0.5, 0.0],
            "vertebrae_asd_mm": [1.0, 2.0],
            "discs_asd_mm": [math.nan, math.nan],
            "canal_asd_mm": [0.5, 1.5],
        }
    )
    summary = summarise_spider(per_case).set_index("structure")
    assert summary.index.tolist() == ["vertebrae", "discs", "canal"]
    assert summary.loc["vertebrae", "dice_mean"] == pytest.approx(0.7)
    assert summary.loc["vertebrae", "dice_std"] == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert summary.loc["discs", "dice_mean"] == 0.5 and summary.loc["discs", "dice_n"] == 1
    assert math.isnan(summary.loc["discs", "asd_mm_mean"]) and summary.loc["discs", "asd_mm_n"] == 0
    assert summary.loc["discs", "detection_mean"] == pytest.approx(0.25)
    assert math.isnan(summary.loc["canal", "detection_mean"])
    assert summary.loc["canal", "asd_mm_mean"] == pytest.approx(1.0)
    assert (summary["n_cases"] == 2).all()
    with pytest.raises(ValueError, match="canal_dice"):
        summarise_spider(per_case.drop(columns="canal_dice"))


def test_auto_target_spacing_follows_the_anisotropy_rule():
    # thick slices (5 mm median vs 0.5 mm in plane, 20 vs 400 voxels): the 10th percentile
    spacings = np.array([[0.5, 0.5, 4.0], [0.6, 0.6, 5.0], [0.5, 0.5, 6.0]])
    sizes = np.array([[400, 400, 20], [380, 380, 18], [420, 420, 22]])
    expected_slices = np.percentile([4.0, 5.0, 6.0], 10)  # 4.2
    assert auto_target_spacing(spacings, sizes) == pytest.approx((0.5, 0.5, expected_slices))
    # not anisotropic enough: the median per axis
    near = np.array([[1.0, 1.0, 1.2], [0.8, 0.9, 1.0], [1.0, 1.1, 2.0]])
    assert auto_target_spacing(near, sizes) == pytest.approx((1.0, 1.0, 1.2))
    # anisotropic spacing but many slices: the median too
    many = np.array([[400, 400, 300]] * 3)
    assert auto_target_spacing(spacings, many) == pytest.approx((0.5, 0.5, 5.0))


def test_auto_patch_size_fits_the_budget_and_the_network():
    patch = auto_patch_size((300, 180, 24), (8, 8, 8), max_voxels=160 * 160 * 16)
    assert all(v % 8 == 0 for v in patch) and np.prod(patch) <= 160 * 160 * 16
    assert patch == (200, 120, 16)  # the short slice axis keeps most of its size
    assert auto_patch_size((10, 10, 3), (8, 8, 8)) == (16, 16, 8)  # small: rounded up, padded
    assert auto_patch_size((40, 40, 12), (4, 4, 4)) == (40, 40, 12)
    # a stem strided in plane (depth 4): multiples of 16 in plane, 8 across the slices
    strided = auto_patch_size((300, 180, 24), (16, 16, 8), max_voxels=160 * 160 * 16)
    assert [v % f for v, f in zip(strided, (16, 16, 8), strict=True)] == [0, 0, 0]
    assert np.prod(strided) <= 160 * 160 * 16


# ---------------------------------------------------------------- spacing mode: patches


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def contains_label(mask: torch.Tensor, starts: torch.Tensor, patch, label=None) -> list[bool]:
    """Per patch: does it hold any voxel > 0 (or == label)?"""
    _, patches = crop_patches(mask[None].float(), mask, starts, patch)
    hit = patches > 0 if label is None else patches == label
    return hit.flatten(1).any(1).tolist()


# ---------------------------------------------------------------- padding


def test_pad_shapes_and_region_recover_original():
    image = torch.randn(2, 3, 9, 4)
    mask = torch.randint(0, 3, (3, 9, 4), dtype=torch.uint8)
    padded, padded_mask, region = pad_to_patch(image, mask, (6, 5, 7), image_fill=-1.5)
    assert padded.shape == (2, 6, 9, 7)
    assert padded_mask.shape == (6, 9, 7) and padded_mask.dtype == torch.uint8
    assert region == (slice(1, 4), slice(0, 9), slice(1, 5))
    assert torch.equal(padded[(slice(None), *region)], image)
    assert torch.equal(padded_mask[region], mask)
    outside = torch.ones(6, 9, 7, dtype=torch.bool)
    outside[region] = False
    assert (padded[:, outside] == -1.5).all()
    assert (padded_mask[outside] == 0).all()


def test_volume_smaller_than_patch_is_padded_not_skipped():
    image = torch.randn(1, 2, 3, 4)
    padded, mask, region = pad_to_patch(image, None, (8, 8, 8), image_fill=0.0)
    assert padded.shape == (1, 8, 8, 8) and mask is None
    assert torch.equal(padded[(slice(None), *region)], image)
    starts = window_starts(tuple(padded.shape[1:]), (8, 8, 8), 0.5)
    assert starts == [(0, 0, 0)]


def test_pad_is_a_no_op_when_large_enough():
    image, mask = torch.randn(1, 8, 9, 10), torch.zeros(8, 9, 10, dtype=torch.uint8)
    padded, padded_mask, region = pad_to_patch(image, mask, (8, 9, 10), image_fill=0.0)
    assert padded is image and padded_mask is mask
    assert region == (slice(0, 8), slice(0, 9), slice(0, 10))


def test_pad_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask shape"):
        pad_to_patch(torch.zeros(1, 4, 4, 4), torch.zeros(4, 4, 5), (4, 4, 4), 0.0)


# ---------------------------------------------------------------- sampling


def test_foreground_index_per_class_flat_indices():
    mask = torch.zeros(3, 4, 5, dtype=torch.uint8)
    mask[0, 1, 2] = 2
    mask[2, 3, 4] = 1
    mask[1, 0, 0] = 2
    index = foreground_index(mask)
    assert list(index) == [1, 2]
    flat = mask.reshape(-1)
    for label, voxels in index.items():
        assert voxels.dtype == torch.int64
        assert torch.equal(voxels, torch.nonzero(flat == label).reshape(-1))
    assert foreground_index(torch.zeros(2, 2, 2, dtype=torch.uint8)) == {}


def test_foreground_patch_count_expectation_is_the_fraction():
    generator = seeded(1)
    assert foreground_patch_count(4, 1.0, generator) == 4
    assert foreground_patch_count(4, 0.0, generator) == 0
    assert foreground_patch_count(4, 0.5, generator) == 2
    # a batch of one at 0.33 (nnU-Net's rounding never oversamples it): ~33% of batches
    draws = [foreground_patch_count(1, 0.33, generator) for _ in range(4000)]
    assert abs(np.mean(draws) - 0.33) < 4 * math.sqrt(0.33 * 0.67 / 4000)
    draws = [foreground_patch_count(2, 0.33, generator) for _ in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(np.mean(draws) / 2 - 0.33) < 0.03


def test_fraction_one_every_patch_contains_foreground():
    mask = torch.zeros(20, 30, 25, dtype=torch.uint8)
    mask[18:20, 0:2, 23:25] = 1  # a corner
    mask[5, 15, 12] = 2  # a single voxel
    starts = sample_patch_starts(mask, (6, 8, 7), 200, 1.0, seeded(2))
    assert all(contains_label(mask, starts, (6, 8, 7)))


def corner_blob() -> tuple[torch.Tensor, tuple[int, int, int], float]:
    """A 2x2x2 blob at a corner of a 12^3 volume, patch 8^3, and the chance that a uniformly
    placed patch (start uniform over 0..4 per axis) touches it: (2/5)^3."""
    mask = torch.zeros(12, 12, 12, dtype=torch.uint8)
    mask[:2, :2, :2] = 1
    return mask, (8, 8, 8), (2 / 5) ** 3


def test_corner_blob_is_oversampled_at_least_the_fraction():
    mask, patch, _ = corner_blob()
    generator, index = seeded(3), foreground_index(mask)
    hits = []
    for _ in range(500):  # batches of 4 at 0.3: one forced patch, a second in 20% of them
        starts = sample_patch_starts(mask, patch, 4, 0.3, generator, foreground=index)
        hits += contains_label(mask, starts, patch)
    assert np.mean(hits) >= 0.3


def test_fraction_zero_is_uniform_chance():
    mask, patch, chance = corner_blob()
    starts = sample_patch_starts(mask, patch, 4000, 0.0, seeded(4))
    rate = np.mean(contains_label(mask, starts, patch))
    assert abs(rate - chance) < 4 * math.sqrt(chance * (1 - chance) / 4000)


def test_rare_class_is_drawn_as_often_as_a_common_one():
    mask = torch.zeros(16, 40, 40, dtype=torch.uint8)
    mask[:, 5:35, 5:35] = 1  # a big class
    mask[8, 38, 38] = 2  # one voxel of a rare class, far from most of class 1
    starts = sample_patch_starts(mask, (4, 6, 6), 1000, 1.0, seeded(5))
    rate = np.mean(contains_label(mask, starts, (4, 6, 6), label=2))
    assert 0.4 < rate < 0.6


def test_patches_stay_inside_the_volume():
    mask = torch.zeros(9, 17, 13, dtype=torch.uint8)
    mask[0, 0, 0] = mask[8, 16, 12] = mask[0, 16, 0] = 1  # foreground on the edges
    patch = (5, 6, 7)
    starts = sample_patch_starts(mask, patch, 500, 0.5, seeded(6))
    assert starts.shape == (500, 3) and starts.dtype == torch.int64
    assert (starts >= 0).all()
    assert (starts + torch.tensor(patch) <= torch.tensor(mask.shape)).all()
    # a patch exactly the volume's size has one place
    starts = sample_patch_starts(mask, tuple(mask.shape), 10, 0.5, seeded(6))
    assert (starts == 0).all()


def test_no_foreground_means_uniform_patches():
    mask = torch.zeros(10, 10, 10, dtype=torch.uint8)
    starts = sample_patch_starts(mask, (4, 4, 4), 50, 1.0, seeded(7))
    assert starts.shape == (50, 3) and len({tuple(s) for s in starts.tolist()}) > 10


def test_sampling_is_deterministic_given_the_seed():
    mask, patch, _ = corner_blob()
    a = sample_patch_starts(mask, patch, 20, 0.5, seeded(8))
    b = sample_patch_starts(mask, patch, 20, 0.5, seeded(8))
    c = sample_patch_starts(mask, patch, 20, 0.5, seeded(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_rejects_too_small_volume_and_bad_fraction():
    with pytest.raises(ValueError, match="pad_to_patch"):
        sample_patch_starts(torch.zeros(3, 8, 8), (4, 4, 4), 1, 0.5, seeded())
    with pytest.raises(ValueError, match="foreground_fraction"):
        sample_patch_starts(torch.zeros(4, 4, 4), (4, 4, 4), 1, 1.5, seeded())


def test_crop_patches_matches_slicing():
    image = torch.randn(2, 7, 8, 9)
    mask = torch.randint(0, 4, (7, 8, 9), dtype=torch.uint8)
    starts = torch.tensor([[0, 0, 0], [3, 4, 5], [1, 2, 3]])
    images, masks = crop_patches(image, mask, starts, (4, 4, 4))
    assert images.shape == (3, 2, 4, 4, 4) and masks.shape == (3, 4, 4, 4)
    for i, (z, y, x) in enumerate(starts.tolist()):
        assert torch.equal(images[i], image[:, z : z + 4, y : y + 4, x : x + 4])
        assert torch.equal(masks[i], mask[z : z + 4, y : y + 4, x : x + 4])
    with pytest.raises(ValueError, match="leaves the volume"):
        crop_patches(image, mask, torch.tensor([[4, 0, 0]]), (4, 4, 4))


def make_volumes() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Volumes of different sizes whose image equals the mask (so crops can be checked)."""
    volumes = []
    for shape in [(6, 10, 12), (9, 8, 8), (6, 8, 20)]:
        mask = torch.zeros(shape, dtype=torch.uint8)
        mask[-1, -1, -1] = 1
        mask[0, 0, 0] = 2
        volumes.append((mask[None].float(), mask))
    return volumes


def test_sample_batch_shapes_alignment_and_oversampling():
    volumes = make_volumes()
    index = [foreground_index(mask) for _, mask in volumes]
    images, masks = sample_batch(volumes, 5, (6, 8, 8), 1.0, seeded(10), foreground=index)
    assert images.shape == (5, 1, 6, 8, 8) and images.dtype == torch.float32
    assert masks.shape == (5, 6, 8, 8) and masks.dtype == torch.uint8
    assert torch.equal(images[:, 0], masks.float())  # image and mask cut at the same place
    assert (masks > 0).flatten(1).any(1).all()  # fraction 1: all hold foreground


def test_sample_batch_is_deterministic_and_index_optional():
    volumes = make_volumes()
    index = [foreground_index(mask) for _, mask in volumes]
    a = sample_batch(volumes, 4, (6, 8, 8), 0.5, seeded(11), foreground=index)
    b = sample_batch(volumes, 4, (6, 8, 8), 0.5, seeded(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sample_batch_rejects_unpadded_volume():
    volumes = make_volumes()
    with pytest.raises(ValueError, match="pad_to_patch"):
        for seed in range(20):  # until the small volume is drawn
            sample_batch(volumes, 4, (8, 8, 8), 0.5, seeded(seed))


# ---------------------------------------------------------------- Gaussian weights


@pytest.mark.parametrize("patch", [(5, 7, 9), (4, 6, 8), (1, 3, 16)])
def test_gaussian_weights_peak_symmetry_positivity(patch):
    weights = gaussian_weights(patch)
    assert weights.shape == patch and weights.dtype == torch.float32
    assert weights.max() == 1.0 and (weights > 0).all()
    centre = tuple(slice((p - 1) // 2, p // 2 + 1) for p in patch)
    assert (weights[centre] == 1.0).all()
    for axis in range(3):
        assert torch.allclose(weights, weights.flip(axis))
    # decreasing away from the centre along each axis
    line = weights[:, patch[1] // 2, patch[2] // 2]
    assert (line[: (patch[0] + 1) // 2].diff() >= 0).all()


def test_gaussian_weights_match_nnunet_for_odd_sizes():
    ndimage = pytest.importorskip("scipy.ndimage")
    patch = (5, 9, 11)
    delta = np.zeros(patch)
    delta[tuple(p // 2 for p in patch)] = 1
    reference = ndimage.gaussian_filter(delta, [p / 8 for p in patch], 0, mode="constant", cval=0)
    reference /= reference.max()
    assert np.allclose(gaussian_weights(patch).numpy(), reference, rtol=1e-5, atol=1e-7)


def test_gaussian_weights_underflow_replaced_by_smallest_positive():
    weights = gaussian_weights((3, 3, 64), sigma_scale=1 / 64)  # sigma 1 voxel along x
    assert (weights > 0).all()
    line = weights[1, 1]
    assert line[0] == line[-1] == line.min()  # the underflowed tails take the smallest value
    assert (line == line.min()).sum() > 2


# ---------------------------------------------------------------- window placement


def window_coverage(size, patch, starts) -> torch.Tensor:
    """How many windows (patch at each start) cover each voxel of a volume of `size`."""
    covered = torch.zeros(size, dtype=torch.int32)
    for z, y, x in starts:
        covered[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += 1
    return covered


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize(
    "size, patch",
    [((7, 13, 11), (4, 5, 6)), ((16, 160, 160), (16, 160, 160)), ((64, 161, 97), (32, 128, 64))],
)
def test_window_starts_cover_everything(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert (window_coverage(size, patch, starts) > 0).all()
    assert len(set(starts)) == len(starts)
    for axis in range(3):
        values = sorted({s[axis] for s in starts})
        assert values[0] == 0 and values[-1] == size[axis] - patch[axis]
        target = max(1.0, patch[axis] * (1 - overlap))
        assert len(values) == math.ceil((size[axis] - patch[axis]) / target) + 1
        steps = np.diff(values)
        assert (steps >= 1).all() and (steps <= math.ceil(target)).all()


def test_shipped_slab_windows_tile_a_slab_two_by_two():
    """The slab file's patch and overlap: a slab's 300 x 240 mm sagittal plane, 21.6 mm wide
    (24 native slices of 0.9 mm), at the file's spacing (0.94 mm: 319 x 255 voxels) takes
    2 x 2 windows in the plane (3 x 2 at nnU-Net's 0.5), all of it covered, the windows
    overlapping by at least 1/8 of the patch."""
    cfg = load_config(ROOT / "configuration_spider_slabs.txt")
    height, width, slices = patch_size(cfg.training.patch_size, cfg.model.size_multiple)
    patch = (slices, height, width)
    si, ap, lr = target_spacing(cfg.preprocessing.target_spacing)
    size = (round(21.6 / lr), round(300 / si), round(240 / ap))
    starts = window_starts(size, patch, cfg.testing.overlap)
    assert [len({s[axis] for s in starts}) for axis in range(3)] == [2, 2, 2]
    assert [len({s[axis] for s in window_starts(size, patch, 0.5)}) for axis in (1, 2)] == [3, 2]
    assert (window_coverage(size, patch, starts) > 0).all()
    for axis in (1, 2):
        first, second = sorted({s[axis] for s in starts})
        assert first + patch[axis] - second >= patch[axis] / 8


def test_window_starts_nnunet_example():
    # nnU-Net's comment: image 110, patch 64, step 0.5 -> starts 0, 23, 46
    assert window_starts((110, 64, 64), (64, 64, 64), 0.5) == [(0, 0, 0), (23, 0, 0), (46, 0, 0)]


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_window_starts_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        window_starts((8, 8, 8), (4, 4, 4), overlap)


def test_window_starts_rejects_volume_smaller_than_patch():
    with pytest.raises(ValueError, match="pad_to_patch"):
        window_starts((8, 3, 8), (4, 4, 4), 0.5)


# ---------------------------------------------------------------- sliding window


def voxelwise_logits(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) -> (B, 3, ...): logits that depend on each voxel's own value only."""
    return torch.cat([-x, x, 0.5 * x**2 - 1], dim=1)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize(
    "size, patch", [((7, 13, 11), (4, 5, 6)), ((5, 9, 17), (5, 4, 3)), ((6, 6, 6), (6, 6, 6))]
)
def test_sliding_window_equals_whole_volume(size, patch, overlap, batch_size):
    image = torch.randn(1, *size, generator=seeded(12))
    calls = []

    def predict(batch):
        calls.append(len(batch))
        assert batch.shape[1:] == (1, *patch)
        return voxelwise_logits(batch)

    probabilities = sliding_window_probabilities(
        predict, image, patch, overlap, num_classes=3, batch_size=batch_size
    )
    expected = voxelwise_logits(image[None])[0].softmax(0)
    assert probabilities.shape == (3, *size) and probabilities.dtype == torch.float32
    assert torch.allclose(probabilities, expected, atol=1e-5)
    assert torch.allclose(probabilities.sum(0), torch.ones(size), atol=1e-5)
    assert sum(calls) == len(window_starts(size, patch, overlap))
    assert max(calls) <= batch_size


def test_overlap_is_the_weighted_mean_of_windows():
    # two windows along x, starts 0 and 2; each predicts one constant distribution
    image = torch.arange(6.0).reshape(1, 1, 1, 6)
    first, second = torch.tensor([0.9, 0.1]), torch.tensor([0.2, 0.8])

    def predict(batch):
        starts = batch[:, 0, 0, 0, 0]  # the window's first voxel value is its x start
        chosen = torch.stack([first if s == 0 else second for s in starts])
        return chosen.log()[:, :, None, None, None].expand(-1, -1, 1, 1, 4)

    for weights in [None, torch.ones(1, 1, 4)]:
        w = gaussian_weights((1, 1, 4))[0, 0] if weights is None else weights[0, 0]
        probabilities = sliding_window_probabilities(
            predict, image, (1, 1, 4), 0.5, num_classes=2, batch_size=2, weights=weights
        )[:, 0, 0]
        assert torch.allclose(probabilities[:, :2], first[:, None].expand(2, 2))
        assert torch.allclose(probabilities[:, 4:], second[:, None].expand(2, 2))
        for x in (2, 3):  # covered by both: first's voxel x, second's voxel x - 2
            mixed = (w[x] * first + w[x - 2] * second) / (w[x] + w[x - 2])
            assert torch.allclose(probabilities[:, x], mixed, atol=1e-6)


def test_sliding_window_with_padding_round_trip():
    image = torch.randn(1, 3, 10, 7, generator=seeded(13))
    padded, _, region = pad_to_patch(image, None, (4, 8, 8), image_fill=0.0)
    probabilities = sliding_window_probabilities(voxelwise_logits, padded, (4, 8, 8), 0.5, 3)
    cropped = probabilities[(slice(None), *region)]
    assert cropped.shape == (3, 3, 10, 7)
    assert torch.allclose(cropped, voxelwise_logits(image[None])[0].softmax(0), atol=1e-5)


def test_sliding_window_rejects_wrong_logits_shape():
    image = torch.randn(1, 8, 8, 8)
    with pytest.raises(ValueError, match="predict returned"):
        sliding_window_probabilities(lambda b: b, image, (4, 4, 4), 0.5, num_classes=2)


def test_disc_reference_from_components_numbers_from_the_bottom():
    mask = np.zeros((6, 40, 20), np.uint8)  # PIR: (slices, rows superior->inferior, A-P)
    mask[2:4, 5:8, 5:12] = 29  # upper disc
    mask[2:4, 25:28, 5:12] = 29  # lower disc
    mask[0, 0, 0] = 29  # one voxel of label noise
    mask[2:4, 12:20, 5:12] = 76  # a vertebra between them
    image = sitk.GetImageFromArray(mask)
    image.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))
    image.SetSpacing((1.0, 1.0, 2.0))
    reference = sitk.GetArrayFromImage(disc_components_reference(image, (29,), min_mm3=10))
    assert set(np.unique(reference).tolist()) == {0, 201, 202}
    assert (reference[2:4, 25:28, 5:12] == 201).all() and (reference[2:4, 5:8, 5:12] == 202).all()
    assert reference[0, 0, 0] == 0


# ---------------------------------------------------------------- split, training, testing


def test_patient_split_keeps_patients_together():
    cases = pd.DataFrame(
        {
            "case_id": [f"{p}_{s}" for p in range(20) for s in ("t1", "t2")],
            "patient_id": [str(p) for p in range(20) for _ in range(2)],
        }
    )
    split = patient_split(cases, 0.2, 0.2, seed=3)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    counts = split.groupby("split")["patient_id"].nunique()
    assert counts.to_dict() == {"test": 4, "train": 12, "val": 4}
    assert split.equals(patient_split(cases, 0.2, 0.2, seed=3))


def test_end_to_end_run_writes_every_output(trained_run):
    run = trained_run / "run"
    for name in (
        "run_config.json",
        "splits.csv",
        "metrics_epochs.csv",
        "loss.png",
        "accuracy.png",
        "f1.png",
        "dice.png",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "test_metrics.csv",
        "test_summary.csv",
    ):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "metrics_epochs.csv")
    assert history["epoch"].tolist() == [1, 2]
    for column in (
        "train_loss",
        "val_loss",
        "train_accuracy",
        "val_f1_macro",
        "val_dice_vertebrae",
        "val_dice_intervertebral_discs",
        "val_dice_spinal_canal",
    ):
        assert history[column].notna().all(), column
    split = pd.read_csv(run / "splits.csv", dtype=str)
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    test_ids = sorted(split.loc[split["split"] == "test", "case_id"])
    masks = [p.stem for p in (run / "predictions").glob("*.mha") if "_instances" not in p.stem]
    assert sorted(masks) == test_ids
    metrics = pd.read_csv(run / "test_metrics.csv")
    assert list(metrics.columns) == [
        "case_id",
        "class",
        "dice",
        "hd95_mm",
        "assd_mm",
        "reference_voxels",
        "predicted_voxels",
        "reference_outside_crop",
    ]
    assert len(metrics) == 3 * len(test_ids)
    assert metrics["reference_outside_crop"].between(0, 1).all()
    assert (metrics["reference_voxels"] > 0).all()
    summary = pd.read_csv(run / "test_summary.csv")
    assert summary["class"].tolist() == ["vertebrae", "intervertebral_discs", "spinal_canal"]
    assert list(summary.columns) == [
        "class",
        "n",
        "dice_mean",
        "dice_std",
        "hd95_mm_mean",
        "n_hd95",
        "assd_mm_mean",
        "n_assd",
        "n_missed",
        "n_false",
    ]
    # the instance step: files beside each mask, scored by the SPIDER rules
    for case_id in test_ids:
        assert (run / "predictions" / f"{case_id}_instances.mha").is_file()
        table = pd.read_csv(run / "predictions" / f"{case_id}_instances.csv")
        assert list(table.columns[:3]) == ["label", "structure", "level"]
    instance_metrics = pd.read_csv(run / "test_instance_metrics.csv", dtype={"case_id": str})
    assert sorted(instance_metrics["case_id"]) == test_ids
    assert {"vertebrae_dice", "discs_detection", "canal_dice"} <= set(instance_metrics.columns)
    instance_summary = pd.read_csv(run / "test_instance_summary.csv")
    assert instance_summary["structure"].tolist() == ["vertebrae", "discs", "canal"]
    # the checkpoint carries the plan its data were made with
    plan = json.loads((trained_run / "pre" / "plan.json").read_text())
    assert plan["grid"] == [32, 16, 8] and plan["mode"] == "grid"
    assert load_checkpoint(run / "checkpoints" / "best.pt")["plan"] == plan
    assert len(list((run / "figures").glob("*.png"))) == 1


def test_external_labelled_folder_replaces_the_test_split(tmp_path, tiny_raw):
    import preprocess_script
    import trainandtest_script

    external = tmp_path / "external"
    generate_dataset(external, n_patients=2, seed=9, small=True)
    cfg = write_config(
        tmp_path,
        tiny_raw,
        paths={"test_raw_dir": external},
        training={"epochs": 1},
        testing={"figures": 0},
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert not (tmp_path / "pre" / "external_test").exists()  # tested from its raw scans
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    split = pd.read_csv(tmp_path / "run" / "splits.csv", dtype=str)
    assert "test" not in set(split["split"])  # every local patient trains or validates
    metrics = pd.read_csv(tmp_path / "run" / "test_metrics.csv", dtype={"case_id": str})
    assert sorted(metrics["case_id"].unique()) == ["1_t1", "1_t2", "2_t1", "2_t2"]
    prediction = sitk.ReadImage(str(tmp_path / "run" / "predictions" / "2_t2.mha"))
    assert prediction.GetSize() == sitk.ReadImage(str(external / "images" / "2_t2.mha")).GetSize()


def test_instances_lie_on_the_predicted_classes(trained_run):
    """Each instance label sits on voxels of its own predicted class (vertebrae 1-25/101-125 on
    class 1, discs on 2, the canal on 3): the instance step relabels, it never invents."""
    run = trained_run / "run"
    for instance_path in (run / "predictions").glob("*_instances.mha"):
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(instance_path)))
        classes = sitk.GetArrayFromImage(
            sitk.ReadImage(str(instance_path).replace("_instances.mha", ".mha"))
        )
        assert set(np.unique(classes).tolist()) <= {0, 1, 2, 3}
        expected = np.zeros_like(classes)
        expected[(instances >= 1) & (instances <= 25)] = 1
        expected[(instances >= 101) & (instances <= 125)] = 1
        expected[instances >= 201] = 2
        expected[instances == 100] = 3
        labelled = instances > 0
        assert np.array_equal(expected[labelled], classes[labelled])


def test_predict_script_segments_scans_in_their_geometry(trained_run, tiny_raw, tmp_path):
    import predict_script

    scans = sorted((tiny_raw / "images").glob("*.mha"))[:2]
    bad = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(bad))
    checkpoint = trained_run / "run" / "checkpoints" / "best.pt"
    out = tmp_path / "out"
    status = predict_script.main(
        ["--checkpoint", str(checkpoint), *map(str, scans), str(bad), "--output-dir", str(out)]
    )
    assert status == 1  # the 2-D input failed, the rest were written
    for scan_path in scans:
        scan = sitk.ReadImage(str(scan_path))
        mask = sitk.ReadImage(str(out / scan_path.name))
        assert mask.GetSize() == scan.GetSize()
        assert np.allclose(mask.GetDirection(), scan.GetDirection())
        assert np.allclose(mask.GetOrigin(), scan.GetOrigin())
    assert not (out / "flat.mha").exists()
    assert pd.read_csv(out / "classes.csv")["class"].tolist()[0] == "background"


def test_predict_script_instances_on_a_raw_scan(trained_run, tiny_raw, tmp_path):
    import predict_script

    scan_path = sorted((tiny_raw / "images").glob("*.mha"))[0]
    checkpoint = trained_run / "run" / "checkpoints" / "best.pt"
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), str(scan_path), "--output-dir", str(out)]
    assert predict_script.main(args + ["--instances"]) == 0
    stem = scan_path.name.removesuffix(".mha")
    instances = sitk.ReadImage(str(out / f"{stem}_instances.mha"))
    classes = sitk.ReadImage(str(out / f"{stem}.mha"))
    assert instances.GetSize() == classes.GetSize()
    assert np.allclose(instances.GetDirection(), classes.GetDirection())
    labels = set(np.unique(sitk.GetArrayViewFromImage(instances)).tolist()) - {0}
    table = pd.read_csv(out / f"{stem}_instances.csv")
    assert set(table["label"]) == labels
    assert all(structure_of(v) or 100 <= v < 126 for v in labels)
    # every instance voxel is a predicted foreground voxel
    assert not np.any(
        (sitk.GetArrayViewFromImage(instances) > 0) & (sitk.GetArrayViewFromImage(classes) == 0)
    )
    # the report: measurements per level, quality flags (with confidence), picture, summary
    assert {"disc_height_mm", "body_height_mm", "canal_ap_mm", "notes"} <= set(table.columns)
    qc = json.loads((out / f"{stem}_qc.json").read_text())
    assert set(qc) == {"ok", "flags"} and qc["ok"] == (not qc["flags"])
    assert (out / f"{stem}_levels.png").stat().st_size > 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary["scan"].tolist() == [stem]
    assert summary.loc[0, "discs"] == (table["structure"] == "disc").sum()


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> None:
    """One 2-D DICOM file per slice, with the tags the series reader rebuilds 3-D from."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0:7:3], *direction[1:8:3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", series_uid),
            ("0020|0013", str(k + 1)),
            ("0020|0032", "\\".join(f"{v:.6f}" for v in position)),
            ("0020|0037", orientation),
            ("0018|0050", f"{image.GetSpacing()[2]:.6f}"),
            ("0028|0030", f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}"),
        ):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_predict_script_reads_a_dicom_series_folder(trained_run, tiny_raw, tmp_path, capsys):
    import predict_script

    scan = sitk.ReadImage(str(sorted((tiny_raw / "images").glob("*.mha"))[0]))
    scan = sitk.Cast(sitk.Clamp(scan, lowerBound=-1000, upperBound=4000), sitk.sitkInt16)
    _write_dicom_series(scan, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.2")
    read = predict_script.read_input(tmp_path / "series")
    assert read.GetSize() == scan.GetSize()
    assert np.allclose(read.GetSpacing(), scan.GetSpacing(), atol=1e-4)
    assert np.allclose(read.GetOrigin(), scan.GetOrigin(), atol=1e-3)
    assert np.allclose(read.GetDirection(), scan.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(scan))
    sitk.WriteImage(scan, str(tmp_path / "same.mha"))
    checkpoint = str(trained_run / "run" / "checkpoints" / "best.pt")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "series"), str(tmp_path / "same.mha")]
    assert predict_script.main(["--checkpoint", checkpoint, *inputs, "--output-dir", str(out)]) == 0
    from_dicom = sitk.ReadImage(str(out / "series.mha"))
    assert np.allclose(from_dicom.GetOrigin(), scan.GetOrigin(), atol=1e-3)
    assert np.array_equal(
        sitk.GetArrayFromImage(from_dicom),
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "same.mha"))),
    )
    # a folder with two series, and one with none, are errors that name the folder
    _write_dicom_series(scan, tmp_path / "two", "1.2.826.0.1.3680043.2.1125.3")
    _write_dicom_series(scan[:, :, :3], tmp_path / "two" / "b", "1.2.826.0.1.3680043.2.1125.4")
    for path in (tmp_path / "two" / "b").iterdir():
        path.rename(tmp_path / "two" / f"b_{path.name}")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    bad = [str(tmp_path / "two"), str(tmp_path / "empty")]
    assert predict_script.main(["--checkpoint", checkpoint, *bad, "--output-dir", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"folder {tmp_path / 'two'} holds 2 DICOM series" in text
    assert f"folder {tmp_path / 'empty'} holds no DICOM series" in text


def test_checkpoint_rebuilds_the_model_alone(trained_run, tiny_raw):
    state = load_checkpoint(trained_run / "run" / "checkpoints" / "best.pt")
    predictor = Predictor.from_checkpoint(state, torch.device("cpu"))
    assert [m.arguments for m in predictor.models] == [UNet3D(**state["model_args"]).arguments]
    assert predictor.plan["grid"] == [32, 16, 8]
    scan = sitk.ReadImage(str(sorted((tiny_raw / "images").glob("*.mha"))[0]))
    segmentation = segment_scan(predictor, scan)
    assert segmentation.classes.GetSize() == scan.GetSize()
    assert state["config"]["training"]["epochs"] == 2 and state["epoch"] == 2


def test_test_loop_and_predict_script_write_voxel_identical_masks(trained_run, tiny_raw, tmp_path):
    import predict_script

    run = trained_run / "run"
    split = pd.read_csv(run / "splits.csv", dtype=str)
    case_id = split.loc[split["split"] == "test", "case_id"].iloc[0]
    out = tmp_path / "out"
    status = predict_script.main(
        [
            "--checkpoint",
            str(run / "checkpoints" / "best.pt"),
            str(tiny_raw / "images" / f"{case_id}.mha"),
            "--output-dir",
            str(out),
        ]
    )
    assert status == 0
    tested = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "predictions" / f"{case_id}.mha")))
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_id}.mha")))
    assert tested.shape == predicted.shape and np.count_nonzero(tested) > 0
    assert np.array_equal(tested, predicted)


class _Oracle(torch.nn.Module):
    """A stand-in network that returns fixed logits (1, C, D, H, W) whatever its input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[2:] == self.logits.shape[2:]
        return self.logits


def test_a_known_mask_goes_through_the_real_prediction_path(tmp_path):
    """Logits that encode the true mask on the label-free grid come back onto the raw (LPS)
    scan through segment_scan: what the path does to content, not only to geometry."""
    files = _case(tmp_path, "LPS", seed=2)
    scan, image, labels = load_case(files, SPIDER_LOOKUP)
    settings = PreprocessingConfig(grid=(128, 64, 16))
    grid = to_grid(image, None, settings)  # the crop a user's scan gets: no label seen
    truth = sitk.Resample(labels, grid.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    one_hot = np.stack([sitk.GetArrayFromImage(truth) == c for c in range(4)])
    logits = torch.from_numpy(one_hot.astype(np.float32) * 20)[None]
    predictor = Predictor(
        (_Oracle(logits),), make_plan(settings, SPIDER_LABELS), torch.device("cpu"), "fp32"
    )
    result = segment_scan(predictor, scan)
    assert result.crop_index == grid.crop_index and result.crop_size == grid.crop_size
    predicted = sitk.GetArrayFromImage(result.classes)
    reference = map_labels(
        sitk.GetArrayFromImage(sitk.ReadImage(str(files.mask_path))), SPIDER_LOOKUP
    )
    assert predicted.shape == reference.shape
    for c in (1, 2, 3):  # the grid's own resolution caps this at about 0.95
        assert dice(predicted == c, reference == c) >= 0.93, c
    # a wrong way back (no reorientation, say) would not overlap the reference
    assert dice(predicted[::-1] == 1, reference == 1) < 0.5


def test_reference_outside_the_crop_is_measured():
    reference = np.zeros((4, 10, 10), np.uint8)
    reference[1:3, 2:8, 2:6] = 1  # 48 voxels of class 1
    reference[0, 0, 0] = 2
    image = sitk.GetImageFromArray(reference)
    image.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))  # PIR, as the crop box is indexed
    index, size = (2, 2, 0), (2, 6, 4)  # x 2..4 of 2..6: half of class 1
    assert outside_crop_fraction(image, index, size, 1) == pytest.approx(0.5)
    assert outside_crop_fraction(image, index, size, 2) == 1.0
    assert outside_crop_fraction(image, index, size, 3) == 0.0  # absent: nothing lost
    assert outside_crop_fraction(image, (0, 0, 0), (10, 10, 4), 1) == 0.0


def test_summary_counts_what_the_means_leave_out():
    nan = float("nan")
    metrics = pd.DataFrame(
        {
            "case_id": ["a", "a", "b", "b", "c", "c"],
            "class": ["vertebrae", "discs"] * 3,
            "dice": [0.9, 0.0, 0.8, 0.0, 0.7, 1.0],
            "hd95_mm": [2.0, nan, 4.0, nan, 6.0, 0.0],
            "assd_mm": [1.0, nan, 2.0, nan, 3.0, 0.0],
            "reference_voxels": [10, 5, 10, 0, 10, 0],
            "predicted_voxels": [10, 0, 10, 7, 10, 0],
        }
    )
    summary = summarise(metrics, ("background", "vertebrae", "discs")).set_index("class")
    assert summary.loc["vertebrae", "hd95_mm_mean"] == pytest.approx(4.0)
    assert summary.loc["vertebrae", ["n", "n_hd95", "n_assd", "n_missed", "n_false"]].tolist() == [
        3,
        3,
        3,
        0,
        0,
    ]
    # discs: case a missed, case b a false positive, case c both empty (Dice 1, distance 0)
    assert summary.loc["discs", ["n", "n_hd95", "n_missed", "n_false"]].tolist() == [3, 1, 1, 1]


@pytest.mark.skipif(
    not bf16_supported(torch.device("cpu")),
    reason="no native bf16 on this CPU (AVX512-BF16/AMX): auto is fp32, compared with itself",
)
def test_bf16_and_fp32_predictions_agree(trained_run):
    from test_unet import model_from_checkpoint, precision_from_checkpoint, predict_probabilities

    state = load_checkpoint(trained_run / "run" / "checkpoints" / "best.pt")
    assert precision_from_checkpoint(state) == "auto"
    cpu = torch.device("cpu")
    model = model_from_checkpoint(state, cpu)
    grid_image = sitk.ReadImage(str(sorted((trained_run / "pre" / "images").glob("*.mha"))[0]))
    fp32 = predict_probabilities(model, grid_image, cpu, "fp32")
    auto = predict_probabilities(model, grid_image, cpu, "auto")  # bf16 where native
    assert fp32.shape == auto.shape == (4, 8, 32, 16)
    assert np.allclose(fp32.sum(0), 1, atol=1e-5)
    assert np.abs(fp32 - auto).max() < 0.05
    assert (fp32.argmax(0) == auto.argmax(0)).mean() > 0.98


SPACING_MODE = {
    "preprocessing": {"mode": "spacing", "target_spacing": "2, 2, 5"},
    "training": {"patch_size": "32, 32, 16", "steps_per_epoch": 2},
}


@pytest.mark.parametrize("mode", ["grid", "spacing"])
def test_resume_continues_exactly_from_the_last_epoch(tmp_path, tiny_raw, monkeypatch, mode):
    import preprocess_script
    import trainandtest_script

    torch_load, mapped_to = torch.load, []

    def spy(*args, **kwargs):  # resume must load to the CPU, whatever the device
        mapped_to.append(kwargs.get("map_location"))
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)

    extra = SPACING_MODE if mode == "spacing" else {"training": {}}
    cfg = write_config(
        tmp_path,
        tiny_raw,
        preprocessing=extra.get("preprocessing", {}),
        testing={"figures": 0},
        training={"scheduler": "none", "warmup_epochs": 0, **extra["training"]},
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    mapped_to.clear()
    assert trainandtest_script.main(["--config", str(cfg), "--set", "training.epochs=3"]) == 0
    assert mapped_to and set(mapped_to) == {"cpu"}
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == 3
    assert resumed["rng"][0]["torch"].device.type == "cpu"
    assert pd.read_csv(tmp_path / "run" / "metrics_epochs.csv")["epoch"].tolist() == [1, 2, 3]
    straight = [
        "--config",
        str(cfg),
        "--set",
        "training.epochs=3",
        "--set",
        f"paths.output_dir={tmp_path / 'straight'}",
    ]
    assert trainandtest_script.main(straight) == 0
    reference = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for key, value in reference["model"].items():
        assert torch.allclose(value, resumed["model"][key], atol=1e-5), key


def test_training_refuses_data_preprocessed_with_another_grid(tmp_path, tiny_raw, capsys):
    import preprocess_script
    import trainandtest_script

    cfg = write_config(tmp_path, tiny_raw)
    other = ["--config", str(cfg), "--set", "preprocessing.grid=64, 32, 8"]
    assert preprocess_script.main(other) == 0
    capsys.readouterr()
    assert trainandtest_script.main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "grid: preprocessed with [64, 32, 8], the configuration says [32, 16, 8]" in err
    assert not (tmp_path / "run").exists()
    assert trainandtest_script.main(other + ["--set", "training.epochs=1"]) == 0


def test_resume_refuses_changed_training_settings(trained_run, capsys):
    import trainandtest_script
    from trainandtest_script import changed_settings

    record = json.loads((trained_run / "run" / "run_config.json").read_text())

    def changed(**training) -> list[str]:
        new = json.loads(json.dumps(record))
        new["training"].update(training)
        return changed_settings(record, new)

    assert changed(threads=2, loader_workers=3, device="cpu", resume=False) == []
    assert changed(learning_rate=0.5) == ["[training] learning_rate (0.001 -> 0.5)"]
    assert changed(epochs=4) == ["[training] epochs (2 -> 4)"]  # scheduler = cosine
    assert changed(epochs=4, scheduler="none") == ["[training] scheduler ('cosine' -> 'none')"]
    cfg = str(trained_run / "config.txt")
    capsys.readouterr()
    assert trainandtest_script.main(["--config", cfg, "--set", "training.epochs=4"]) == 1
    err = capsys.readouterr().err
    assert "[training] epochs (2 -> 4)" in err and "new run" in err
    assert load_checkpoint(trained_run / "run" / "checkpoints" / "last.pt")["epoch"] == 2


def test_spacing_mode_end_to_end_on_synthetic_data(tmp_path, tiny_raw):
    """Spacing mode: one target spacing (sizes follow), masks per class onto the grid and in
    augmentation (as the slab file), patch training, sliding-window testing with flip TTA on
    a half-voxel shifted grid and small-component removal; a case smaller than a patch is
    padded."""
    import predict_script
    import preprocess_script
    import trainandtest_script

    cfg = write_config(
        tmp_path,
        tiny_raw,
        preprocessing={
            "mode": "spacing",
            "target_spacing": "2, 2, 5",
            "mask_interpolation": "linear",
        },
        training={
            "epochs": 2,
            "patch_size": "32, 32, 16",
            "steps_per_epoch": 2,
            "aug_mask_interpolation": "linear",
        },
        testing={
            "figures": 0,
            "overlap": 0.5,
            "tta_flip": "true",
            "tta_shift": "true",
            "min_component_mm3": 20,
        },
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    plan = json.loads((tmp_path / "pre" / "plan.json").read_text())
    assert plan["mode"] == "spacing" and "grid" not in plan
    assert plan["spacing_mm"] == [2.0, 2.0, 5.0] and plan["patch_size"] == [32, 32, 16]
    assert plan["mask_interpolation"] == "linear"
    sizes = {
        sitk.ReadImage(str(path)).GetSize() for path in (tmp_path / "pre" / "images").glob("*.mha")
    }
    assert len(sizes) > 1  # every case keeps its own size
    assert min(size[2] for size in sizes) < 16  # fewer slices than the patch: padded, not skipped
    for path in (tmp_path / "pre" / "images").glob("*.mha"):
        spacing = sitk.ReadImage(str(path)).GetSpacing()  # x = A-P, y = S-I, z = slices
        assert np.allclose(spacing, (2, 2, 5), rtol=0.15), spacing
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    run = tmp_path / "run"
    history = pd.read_csv(run / "metrics_epochs.csv")
    assert history["val_dice_mean"].notna().all()
    metrics = pd.read_csv(run / "test_metrics.csv", dtype={"case_id": str})
    case_id = metrics["case_id"].iloc[0]
    scan_path = tiny_raw / "images" / f"{case_id}.mha"
    predicted = sitk.ReadImage(str(run / "predictions" / f"{case_id}.mha"))
    assert predicted.GetSize() == sitk.ReadImage(str(scan_path)).GetSize()
    out = tmp_path / "out"
    checkpoint = str(run / "checkpoints" / "best.pt")
    assert (
        predict_script.main(["--checkpoint", checkpoint, str(scan_path), "--output-dir", str(out)])
        == 0
    )
    assert np.array_equal(
        sitk.GetArrayFromImage(predicted),
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_id}.mha"))),
    )


# ---------------------------------------------------------------- bad input (never lose data)


def _write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def make_bad_corpus(raw: Path) -> dict[str, str]:
    """A SPIDER-layout folder with one good case and one case per fault.

    Returns {case_id: the reason text expected in manifest.csv}.
    """
    images, mask = synth_patient(np.random.default_rng(11), small=True)
    image = images["t1"]
    write_case(raw, "1", "t1", image, mask, "PIR")
    good_image = raw / "images" / "1_t1.mha"
    good_mask = raw / "masks" / "1_t1.mha"

    def case(name: str, image_item, mask_item) -> None:
        for folder, item in (("images", image_item), ("masks", mask_item)):
            if item is not None:
                _write(item, raw / folder / f"{name}.mha")

    expected = {}
    sitk.WriteImage(image, str(raw / "images" / "2_t1.mha"), False)
    data = (raw / "images" / "2_t1.mha").read_bytes()
    (raw / "images" / "2_t1.mha").write_bytes(data[: len(data) // 2])
    shutil.copy(good_mask, raw / "masks" / "2_t1.mha")
    expected["2_t1"] = "unreadable"
    (raw / "images" / "3_t1.mha").write_bytes(b"")
    shutil.copy(good_mask, raw / "masks" / "3_t1.mha")
    expected["3_t1"] = "unreadable"
    case("4_t1", image, None)
    expected["4_t1"] = "has no mask"
    case("5_t1", None, mask)
    expected["5_t1"] = "has no image"
    case("6_t1", image, sitk.Crop(mask, [0, 0, 0], [1, 0, 0]))
    expected["6_t1"] = "image size"
    for number, (change, reason) in enumerate(
        [
            (lambda m: m.SetSpacing([s * 1.5 for s in m.GetSpacing()]), "spacing"),
            (lambda m: m.SetOrigin([o + 25 for o in m.GetOrigin()]), "origin"),
            (lambda m: m.SetDirection(sitk.DICOMOrient(m, "LPS").GetDirection()), "directions"),
        ],
        start=7,
    ):
        moved = sitk.Image(mask)
        change(moved)
        case(f"{number}_t1", image, moved)
        expected[f"{number}_t1"] = reason
    case("10_t1", sitk.Image(16, 16, sitk.sitkFloat32), sitk.Image(16, 16, sitk.sitkUInt8))
    expected["10_t1"] = "is 2-D"
    case("11_t1", sitk.Image([8, 8, 8, 2], sitk.sitkFloat32), mask)
    expected["11_t1"] = "is 4-D"
    rgb = sitk.Image(image.GetSize(), sitk.sitkVectorUInt8, 3)
    rgb.CopyInformation(image)
    case("12_t1", rgb, mask)
    expected["12_t1"] = "components per pixel"
    for number, bad_value in ((13, np.nan), (14, np.inf)):
        array = sitk.GetArrayFromImage(image)
        array[2, 3, 4] = bad_value
        broken = sitk.GetImageFromArray(array)
        broken.CopyInformation(image)
        case(f"{number}_t1", broken, mask)
        expected[f"{number}_t1"] = "NaN/inf"
    case("15_t1", image * 0 + 7, mask)
    expected["15_t1"] = "constant"
    case("16_t1", image, mask * 0)
    expected["16_t1"] = "is empty"
    outside = sitk.Image(mask)
    outside[1, 1, 1] = 7000
    case("17_t1", image, outside)
    expected["17_t1"] = "not in the [labels] map"
    case("badname", image, mask)
    expected["badname"] = "does not match"
    case("18_t1", image, mask)
    _write(image, raw / "images" / "18_t1.nii.gz")
    expected["18_t1"] = "duplicate case id"
    no_body = np.full(sitk.GetArrayFromImage(image).shape, -1000, np.float32)
    no_body[5, 10, 10], no_body[5, 10, 11] = 100, 200
    speck = sitk.GetImageFromArray(no_body)
    speck.CopyInformation(image)
    case("19_t1", speck, mask)
    expected["19_t1"] = "crop would be empty"
    (raw / "overview.csv").write_text("new_file_name\n1_t1\n")
    (raw / "notes.txt").write_text("not an image: ignored")
    assert good_image.is_file()
    return expected


def test_bad_cases_are_skipped_with_reasons_and_raw_data_untouched(tmp_path, capsys):
    import preprocess_script

    raw = tmp_path / "raw"
    expected = make_bad_corpus(raw)
    before = digest(raw)
    cfg = write_config(tmp_path, raw, data={"sequences": "t1"})
    assert preprocess_script.main(["--config", str(cfg)]) == preprocess_script.EXIT_SKIPPED
    out = capsys.readouterr().out
    assert f"1 cases ok (0 up to date, reused), {len(expected)} skipped" in out
    manifest = pd.read_csv(tmp_path / "pre" / "manifest.csv", keep_default_na=False)
    rows = manifest.set_index("case_id")
    assert rows.loc["1_t1", "status"] == "ok"
    for case_id, reason in expected.items():
        assert rows.loc[case_id, "status"] == "skipped", case_id
        assert reason in rows.loc[case_id, "reason"], (case_id, rows.loc[case_id, "reason"])
    assert digest(raw) == before


def test_outputs_inside_raw_dir_are_refused_before_writing(tmp_path, tiny_raw, capsys):
    import preprocess_script

    before = digest(tiny_raw)
    cfg = write_config(tmp_path, tiny_raw, paths={"preprocessed_dir": tiny_raw / "pre"})
    assert preprocess_script.main(["--config", str(cfg)]) == 1
    assert "lies inside raw_dir" in capsys.readouterr().err
    assert digest(tiny_raw) == before


# ---------------------------------------------------------------- interrupted runs


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(script: str, cfg: Path, *extra: str) -> subprocess.Popen:
    """The driver in a child process, with SIGINT at its default: a suite started from a
    non-interactive background job (nohup, `trap "" INT`) hands its children SIGINT ignored,
    and a Python started so never installs its KeyboardInterrupt handler."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), "--config", str(cfg), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=_default_sigint,
    )


def _wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_killed_preprocessing_resumes_without_redoing_work(tmp_path, tiny_raw):
    cfg = write_config(tmp_path, tiny_raw)
    records = tmp_path / "pre" / "records"
    process = _start("preprocess_script.py", cfg)
    _wait_for(lambda: records.is_dir() and len(list(records.glob("*.json"))) >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(records.glob("*.json")))
    rerun = _start("preprocess_script.py", cfg)
    out, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, out
    reused = int(out.split("cases ok (")[1].split(" up to date")[0])
    assert reused >= done >= 3
    assert "12 cases ok" in out
    assert not list((tmp_path / "pre").rglob(".spineseg.*.tmp*"))
    for path in (tmp_path / "pre" / "images").glob("*.mha"):
        assert sitk.ReadImage(str(path)).GetSize() == (16, 32, 8)


def test_killed_training_resumes_from_last_checkpoint(tmp_path, tiny_raw):
    import preprocess_script

    cfg = write_config(tmp_path, tiny_raw, training={"epochs": 6}, testing={"figures": 0})
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    process = _start("trainandtest_script.py", cfg)
    _wait_for(last.is_file, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(last)["epoch"]
    rerun = _start("trainandtest_script.py", cfg)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "\r" not in out + err  # not a terminal: epoch lines, no progress bars
    assert killed_at < 6, "killed after the last epoch: nothing was resumed"
    assert f"resuming {tmp_path / 'run'} after epoch {killed_at}" in out + err
    epochs = pd.read_csv(tmp_path / "run" / "metrics_epochs.csv")["epoch"].tolist()
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "test_summary.csv").is_file()


def test_ctrl_c_exits_cleanly_with_a_message(tmp_path, tiny_raw):
    import preprocess_script

    cfg = write_config(tmp_path, tiny_raw, training={"epochs": 50})
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    process = _start("trainandtest_script.py", cfg)
    _wait_for(last.is_file, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    saved = load_checkpoint(last)["epoch"]
    history = pd.read_csv(tmp_path / "run" / "metrics_epochs.csv")["epoch"].tolist()
    assert saved < 50 and history == list(range(1, saved + 1))  # stopped, with what it saved
    assert not (tmp_path / "run" / "test_summary.csv").exists()  # no test after an interrupt


# ---------------------------------------------------------------- unsafe files, numeric faults


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path, capsys, trained_run):
    import predict_script

    unsafe = tmp_path / "unsafe.pt"
    state = load_checkpoint(trained_run / "run" / "checkpoints" / "best.pt")
    torch.save(state | {"extra": _Payload()}, unsafe)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(unsafe)
    assert (
        predict_script.main(
            [
                "--checkpoint",
                str(unsafe),
                str(tmp_path / "scan.mha"),
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "refused" in captured.err
    assert "arbitrary code ran" not in captured.out + captured.err


def test_existing_run_folder_is_never_silently_overwritten(tmp_path, trained_run, capsys):
    import trainandtest_script

    cfg = trained_run / "config.txt"
    checkpoint = trained_run / "run" / "checkpoints" / "best.pt"
    before = checkpoint.read_bytes()
    assert trainandtest_script.main(["--config", str(cfg), "--set", "model.base_channels=6"]) == 1
    assert "[model] base_channels" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    assert (
        trainandtest_script.main(
            [
                "--config",
                str(cfg),
                "--set",
                f"paths.output_dir={foreign}",
                "--set",
                "training.overwrite=true",
            ]
        )
        == 1
    )
    assert "not a run folder" in capsys.readouterr().err
    assert (foreign / "thesis.docx").read_text() == "precious"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, trained_run):
    from config import ModelConfig, TrainingConfig

    rows = read_manifest(trained_run / "pre").iloc[:4].copy()
    settings = TrainingConfig(epochs=1, batch_size=2, threads=1, augment=False)
    model = ModelConfig(base_channels=4, depth=3)
    names = ("background", "vertebrae", "intervertebral_discs", "spinal_canal")
    run = tmp_path / "run"
    fit(rows, rows.iloc[:0], run, model, settings, names, {}, {}, progress=False)
    broken = tmp_path / "nan.mha"
    image = sitk.ReadImage(str(rows.iloc[0]["out_image"]))
    sitk.WriteImage(image * float("nan"), str(broken))
    rows.iloc[0, rows.columns.get_loc("out_image")] = str(broken)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch \d"):
        fit(
            rows,
            rows.iloc[:0],
            run,
            model,
            TrainingConfig(epochs=2, batch_size=2, threads=1, augment=False),
            names,
            {},
            {},
            progress=False,
        )
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1


# ---------------------------------------------------------- torchrun (DistributedDataParallel)


def test_torchrun_two_processes_match_a_single_process_run(tmp_path, tiny_raw):
    import preprocess_script

    # fp32: with bf16 autocast (a CPU with AVX512-BF16) the reduction order of 1 and 2
    # processes alone moves the validation scores by more than the tolerance
    cfg = write_config(
        tmp_path,
        tiny_raw,
        training={"augment": "false", "precision": "fp32"},
        testing={"figures": 0},
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    single = subprocess.run(
        [
            sys.executable,
            str(ROOT / "trainandtest_script.py"),
            "--config",
            str(cfg),
            "--set",
            f"paths.output_dir={tmp_path / 'single'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "trainandtest_script.py"),
            "--config",
            str(cfg),
            "--set",
            f"paths.output_dir={tmp_path / 'ddp'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert double.returncode == 0, double.stderr
    # rank 0 alone reports and writes: one log line per epoch, one summary
    assert double.stdout.count("epoch 1/2") == 1
    assert double.stdout.count("test on ") == 1
    one = pd.read_csv(tmp_path / "single" / "metrics_epochs.csv")
    two = pd.read_csv(tmp_path / "ddp" / "metrics_epochs.csv")
    for column in [c for c in one.columns if c.startswith(("val_", "train_loss"))]:
        assert np.allclose(one[column], two[column], atol=2e-3), column
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
    # a distributed checkpoint loads in a single process (no "module." prefixes)
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    UNet3D(**state["model_args"]).load_state_dict(state["model"])


# ---------------------------------------------------------------- the real SPIDER sample


@pytest.mark.skipif(not SLABS.is_dir(), reason=f"real SPIDER sample not found at {SLABS}")
def test_shipped_slab_setting_keeps_every_reference_voxel_the_body_crop_lost():
    """Patients 22 and 55: on a scan alone (as at test time) the Otsu body crop stops inside
    their vertebral bodies (the anterior abdomen is as dark as the air); the shipped slab
    setting (crop = false) keeps every reference voxel of theirs."""
    from test_unet import outside_crop_fraction

    cfg = load_config(ROOT / "configuration_spider_slabs.txt")
    assert not cfg.preprocessing.crop
    cases, _ = discover_cases(SLABS, cfg.data.sequences)
    for files in (c for c in cases if c.patient_id in ("22", "55")):
        _, image, labels = load_case(files, cfg.labels.lookup())  # both reoriented (PIR)
        lost = {}
        for crop in (True, False):
            grid = to_grid(image, None, replace(cfg.preprocessing, crop=crop))
            lost[crop] = outside_crop_fraction(labels, grid.crop_index, grid.crop_size, 1)
        assert lost[False] == 0.0
        assert lost[True] > 0.02, (files.case_id, lost)


@pytest.mark.skipif(not SLABS.is_dir(), reason=f"real SPIDER sample not found at {SLABS}")
def test_real_spider_slabs_map_labels_and_round_trip(tmp_path):
    """Two real slabs through the label map: class values, geometry, and the way back.

    A fine grid (384 x 192 x 32, about 0.8 mm) isolates the geometry from the grid's own
    resolution limit (at 192 x 96 x 16 the same round trip gives about 0.96 / 0.93 / 0.96).
    On the first four slabs the spacing mode's shipped setting (1.0 x 1.0 x 1.3 mm) caps Dice
    at about 0.974 / 0.960 / 0.976 (1.2 x 1.2 x 1.3 mm: 0.972 / 0.954 / 0.975; 0.94 x 0.94 x
    0.9 mm: 0.980 / 0.961 / 0.980); a coarser one would cap it further below.
    """
    cfg = load_config(ROOT / "configuration_spider_slabs.txt")
    lookup = cfg.labels.lookup()
    fine = (PreprocessingConfig(grid=(384, 192, 32), workers=1), (0.95, 0.95, 0.95))
    shipped_spacing = replace(cfg.preprocessing, mode="spacing")
    cases, problems = discover_cases(SLABS, cfg.data.sequences)
    assert len(cases) == 20 and not problems
    for settings, floors in (fine, (shipped_spacing, (0.95, 0.93, 0.95))):
        for files in cases[:2]:
            scan, image, labels = load_case(files, lookup)
            grid = to_grid(image, labels, settings)
            assert set(np.unique(sitk.GetArrayViewFromImage(grid.mask)).tolist()) == {0, 1, 2, 3}
            grid_labels = sitk.GetArrayFromImage(grid.mask)
            one_hot = np.stack([(grid_labels == c).astype(np.float32) for c in range(4)])
            back = grid_to_scan(one_hot, grid.image, scan)
            assert back.GetSize() == scan.GetSize()
            assert np.allclose(back.GetDirection(), scan.GetDirection())
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(files.mask_path)))
            reference = map_labels(mask, lookup)
            result = sitk.GetArrayFromImage(back)
            for c, floor in zip((1, 2, 3), floors, strict=True):
                assert dice(result == c, reference == c) >= floor, (files.case_id, c, settings.mode)
            if settings.mode == "spacing":  # image x A-P, y S-I, z slices; the file S-I first
                s_i, a_p, slices = target_spacing(settings.target_spacing)
                # the extent kept, the size rounded to whole voxels: the spacing a bit off
                assert np.allclose(grid.image.GetSpacing(), (a_p, s_i, slices), atol=0.05)


def _finished_run(folder: Path, mode: str, split_seed: int, dice: float, seconds: list[float]):
    """A run folder with the three files compare_runs reads (values chosen by the test)."""
    folder.mkdir(parents=True)
    record = {
        "paths": {"output_dir": str(folder)},
        "preprocessing": {"mode": mode},
        "training": {"split_seed": split_seed, "seed": split_seed, "threads": split_seed, "lr": 1},
        "testing": {"overlap": 0.5},
    }
    (folder / "run_config.json").write_text(json.dumps(record))
    epochs = pd.DataFrame({"epoch": range(1, len(seconds) + 1), "seconds": seconds})
    epochs.to_csv(folder / "metrics_epochs.csv", index=False)
    summary = pd.DataFrame(
        {
            "class": ["vertebrae", "spinal_canal"],
            "dice_mean": [dice, dice - 0.1],
            "hd95_mm_mean": [2.0 * split_seed, 4.0],
            "assd_mm_mean": [1.0, float("nan")],
        }
    )
    summary.to_csv(folder / "test_summary.csv", index=False)


def test_compare_runs_means_runs_that_differ_only_in_seeds(tmp_path):
    from compare_runs import compare, main

    _finished_run(tmp_path / "g0", "grid", 0, 0.90, [60.0, 60.0])
    _finished_run(tmp_path / "s0", "spacing", 0, 0.80, [120.0])
    _finished_run(tmp_path / "g1", "grid", 1, 0.94, [30.0, 30.0, 30.0])
    table = compare([tmp_path / "g0", tmp_path / "s0", tmp_path / "g1"])
    assert list(table["run"]) == [
        str(tmp_path / "g0"),
        str(tmp_path / "g1"),
        "mean",
        str(tmp_path / "s0"),
    ]
    assert list(table["setting"]) == [1, 1, 1, 2]
    mean = table[table["run"] == "mean"].iloc[0]
    assert mean["mode"] == "grid" and mean["split_seed"] == "0+1"
    assert mean["Dice vertebrae"] == pytest.approx(0.92)
    assert mean["Dice spinal_canal"] == pytest.approx(0.82)
    assert mean["HD95 vertebrae"] == pytest.approx(1.0)
    assert mean["train_min"] == pytest.approx(1.75)  # 2 min and 1.5 min
    assert np.isnan(mean["ASSD spinal_canal"])
    assert table.iloc[3]["train_min"] == pytest.approx(2.0)
    # Another [training] value is another setting; an unfinished run is an error naming it.
    record = json.loads((tmp_path / "g1" / "run_config.json").read_text())
    record["training"]["lr"] = 2
    (tmp_path / "g1" / "run_config.json").write_text(json.dumps(record))
    assert list(compare([tmp_path / "g0", tmp_path / "g1"])["setting"]) == [1, 2]
    (tmp_path / "g1" / "test_summary.csv").unlink()
    with pytest.raises(FileNotFoundError, match="g1: not a finished run"):
        compare([tmp_path / "g1"])
    assert main([str(tmp_path / "g1")]) == 1
    assert main([str(tmp_path / "g0"), "--csv", str(tmp_path / "t.csv")]) == 0
    assert pd.read_csv(tmp_path / "t.csv")["Dice vertebrae"].tolist() == [0.9]


# ---------------------------------------------------------------- the GPU path, on a CPU


def test_cuda_rng_state_is_this_gpus_own(monkeypatch):
    """A resume on fewer visible GPUs than saved them: only this process's GPU is restored."""
    import train

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, device)))
    saved = train._rng_state(torch.device("cuda", 1))
    assert torch.equal(saved["cuda"], torch.tensor([1]))  # one state, not one per visible GPU
    assert "cuda" not in train._rng_state(torch.device("cpu"))
    train._set_rng_state(saved, torch.device("cuda", 0))
    assert calls == [(saved["cuda"], torch.device("cuda", 0))]
    # an older checkpoint: one state per GPU of an 8-GPU box, resumed on cuda:0 and cuda:9
    eight = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([i]) for i in range(8)]}
    calls.clear()
    train._set_rng_state(eight, torch.device("cuda", 0))
    train._set_rng_state(eight, torch.device("cuda", 9))  # no state saved for it: left alone
    assert len(calls) == 1 and torch.equal(calls[0][0], torch.tensor([0]))


def test_resume_with_another_world_size_reseeds_rank_by_rank():
    import train
    from devices import Distributed

    cpu = torch.device("cpu")
    torch.manual_seed(5)
    states = [train._rng_state(cpu)]
    expected = torch.rand(3)
    assert train.restore_rng(states, Distributed(), cpu, seed=0, epoch=4)  # exact
    assert torch.equal(torch.rand(3), expected)
    draws = []
    for rank in (0, 1):
        assert not train.restore_rng(states, Distributed(rank, 2, rank), cpu, seed=0, epoch=4)
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])  # two ranks never draw the same augmentations
    train.restore_rng(states, Distributed(1, 2, 1), cpu, seed=0, epoch=4)
    assert torch.equal(torch.rand(3), draws[1])  # reproducible


def test_optimizer_state_takes_the_parameters_layout_after_loading():
    """channels_last toggled between save and resume: fused AdamW (CUDA) needs exp_avg and
    exp_avg_sq in each parameter's layout; Optimizer.load_state_dict keeps the saved strides."""
    import train

    args = {"in_channels": 1, "num_classes": 3, "base_channels": 4, "depth": 2, "norm": "instance"}
    settings = TrainingConfig()
    saved_model = train.build_model(args, torch.device("cpu"), channels_last=True)
    optimizer = train.make_optimizer(saved_model, settings)
    saved_model(torch.randn(2, 1, 4, 8, 8)).mean().backward()
    optimizer.step()
    model = train.build_model(args, torch.device("cpu"), channels_last=False)
    model.load_state_dict(saved_model.state_dict())
    resumed = train.make_optimizer(model, settings)
    resumed.load_state_dict(optimizer.state_dict())
    five_d = [p for p in model.parameters() if p.ndim == 5]
    assert any(resumed.state[p]["exp_avg"].stride() != p.stride() for p in five_d)  # the defect
    train.match_state_layout(resumed)
    # the saved optimizer's own moments, parameter by parameter (same order in both models)
    for saved_p, p in zip(saved_model.parameters(), model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[p][key].stride() == p.stride(), key
            saved = optimizer.state[saved_p][key]
            assert saved.abs().sum() > 0  # a moment worth copying
            assert torch.equal(resumed.state[p][key], saved), key  # same values, new layout
        assert torch.equal(resumed.state[p]["step"], optimizer.state[saved_p]["step"])
    # a parameter that never had a gradient has no state: nothing to match, no failure
    frozen = torch.nn.Parameter(torch.zeros(2, 1, 1, 1, 1))
    resumed.add_param_group({"params": [frozen]})
    train.match_state_layout(resumed)
    assert frozen not in resumed.state or not resumed.state[frozen]


def _validate_on_two_ranks(rank: int, folder: str) -> None:
    """One gloo rank: a DDP batch-norm UNet trains one step, then validates as fit does with
    2 ranks and 1 validation case (rank 1 has none), and reduces the metrics."""
    import torch.distributed as dist

    import train
    from devices import Distributed
    from training_data import ShardSampler, VolumeDataset, make_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_DDP_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    args = {"in_channels": 1, "num_classes": 3, "base_channels": 4, "depth": 2, "norm": "batch"}
    model = train.build_model(args, torch.device("cpu"), channels_last=False)
    network = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = SegmentationLoss(3)
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(2, 1, 4, 8, 8, generator=generator)
    masks = torch.randint(0, 3, (2, 4, 8, 8), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters())
    run_epoch(network, [(images, masks)], loss_fn, torch.device("cpu"), optimizer)
    val_set = VolumeDataset.from_arrays(images[:1, 0].numpy(), masks[:1].numpy(), "cpu")
    loader = make_loader(val_set, ShardSampler(1, rank, 2), 1, 0)
    totals = run_epoch(train.unwrapped(network), loader, loss_fn, torch.device("cpu"))
    scores = totals.scores(Distributed(rank, 2, rank))
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"loss": scores["loss"]}))
    dist.destroy_process_group()


def test_validation_with_batch_norm_and_a_rank_without_cases_does_not_hang(tmp_path):
    """Validation runs on the unwrapped model: DDP's buffer broadcast in its first forward after
    training would meet the other rank's all_reduce of the metrics (a hang or garbage)."""
    import socket

    import torch.multiprocessing as mp

    import train

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        os.environ["TEST_DDP_PORT"] = str(probe.getsockname()[1])
    args = {"in_channels": 1, "num_classes": 3, "base_channels": 4, "depth": 2, "norm": "batch"}
    model = train.build_model(args, torch.device("cpu"), False)

    class Compiled(torch.nn.Module):  # what torch.compile returns keeps the model as _orig_mod
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert train.unwrapped(Compiled(model)) is model
    context = mp.start_processes(
        _validate_on_two_ranks, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        assert time.monotonic() < deadline, "validation under DDP hung"
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text())["loss"] for r in (0, 1)]
    assert losses[0] == losses[1] and math.isfinite(losses[0])


def test_bf16_only_where_the_gpu_has_it_in_hardware():
    from devices import cuda_bf16_native

    assert not cuda_bf16_native((7, 0))  # V100: torch.cuda.is_bf16_supported() says yes
    assert not cuda_bf16_native((7, 5))  # T4
    assert cuda_bf16_native((8, 0)) and cuda_bf16_native((8, 9)) and cuda_bf16_native((9, 0))


def test_channels_last_is_not_used_with_instance_norm_on_cuda():
    from devices import channels_last_pays, fast_settings

    assert not channels_last_pays("cuda", "instance")
    assert channels_last_pays("cuda", "batch") and channels_last_pays("cuda", "group")
    assert channels_last_pays("cpu", "instance")  # oneDNN: unchanged on CPUs
    assert not channels_last_pays("mps", "batch")
    assert fast_settings(torch.device("cpu"), "fp32", True, "instance") == (None, True)
    assert fast_settings(torch.device("cpu"), "fp32", False, "instance") == (None, False)


def test_batches_from_host_memory_are_pinned_for_cuda(tiny_raw, tmp_path):
    """Training on CUDA from host memory asks for page-locked batches (the flag is what a CPU
    can check; pinning itself needs a GPU)."""
    import preprocess_script
    from training_data import make_data

    rows = {}
    for mode in ("grid", "spacing"):
        (tmp_path / mode).mkdir()
        cfg = write_config(tmp_path / mode, tiny_raw, preprocessing={"mode": mode})
        assert preprocess_script.main(["--config", str(cfg)]) == 0
        config = load_config(cfg)
        manifest = read_manifest(config.paths.preprocessed_dir)
        plan = json.loads((config.paths.preprocessed_dir / "plan.json").read_text())
        rows[mode] = (manifest.iloc[:2], manifest.iloc[2:3], plan, config.training)
    for device, expected in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        train_rows, val_rows, plan, training = rows["grid"]
        settings = replace(training, cache_on_device=False)
        grid = make_data(train_rows, val_rows, plan, settings, device, Distributed(), 1)
        assert grid.train_loader.pin_memory is expected
        assert grid.val_loader.pin_memory is expected
        train_rows, val_rows, plan, training = rows["spacing"]
        patches = make_data(train_rows, val_rows, plan, settings, device, Distributed(), 1)
        assert patches.pin is expected


def test_sliding_windows_are_predicted_in_batches():
    from patches import window_probabilities

    sizes = []

    def predict(batch):
        """Logits from each voxel's own value: the stitched probabilities are then the softmax
        of the whole image's logits, whatever the windows and batches, if each window's output
        goes back where its input came from."""
        sizes.append(len(batch))
        return torch.cat([batch, -batch], dim=1)

    image = torch.randn(1, 8, 40, 40)
    expected = torch.softmax(torch.cat([image, -image]), dim=0)
    one = window_probabilities(predict, image, (8, 16, 16), 0.5, 2)
    windows = len(sizes)
    assert set(sizes) == {1} and windows > 3
    sizes.clear()
    three = window_probabilities(predict, image, (8, 16, 16), 0.5, 2, batch_size=3)
    assert max(sizes) == 3 and sum(sizes) == windows and len(sizes) == math.ceil(windows / 3)
    assert torch.allclose(one, expected, atol=1e-5)
    assert torch.allclose(three, expected, atol=1e-5)


def test_gpu_check_runs_through_on_a_cpu(tmp_path, capsys):
    """bench.py --gpu-check's parts at a tiny size on the CPU: every layout row, inference,
    and the resume through the drivers, which must continue bit-exactly here too."""
    import bench
    import gpu_check
    from config import ModelConfig

    preset = bench.Preset("tiny", (32, 16, 8), ModelConfig(4, 3), 4, 1, 0.01, 2, True, 1)
    run = bench.Run(preset, replace(TrainingConfig(), precision="fp32"), torch.device("cpu"), False)
    record = gpu_check.check(run, tmp_path)
    layouts = [(row["precision"], row["channels_last"]) for row in record["training"]]
    precisions = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    assert layouts == [(p, layout) for p in precisions for layout in (False, True)]
    chosen = [
        layout
        for layout, row in zip(layouts, record["training"], strict=True)
        if row["pipeline_choice"]
    ]
    assert chosen == [("fp32", True)]  # precision fp32; channels_last pays on CPUs
    assert all(row["volumes_per_s"] > 0 for row in record["training"])
    assert record["resume"] == {"bit_exact": True, "max_abs_difference": 0.0}
    text = gpu_check.table(record, "header")
    assert "resume continues bit-exactly" in text and "<- the pipeline's choice" in text


UNET3D_OPTIONS = {
    "stem_stride": "2, 2, 1",
    "residual": "true",
    "deep_supervision": "true",
    "head_kernel": "3",
}


@pytest.mark.parametrize(
    "mode, model",
    [
        ("grid", UNET3D_OPTIONS),
        ("spacing", UNET3D_OPTIONS),
        ("spacing", {"network": "residual_unet", "depth": 3}),
    ],
)
def test_end_to_end_with_every_model_option_and_sparse_validation(tmp_path, tiny_raw, mode, model):
    """Strided stem, residual blocks, deep supervision and a 3x3x3 head (or the residual_unet
    network) train, validate every 2nd epoch (and the last), checkpoint, and predict the test
    cases from their raw scans."""
    import preprocess_script
    import trainandtest_script

    extra = SPACING_MODE if mode == "spacing" else {"training": {}}
    cfg = write_config(
        tmp_path,
        tiny_raw,
        preprocessing=extra.get("preprocessing", {}),
        model=model,
        training={"epochs": 3, "val_every": 2, **extra["training"]},
        testing={"figures": 0},
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    history = pd.read_csv(tmp_path / "run" / "metrics_epochs.csv")
    assert history["val_loss"].notna().tolist() == [False, True, True]  # epochs 2 and 3
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] in (2, 3)
    if "network" in model:
        assert best["model_args"]["network"] == "residual_unet"
    else:
        assert best["model_args"]["stem_stride"] == [2, 2, 1] and best["model_args"]["residual"]
        assert best["model_args"]["head_kernel"] == 3
    summary = pd.read_csv(tmp_path / "run" / "test_summary.csv")
    assert len(summary) == 3 and summary["n"].gt(0).all()


@pytest.mark.parametrize("mode", ["grid", "spacing"])
def test_bench_profile_splits_each_epoch_into_its_parts(tmp_path, tiny_raw, capsys, mode):
    import bench
    import bench_profile
    import preprocess_script

    extra = SPACING_MODE if mode == "spacing" else {"training": {}}
    cfg = write_config(
        tmp_path, tiny_raw, preprocessing=extra.get("preprocessing", {}), training=extra["training"]
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    capsys.readouterr()
    assert bench.main(["--profile", "--config", str(cfg), "--epochs", "2", "--minutes", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert len(record["laps"]) == 2
    for lap in record["laps"]:
        parts = sum(lap.get(part, 0.0) for part in bench_profile.PARTS)
        assert 0 < parts <= lap["total"] * 1.001
        assert lap["forward"] > 0 and lap["backward"] > 0 and lap["validation"] > 0
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "seconds"])
    assert lines[header].split()[2] == "data"
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["1", "2"]
    assert "steps in 10 minutes on this machine" in lines[header + 3]
    names = [row["network"] for row in record["step_costs"]]
    assert names[:2] == ["UNet3D, seed shape", "UNet3D, this configuration"]
    assert all(row["seconds"] > 0 for row in record["step_costs"])
    assert not (tmp_path / "run").exists()  # a temporary run folder, not the configured one


@pytest.mark.parametrize("crop", ["true", "false"])
def test_bench_spacing_times_patch_training_and_a_slab_sized_scan(tmp_path, tiny_raw, capsys, crop):
    """bench.py --spacing (bench_spacing.py) with a tiny network at a coarse spacing: the row
    names the configuration's patch, spacing, TTA and ensemble members, and both speeds are
    positive."""
    import bench

    members = 2 if crop == "false" else 1
    cfg = write_config(
        tmp_path,
        tiny_raw,
        preprocessing={**SPACING_MODE["preprocessing"], "target_spacing": "4, 4, 6", "crop": crop},
        training={**SPACING_MODE["training"], "members": members},
        testing={"tta_flip": "true"},
    )
    work = tmp_path / "not" / "there"  # --work-dir is made when missing
    assert (
        bench.main(["--spacing", "--config", str(cfg), "--threads", "1", "--work-dir", str(work)])
        == 0
    )
    assert work.is_dir() and not any(work.iterdir())  # the temporary folder is gone
    lines = capsys.readouterr().out.strip().splitlines()
    row = json.loads(lines[-1])["spacing_mode"]
    assert row["patch_size"] == [32, 32, 16] and row["target_spacing_mm"] == [4.0, 4.0, 6.0]
    assert row["scan_size"] == [512, 640, 24] and row["tta_flip"] is True
    assert row["train_patches_per_s"] > 0 and row["seconds_per_scan"] > 0
    assert lines[-4].startswith("bench spacing on") and "patch 32x32x16" in lines[-4]
    assert row["members"] == members and f"{members} network" in lines[-2]


def test_bench_minutes_default_and_project_run_only_with_peer(tmp_path, capsys):
    """--minutes defaults to 30 unless --peer scores a finished run (then the run's own
    minutes); --project-run without --peer is refused by name."""
    import bench

    config = ["--config", str(ROOT / "configuration.txt")]
    assert bench.parse_arguments(["--profile", *config]).minutes == bench.DEFAULT_MINUTES
    assert bench.parse_arguments(["--peer", *config]).minutes == bench.DEFAULT_MINUTES
    scored = bench.parse_arguments(["--peer", *config, "--project-run", str(tmp_path)])
    assert scored.minutes is None and scored.project_run == tmp_path
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--profile", *config, "--project-run", str(tmp_path)])
    assert "--project-run goes with --peer" in capsys.readouterr().err


def test_peer_harness_on_tiny_data(tmp_path, tiny_raw):
    """bench.py --peer's two systems on the same patients, at a tiny size and budget."""
    pytest.importorskip(
        "monai", reason="MONAI is a benchmark-only dependency (requirements-bench.txt)"
    )
    import bench_peer
    import preprocess_script

    cfg = write_config(tmp_path, tiny_raw, testing={"figures": 0})
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    config = load_config(cfg)
    record = bench_peer.compare(
        config, cfg, [], 0, 0.05, tmp_path / "work", patch=(16, 32, 32), spacing="3, 3, 3"
    )
    assert [s["system"] for s in record["systems"]] == ["project", "MONAI peer"]
    for system in record["systems"]:
        assert system["steps"] > 0 and system["seconds_per_scan"] > 0
        for name in config.labels.class_names[1:]:
            assert 0.0 <= system[f"{name}_dice"] <= 1.0
    assert record["systems"][1]["training_minutes"] == pytest.approx(0.05, abs=0.05)
    cases = pd.DataFrame(record["cases"])  # per case, per system: the volumes too
    assert len(cases) == 2 * record["test_cases"] * (len(config.labels.class_names) - 1)
    assert set(cases["system"]) == {"project", "MONAI peer"}
    assert (cases["reference_voxels"] > 0).all() and (cases["predicted_voxels"] >= 0).all()
    project_means = cases[cases["system"] == "project"].groupby("class")["dice"].mean()
    assert project_means["vertebrae"] == pytest.approx(record["systems"][0]["vertebrae_dice"])
    text = bench_peer.table(record, config.labels.class_names)
    assert "MONAI peer" in text and "patches/s" in text
    # A finished project run set beside the peer again (--project-run): its own split seed,
    # the same project rows, and the peer trains as long as that run did.
    # The peer's recipe with the project's network this time (--peer-network project).
    project_run = tmp_path / "work" / "project"
    again = bench_peer.compare(
        config,
        cfg,
        [],
        5,
        None,
        tmp_path / "work2",
        (16, 32, 32),
        "3, 3, 3",
        project_run,
        "project",
    )
    assert again["split_seed"] == 0 and not (tmp_path / "work2" / "project").exists()
    assert [s["system"] for s in again["systems"]] == ["project", "peer recipe, project net"]
    supervised = replace(config.model, deep_supervision=True)  # the recipe's loss takes one output
    assert bench_peer.peer_network(4, supervised).arguments["deep_supervision"] is False
    assert again["systems"][0]["steps"] == record["systems"][0]["steps"]
    rows = pd.DataFrame(again["cases"])
    assert (
        rows[rows["system"] == "project"]["dice"].tolist()
        == cases[cases["system"] == "project"]["dice"].tolist()
    )
    project_minutes = again["systems"][0]["training_minutes"]
    assert again["systems"][1]["training_minutes"] == pytest.approx(project_minutes, abs=0.05)
    (project_run / "splits.csv").unlink()
    with pytest.raises(FileNotFoundError, match="missing splits.csv"):
        bench_peer.compare(config, cfg, [], 0, 0.01, tmp_path / "work3", project_run=project_run)


# ---------------------------------------------------------------- cross-validation, ensembles


def test_patient_folds_are_disjoint_and_cover_everyone():
    from train import fold_split, patient_folds

    cases = pd.DataFrame(
        {
            "case_id": [f"{p}_{s}" for p in range(23) for s in ("t1", "t2")],
            "patient_id": [str(p) for p in range(23) for _ in range(2)],
        }
    )
    folds = patient_folds(cases, 5, test_fraction=0.15, seed=3)
    assert len(folds) == len(cases) and set(folds["case_id"]) == set(cases["case_id"])
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()  # t1 and t2 together
    per_fold = folds[folds["fold"] >= 0].groupby("fold")["patient_id"].nunique()
    assert list(per_fold.index) == [0, 1, 2, 3, 4] and per_fold.max() - per_fold.min() <= 1
    assert folds.loc[folds["fold"] < 0, "patient_id"].nunique() == 3  # 15 % of 23 held out
    assert patient_folds(cases, 5, 0.15, seed=3).equals(folds)  # seeded
    assert not patient_folds(cases, 5, 0.15, seed=4)["fold"].equals(folds["fold"])
    split = fold_split(folds, 2)
    assert set(split.loc[split["split"] == "val", "patient_id"]) == set(
        folds.loc[folds["fold"] == 2, "patient_id"]
    )
    assert (split.loc[folds["fold"] < 0, "split"] == "test").all()
    with pytest.raises(ValueError, match="folds = 30"):
        patient_folds(cases, 30, 0.15, seed=3)


def test_plan_check_compares_spacing_and_patch_as_values_not_text():
    """Preprocessed with --set target_spacing=1.0,1.0,1.3, trained with the file's
    '1.0, 1.0, 1.3': the same plan, for training and for an ensemble's members. Another
    spacing or patch is still refused, by name."""

    def plan(spacing: str, patch: str) -> dict:
        settings = PreprocessingConfig(mode="spacing", target_spacing=spacing)
        return make_plan(settings, SPIDER_LABELS, patch)

    found = plan("1.0,1.0,1.3", "304,176,16")
    check_plan(found, plan("1, 1.0, 1.30", "304, 176, 16"), Path("pre"))
    check_plan(plan("auto", "auto"), plan("AUTO", " auto"), Path("pre"))
    with pytest.raises(ConfigError, match="target_spacing") as error:
        check_plan(found, plan("1.0, 1.0, 1.2", "304, 176, 16"), Path("pre"))
    assert "patch_size_setting" not in str(error.value)
    with pytest.raises(ConfigError, match="patch_size_setting"):
        check_plan(found, plan("1.0, 1.0, 1.3", "304, 176, 32"), Path("pre"))
    # an ensemble's members: the same comparison (test_unet.check_same_plans)
    from test_unet import check_same_plans

    def state(spacing: str) -> dict:
        return {"plan": plan(spacing, "304,176,16"), "class_names": list(SPIDER_LABELS.class_names)}

    check_same_plans([state("1.0,1.0,1.3"), state("1.0, 1.0, 1.3")])
    with pytest.raises(ValueError, match="differ in target_spacing"):
        check_same_plans([state("1.0,1.0,1.3"), state("1.0, 1.0, 1.2")])


def test_ensemble_probabilities_are_the_mean_of_the_members(tmp_path):
    from test_unet import ensemble_probabilities

    files = _case(tmp_path, "LPS", seed=2)
    _, image, _ = load_case(files, SPIDER_LOOKUP)
    settings = PreprocessingConfig(grid=(32, 16, 8))
    grid = to_grid(image, None, settings)
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(1, 4, 8, 32, 16, generator=generator) * 3 for _ in range(2)]
    plan = make_plan(settings, SPIDER_LABELS)
    cpu = torch.device("cpu")
    pair = Predictor((_Oracle(logits[0]), _Oracle(logits[1])), plan, cpu, "fp32")
    mean = ensemble_probabilities(pair, grid.image, None)
    expected = ((logits[0].softmax(1) + logits[1].softmax(1)) / 2)[0].numpy()
    assert np.allclose(mean, expected, atol=1e-6)
    single = ensemble_probabilities(
        Predictor((_Oracle(logits[0]),), plan, cpu, "fp32"), grid.image, None
    )
    assert np.allclose(single, logits[0].softmax(1)[0].numpy(), atol=1e-6)


def test_cross_validation_end_to_end_and_ensemble_prediction(tmp_path, tiny_raw, capsys):
    """folds = 3 on the tiny set: one fold first (as a second GPU would), then fold = all
    trains the rest, writes the CV results and tests the held-out part with the ensemble; a
    rerun trains nothing; predict_script takes the run folder as an ensemble."""
    import predict_script
    import preprocess_script
    import trainandtest_script

    cfg = write_config(
        tmp_path,
        tiny_raw,
        training={"folds": 3, "epochs": 1},
        testing={"figures": 0, "ensemble": "true", "instances": "true"},
    )
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert trainandtest_script.main(["--config", str(cfg), "--set", "training.fold=1"]) == 0
    run = tmp_path / "run"
    assert "folds [0, 2] are not trained yet" in capsys.readouterr().out
    first = (run / "fold_1" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    folds = pd.read_csv(run / "folds.csv", dtype={"case_id": str, "patient_id": str})
    patients = folds.loc[folds["fold"] >= 0, "patient_id"].nunique()
    assert f"cross-validation over {patients} patients (3 folds" in out
    assert "with the ensemble of the 3 fold models" in out
    assert (run / "fold_1" / "checkpoints" / "last.pt").stat().st_mtime_ns == first
    cv = pd.read_csv(run / "cv_metrics.csv", dtype={"case_id": str})
    not_test = set(folds.loc[folds["fold"] >= 0, "case_id"])
    counts = cv.groupby("case_id").size()
    assert set(counts.index) == not_test and (counts == 3).all()  # once per case and class
    assert cv.groupby("case_id")["fold"].nunique().eq(1).all()
    case_fold = dict(zip(folds["case_id"], folds["fold"], strict=True))
    assert all(case_fold[c] == f for c, f in zip(cv["case_id"], cv["fold"], strict=True))
    summary = pd.read_csv(run / "cv_summary.csv")
    assert len(summary) == 3 and (summary["n"] == len(not_test)).all()
    assert (run / "test_summary.csv").is_file() and (run / "cv_instance_summary.csv").is_file()
    import compare_runs

    row = compare_runs.compare([run]).iloc[0]
    assert "cross-validation" in row["run"] and row["Dice vertebrae"] == pytest.approx(
        summary.set_index("class").loc["vertebrae", "dice_mean"]
    )
    assert "Dice sd vertebrae" in row.index
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("fold_*/checkpoints/*.pt")}
    assert trainandtest_script.main(["--config", str(cfg)]) == 0  # trains nothing
    assert {p: p.stat().st_mtime_ns for p in run.glob("fold_*/checkpoints/*.pt")} == stamps

    scan = sorted((tiny_raw / "images").glob("*.mha"))[0]
    out_dir = tmp_path / "predicted"
    args = ["--checkpoint", str(run), str(scan), "--instances", "--output-dir", str(out_dir)]
    assert predict_script.main(args) == 0
    assert "ensemble of 3 models" in capsys.readouterr().out
    name = scan.name[: -len(".mha")]
    for suffix in (".mha", "_instances.mha", "_instances.csv"):
        assert (out_dir / f"{name}{suffix}").is_file()
    # a checkpoint of another plan is refused, naming the key and both values
    other = torch.load(run / "fold_0" / "checkpoints" / "best.pt", weights_only=True)
    other["plan"] = {**other["plan"], "grid": [64, 16, 8]}
    torch.save(other, tmp_path / "other.pt")
    two = [
        "--checkpoint",
        str(run / "fold_1" / "checkpoints" / "best.pt"),
        str(tmp_path / "other.pt"),
    ]
    assert predict_script.main([*two, str(scan), "--output-dir", str(tmp_path / "x")]) == 1
    assert "differ in grid: [32, 16, 8] against [64, 16, 8]" in capsys.readouterr().err


def test_members_train_on_one_split_and_test_their_ensemble(tmp_path, tiny_raw, capsys):
    """members = 2: two networks on the same split with seeds 3 and 4, each in its member_<i>
    folder; the test part with their ensemble in the run folder (its Dice is the ensemble's,
    not a member's); a rerun trains nothing; predict_script and bench's --project-run take the
    folder as the ensemble."""
    import bench_peer
    import predict_script
    import preprocess_script
    import trainandtest_script

    cfg = write_config(
        tmp_path,
        tiny_raw,
        training={"members": 2, "epochs": 1, "seed": 3},
        testing={"figures": 0},
    )
    with pytest.raises(ConfigError, match="members = 2 with folds = 3: the folds are already"):
        load_config(cfg, ["training.folds=3"])
    assert preprocess_script.main(["--config", str(cfg)]) == 0
    assert trainandtest_script.main(["--config", str(cfg)]) == 0
    assert "with the ensemble of the 2 members" in capsys.readouterr().out
    run = tmp_path / "run"
    split = pd.read_csv(run / "splits.csv", dtype=str)
    members = [run / f"member_{m}" for m in range(2)]
    for member, seed in zip(members, (3, 4), strict=True):
        assert pd.read_csv(member / "splits.csv", dtype=str).equals(split)
        state = load_checkpoint(member / "checkpoints" / "best.pt")
        assert state["config"]["training"]["seed"] == seed
        assert not (member / "test_summary.csv").exists()  # the members are not tested alone
    weights = [load_checkpoint(m / "checkpoints" / "best.pt")["model"] for m in members]
    assert not torch.equal(*(w["head.weight"] for w in weights))  # two different networks
    ensemble = pd.read_csv(run / "test_metrics.csv", dtype={"case_id": str})
    assert set(ensemble["case_id"]) == set(split.loc[split["split"] == "test", "case_id"])
    from test_unet import evaluate_checkpoint

    config = load_config(cfg)
    cases = trainandtest_script.select_test_cases(
        config, split, trainandtest_script.read_manifest(config.paths.preprocessed_dir)
    )
    alone, _, _ = evaluate_checkpoint(
        load_checkpoint(members[0] / "checkpoints" / "best.pt"),
        cases,
        tmp_path / "alone",
        torch.device("cpu"),
        config.testing,
        progress=False,
    )
    assert (alone["predicted_voxels"].to_numpy() != ensemble["predicted_voxels"].to_numpy()).any()
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("member_*/checkpoints/*.pt")}
    assert trainandtest_script.main(["--config", str(cfg)]) == 0  # trains nothing
    assert {p: p.stat().st_mtime_ns for p in run.glob("member_*/checkpoints/*.pt")} == stamps

    scan = sorted((tiny_raw / "images").glob("*.mha"))[0]
    args = ["--checkpoint", str(run), str(scan), "--output-dir", str(tmp_path / "predicted")]
    assert predict_script.main(args) == 0
    assert "ensemble of 2 models" in capsys.readouterr().out
    assert bench_peer.run_networks(run) == members
    assert bench_peer.run_networks(members[0]) == [members[0]]
    (members[1] / "metrics_epochs.csv").unlink()
    with pytest.raises(FileNotFoundError, match="missing member_1/metrics_epochs.csv"):
        bench_peer.finished_run_training(run)


# ---------------------------------------------------------------- measurements per level


@pytest.mark.parametrize("seed", [0, 5])
def test_measurements_of_reference_masks_match_the_generator(seed):
    """Disc heights (between two bodies), body heights and the canal's A-P diameter of the
    synthetic reference against the generator's own numbers, within one voxel (the canal's
    A-P varies by +-8 % along the spine by construction)."""
    from measure import measure_levels
    from synthetic_spine import _draw_spine

    spine = _draw_spine(np.random.default_rng(seed))  # synth_patient's first draw
    _, mask = synth_patient(np.random.default_rng(seed), small=False)
    voxel = max(mask.GetSpacing()[:2])
    table = measure_levels(mask).set_index("label")
    concavity = 1.5 * spine.scale  # each lumbar endplate's central dip (synthetic_spine._Body)
    checked = 0
    for k in range(1, spine.count):  # body k, and the disc above it (between bodies k, k + 1)
        if k in table.index and not math.isnan(table.loc[k, "body_height_mm"]):
            assert table.loc[k, "body_height_mm"] == pytest.approx(
                spine.heights[k - 1] - 2 * concavity, abs=voxel
            ), k
            checked += 1
        if 201 + k in table.index:
            assert table.loc[201 + k, "disc_height_mm"] == pytest.approx(
                spine.discs[k] + 2 * concavity, abs=voxel
            ), 201 + k
            checked += 1
    assert checked >= 8
    ap = table["canal_ap_mm"].dropna()
    assert len(ap) >= 8
    assert ((ap - spine.canal_ap).abs() <= 0.08 * spine.canal_ap + voxel).all()


def test_quality_flags_for_a_missing_disc_a_cut_canal_and_a_cut_level():
    from measure import measure_levels, quality_flags

    _, mask = synth_patient(np.random.default_rng(0), small=False)
    array = sitk.GetArrayFromImage(mask)

    def image(values: np.ndarray) -> sitk.Image:
        result = sitk.GetImageFromArray(values)
        result.CopyInformation(mask)
        return result

    clean = quality_flags(mask, measure_levels(mask))
    assert {flag["name"] for flag in clean["flags"]} <= {"border", "count"}
    no_disc = array.copy()
    no_disc[no_disc == 203] = 0  # L3/L4 gone: L3 sits right on L4
    qc = quality_flags(image(no_disc), measure_levels(image(no_disc)))
    order = [flag for flag in qc["flags"] if flag["name"] == "order"]
    assert not qc["ok"] and order and order[0]["levels"] == [["L4", "L3"]]
    cut = array.copy()
    rows = np.nonzero((cut == 100).any(axis=(0, 2)))[0]
    cut[:, rows[len(rows) // 2] : rows[len(rows) // 2] + 6][
        cut[:, rows[len(rows) // 2] : rows[len(rows) // 2] + 6] == 100
    ] = 0
    qc = quality_flags(image(cut), measure_levels(image(cut)))
    pieces = [flag for flag in qc["flags"] if flag["name"] == "canal_pieces"]
    assert pieces and pieces[0]["value"] == 2 and pieces[0]["threshold"] == 1
    # the top of the field of view cuts the topmost vertebra: NaN with the reason, and flagged
    top = int(
        array.max()
        if array.max() < 100
        else max(v for v in np.unique(array) if v < 100 or 100 < v < 200)
    )
    table = measure_levels(mask).set_index("label")
    assert math.isnan(table.loc[top, "body_height_mm"]) and table.loc[top, "notes"] != ""
    border = [flag for flag in clean["flags"] if flag["name"] == "border"]
    assert border and level_name(top) in border[0]["levels"]


def test_measure_script_on_a_semantic_slab_mask(tmp_path):
    import measure_script

    _, mask = synth_patient(np.random.default_rng(2), small=True)
    semantic = sitk.GetArrayFromImage(mask)
    values = np.zeros(semantic.shape, np.uint8)  # the slabs' encoding: 76 / 29 / 150
    values[((semantic >= 1) & (semantic <= 25)) | ((semantic > 100) & (semantic < 200))] = 76
    values[semantic > 200] = 29
    values[semantic == 100] = 150
    slab = sitk.GetImageFromArray(values)
    slab.CopyInformation(mask)
    sitk.WriteImage(slab, str(tmp_path / "slab.mha"))
    bad = sitk.GetImageFromArray(np.full(values.shape, 77, np.uint8))  # no class, no level
    bad.CopyInformation(mask)
    sitk.WriteImage(bad, str(tmp_path / "bad.mha"))
    config = str(ROOT / "configuration_spider_slabs.txt")
    out = tmp_path / "out"
    args = [str(tmp_path / "slab.mha"), str(tmp_path / "bad.mha"), "--config", config]
    assert measure_script.main([*args, "--output-dir", str(out)]) == 1  # bad.mha skipped
    table = pd.read_csv(out / "slab_instances.csv", keep_default_na=False)
    for column in ("disc_height_mm", "body_height_mm", "canal_ap_mm", "canal_area_mm2", "notes"):
        assert column in table.columns
    assert (out / "slab_levels.png").is_file() and not (out / "bad_instances.csv").exists()
    qc = json.loads((out / "slab_qc.json").read_text())
    assert set(qc) == {"ok", "flags"}
