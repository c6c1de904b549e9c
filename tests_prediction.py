"""The way back to the scan and the post-processing, against values computed by hand; the
measure script on a mask whose heights are known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import measure_script
import predict_script
import test_unet  # its testing_from_checkpoint is no test: used by its module name
from conftest import ROOT
from test_unet import (
    Predictor,
    back_to_scan,
    ensemble_probabilities,
    plan_settings,
    remove_small_components,
)
from train import load_checkpoint
from vertebraeseg import CANONICAL, labels_to_scan, read_scan, to_grid


def _labels(array: np.ndarray, spacing=(0.5, 1.0, 2.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)  # 1 mm^3 voxels
    image.SetOrigin((3.0, -2.0, 7.0))
    return image


def test_small_components_are_removed_by_their_volume_in_mm3():
    array = np.zeros((10, 20, 20), np.uint8)
    array[1:5, 1:6, 1:6] = 1  # 100 mm^3: kept
    array[5, 6, 6] = 1  # touches it only at a corner: the same 26-connected component
    array[7:9, 10:12, 10:12] = 1  # 8 mm^3: removed
    array[1:3, 12:15, 12:14] = 2  # 12 mm^3: kept
    array[6:9, 15:17, 1] = 2  # 6 mm^3: removed, though it touches nothing of its class
    array[9, 0, 0] = 3  # 1 mm^3 of a class with nothing else: removed
    expected = array.copy()
    expected[7:9, 10:12, 10:12] = 0
    expected[6:9, 15:17, 1] = 0
    expected[9, 0, 0] = 0
    result = remove_small_components(_labels(array), 10.0)
    assert np.array_equal(sitk.GetArrayFromImage(result), expected)
    assert result.GetSpacing() == (0.5, 1.0, 2.0) and result.GetOrigin() == (3.0, -2.0, 7.0)
    # at 7 mm^3 the 8 mm^3 piece stays: the volume is in mm^3, not in voxels
    kept = sitk.GetArrayFromImage(remove_small_components(_labels(array), 7.0))
    assert kept[7, 10, 10] == 1 and kept[7, 15, 1] == 0
    # "smaller than": a piece of exactly the limit stays
    assert sitk.GetArrayFromImage(remove_small_components(_labels(array), 8.0))[7, 10, 10] == 1
    coarse = _labels(array, spacing=(1.0, 1.0, 2.0))  # 2 mm^3 voxels: 6 voxels are 12 mm^3
    assert sitk.GetArrayFromImage(remove_small_components(coarse, 10.0))[7, 15, 1] == 2


def test_labels_go_back_by_nearest_neighbour():
    """A grid twice as coarse as the scan along every axis, over the same extent: scan voxel
    i lies inside grid voxel i // 2 and takes its label."""
    rng = np.random.default_rng(0)
    grid_array = rng.integers(0, 4, (3, 5, 4)).astype(np.uint8)
    scan = sitk.Image((8, 10, 6), sitk.sitkFloat32)
    scan.SetSpacing((0.5, 0.7, 2.0))
    scan.SetOrigin((10.0, 20.0, 30.0))
    grid = sitk.GetImageFromArray(grid_array)
    grid.SetSpacing((1.0, 1.4, 4.0))
    # the grid's voxel 0 spans the scan's voxels 0 and 1: its centre is half a scan voxel on
    grid.SetOrigin((10.25, 20.35, 31.0))
    expected = grid_array[np.ix_(np.arange(6) // 2, np.arange(10) // 2, np.arange(8) // 2)]
    assert np.array_equal(sitk.GetArrayFromImage(labels_to_scan(grid, scan)), expected)
    one_hot = np.stack([grid_array == c for c in range(4)]).astype(np.float32)
    nearest = back_to_scan(one_hot, grid, scan, map_probabilities=False)
    assert np.array_equal(sitk.GetArrayFromImage(nearest), expected)
    # a scan reaching beyond the grid (a crop): background there
    wider = sitk.Image((8, 10, 8), sitk.sitkFloat32)  # two more slices than the grid covers
    wider.SetSpacing(scan.GetSpacing())
    wider.SetOrigin(scan.GetOrigin())
    outside = sitk.GetArrayFromImage(labels_to_scan(grid + 1, wider))  # labels 1-4 inside
    assert (outside[6:] == 0).all() and (outside[:6] > 0).all()


def test_predict_script_labels_nearest_maps_the_grid_arg_max(trained_run, tiny_raw, tmp_path):
    """--labels-nearest: the grid's arg-max, taken to the scan by nearest neighbour (computed
    here with SimpleITK from the grid probabilities); without it, probabilities are mapped."""
    checkpoint = trained_run / "run" / "checkpoints" / "best.pt"
    scan_path = sorted((tiny_raw / "images").glob("*.mha"))[0]
    outputs = {}
    for flag in ([], ["--labels-nearest"]):
        out = tmp_path / ("nearest" if flag else "probabilities")
        argv = ["--checkpoint", str(checkpoint), str(scan_path), "--output-dir", str(out), *flag]
        assert predict_script.main(argv) == 0
        outputs[bool(flag)] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / scan_path.name)))
    state = load_checkpoint(checkpoint)
    testing = replace(
        test_unet.testing_from_checkpoint(state), min_component_mm3=0.0, instances=False
    )
    predictor = Predictor.from_checkpoint(state, torch.device("cpu"), testing)
    scan = read_scan(scan_path)
    grid = to_grid(sitk.DICOMOrient(scan, CANONICAL), None, plan_settings(predictor.plan))
    probabilities = ensemble_probabilities(predictor, grid.image, None)
    grid_labels = sitk.GetImageFromArray(probabilities.argmax(0).astype(np.uint8))
    grid_labels.CopyInformation(grid.image)
    expected = sitk.Resample(grid_labels, scan, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    if state["config"]["testing"]["min_component_mm3"]:
        pytest.skip("the run removes small components: compared without that step")
    assert np.array_equal(outputs[True], sitk.GetArrayFromImage(expected))
    assert not np.array_equal(outputs[True], outputs[False])  # the flag changes the way back


def _spine_mask(values: dict[str, int]) -> tuple[sitk.Image, dict[str, float]]:
    """A PIR column of box bodies L5-L1 (25 mm high) and discs L5/S1-T12/L1 (8 mm) with a
    canal behind, in the
    given raw values; returns the mask and its known heights in mm."""
    spacing = (1.0, 1.0, 3.0)  # x A-P, y S-I, z slices
    array = np.zeros((9, 200, 90), np.uint16)  # (z, y, x); y grows inferior
    y = 190  # bottom: L5/S1 disc, then L5 above it, ...
    for _ in range(5):
        array[2:7, y - 8 : y, 20:50] = values["disc"]
        y -= 8
        array[2:7, y - 25 : y, 18:52] = values["vertebra"]
        y -= 25
    array[2:7, y - 8 : y, 20:50] = values["disc"]  # T12/L1: L1 has a disc above it too
    array[3:6, y:190, 55:65] = values["canal"]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))  # PIR
    return image, {"vertebra": 25.0, "disc": 8.0, "canal_ap": 10.0}


def test_measure_script_reads_a_semantic_mask_by_the_configurations_labels(tmp_path):
    """The slab file's values (vertebrae 76, discs 29, canal 150): every vertebra row measures
    25 mm, every disc row 8 mm, named from L5/S1 upward."""
    mask, known = _spine_mask({"vertebra": 76, "disc": 29, "canal": 150})
    path = tmp_path / "slab.mha"
    sitk.WriteImage(mask, str(path))
    config = str(ROOT / "configuration_spider_slabs.txt")
    out = tmp_path / "out"
    assert measure_script.main([str(path), "--output-dir", str(out), "--config", config]) == 0
    table = pd.read_csv(out / "slab_instances.csv", keep_default_na=False)
    vertebrae = table[table["structure"] == "vertebra"].set_index("level")
    discs = table[table["structure"] == "disc"].set_index("level")
    assert sorted(vertebrae.index) == ["L1", "L2", "L3", "L4", "L5"]
    assert sorted(discs.index) == ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1", "T12/L1"]
    heights = pd.to_numeric(vertebrae["body_height_mm"])
    assert heights.between(known["vertebra"] - 1.5, known["vertebra"] + 1.5).all(), heights
    disc_heights = pd.to_numeric(discs["disc_height_mm"])
    assert disc_heights.between(known["disc"] - 1.5, known["disc"] + 1.5).all(), disc_heights
