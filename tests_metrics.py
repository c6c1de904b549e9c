"""Metric values derived independently of the project's code: by hand, or from scipy and
scikit-learn (`python -m pytest` collects this file with tests.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn.metrics import accuracy_score, f1_score

from metrics import confusion_matrix, scores_from_confusion
from spider_metrics import spider_instances
from test_unet import case_metrics, overlap_and_distances

SPACING = (0.5, 1.0, 2.0)  # x, y, z in mm: every axis different, so a swapped axis shows
FACES = ndimage.generate_binary_structure(3, 1)
FULL = ndimage.generate_binary_structure(3, 3)


def _image(array: np.ndarray, spacing=SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    return image


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its face-connected erosion (outside = background)."""
    return mask & ~ndimage.binary_erosion(mask, FACES, border_value=0)


def _directed(from_mask: np.ndarray, to_mask: np.ndarray) -> np.ndarray:
    """Distances (mm, voxel centre to voxel centre) from each surface voxel of `from_mask` to
    the nearest boundary voxel of `to_mask`, by scipy's exact Euclidean distance transform.
    The boundary distances are measured to is the full-connectivity one (a voxel with any
    background neighbour), as ITK's signed Maurer distance map takes it."""
    boundary = to_mask & ~ndimage.binary_erosion(to_mask, FULL, border_value=0)
    distance = ndimage.distance_transform_edt(~boundary, sampling=SPACING[::-1])
    return distance[_surface(from_mask)]


def _box_with_far_blob(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: a box (1256 surface voxels). Prediction: the same box and a far cube blob
    of `side` voxels (side 5: 98 surface voxels, 7 % of the prediction's surface: above 5 %
    of one direction, below 5 % of both directions pooled)."""
    reference = np.zeros((24, 40, 60), bool)
    reference[4:12, 5:25, 5:25] = True
    prediction = reference.copy()
    prediction[14 : 14 + side, 28 : 28 + side, 45 : 45 + side] = True
    return prediction, reference


def test_hd95_is_the_larger_of_the_two_directed_95th_percentiles():
    prediction, reference = _box_with_far_blob(5)
    to_reference = _directed(prediction, reference)
    to_prediction = _directed(reference, prediction)
    assert to_prediction.max() == 0  # every reference surface voxel is a prediction one
    blob_share = (to_reference > 0).mean()
    assert 0.05 < blob_share < 0.10  # the case separates the definitions
    expected = max(np.percentile(to_reference, 95), np.percentile(to_prediction, 95))
    pooled = np.percentile(np.concatenate([to_reference, to_prediction]), 95)
    assert expected > 10 and pooled == 0  # a pooled HD95 would say the masks agree
    scores = overlap_and_distances(_image(prediction), _image(reference))
    assert scores["hd95_mm"] == pytest.approx(expected, rel=1e-6)
    # symmetric: the metric does not depend on which mask is called the prediction
    swapped = overlap_and_distances(_image(reference), _image(prediction))
    assert swapped["hd95_mm"] == pytest.approx(expected, rel=1e-6)


def test_assd_is_the_mean_over_both_directions_together():
    prediction, reference = _box_with_far_blob(7)
    to_reference = _directed(prediction, reference)
    to_prediction = _directed(reference, prediction)
    expected = np.concatenate([to_reference, to_prediction]).mean()
    # the mean of the two directed means differs: their surfaces differ in size
    assert abs(expected - (to_reference.mean() + to_prediction.mean()) / 2) > 0.05
    scores = overlap_and_distances(_image(prediction), _image(reference))
    assert scores["assd_mm"] == pytest.approx(expected, rel=1e-6)
    both = np.logical_and(prediction, reference).sum()
    assert scores["dice"] == pytest.approx(2 * both / (prediction.sum() + reference.sum()))


def test_case_metrics_score_each_class_on_its_own():
    rng = np.random.default_rng(3)
    reference = np.zeros((12, 20, 20), np.uint8)
    reference[2:10, 3:17, 3:9] = 1
    reference[2:10, 3:17, 11:17] = 2
    reference[5:7, 8:12, 9:11] = 3
    prediction = reference.copy()
    flip = rng.random(reference.shape) < 0.1
    prediction[flip] = rng.integers(0, 4, int(flip.sum()))
    rows = case_metrics(_image(prediction), _image(reference), ("bg", "a", "b", "c"))
    assert [row["class"] for row in rows] == ["a", "b", "c"]
    for index, row in enumerate(rows, 1):
        p, r = prediction == index, reference == index
        assert row["dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
        assert row["reference_voxels"] == r.sum() and row["predicted_voxels"] == p.sum()
        expected = max(np.percentile(_directed(p, r), 95), np.percentile(_directed(r, p), 95))
        assert row["hd95_mm"] == pytest.approx(expected, rel=1e-6)


def test_training_scores_match_scikit_learn():
    """Accuracy, macro F1 and per-class Dice from the confusion matrix, against scikit-learn's
    definitions on the same labels (Dice of a class = its F1)."""
    rng = np.random.default_rng(0)
    target = rng.choice(4, size=(3, 5, 7, 9), p=[0.7, 0.15, 0.1, 0.05])
    pred = np.where(rng.random(target.shape) < 0.3, rng.integers(0, 4, target.shape), target)
    pred[pred == 3] = 2  # class 3 never predicted: its Dice is 0, not NaN
    counts = confusion_matrix(torch_tensor(pred), torch_tensor(target), 5).numpy()
    assert counts.sum() == target.size and counts[4].sum() == 0 and counts[:, 4].sum() == 0
    assert counts[1, 2] == np.sum((target == 1) & (pred == 2))  # rows true, columns predicted
    scores = scores_from_confusion(counts)
    flat_true, flat_pred = target.ravel(), pred.ravel()
    per_class = f1_score(flat_true, flat_pred, labels=[0, 1, 2, 3], average=None, zero_division=0)
    np.testing.assert_allclose(scores["dice"][:4], per_class, rtol=1e-12)
    assert np.isnan(scores["dice"][4])  # absent from both
    assert scores["accuracy"] == pytest.approx(accuracy_score(flat_true, flat_pred))
    assert scores["f1_macro"] == pytest.approx(f1_score(flat_true, flat_pred, average="macro"))


def torch_tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def test_spider_asd_and_dice_per_instance_against_scipy():
    """SPIDER's rules: each reference label against the prediction label overlapping it most;
    borders by a full-connectivity erosion; ASD the mean of both directions' distances pooled."""
    full = ndimage.generate_binary_structure(3, 3)
    reference = np.zeros((20, 30, 30), np.uint16)
    reference[3:9, 4:20, 4:20] = 1  # L5
    reference[11:17, 4:20, 4:20] = 201  # the L5/S1 disc
    prediction = np.zeros_like(reference)
    prediction[4:10, 4:20, 5:21] = 7  # L5 under another label, shifted
    prediction[11:16, 4:20, 4:20] = 201
    table = spider_instances(_image(reference), _image(prediction)).set_index("label")
    for label, predicted_label in ((1, 7), (201, 201)):
        r, p = reference == label, prediction == predicted_label
        assert table.loc[label, "dice"] == pytest.approx(2 * (r & p).sum() / (r.sum() + p.sum()))
        borders = [m & ~ndimage.binary_erosion(m, full, border_value=0) for m in (r, p)]
        maps = [ndimage.distance_transform_edt(~b, sampling=SPACING[::-1]) for b in borders]
        pooled = np.concatenate([maps[1][borders[0]], maps[0][borders[1]]])
        assert table.loc[label, "asd_mm"] == pytest.approx(pooled.mean(), rel=1e-6)


def test_a_class_seen_once_on_one_side_scores_dice_zero_not_nan():
    """Dice is NaN only for a class absent from both truth and prediction: one voxel predicted
    where the truth has none gives 0."""
    confusion = np.array([[5, 1, 0], [0, 3, 0], [0, 0, 0]])  # class 2 in neither
    confusion[0, 1] = 0
    confusion[0, 2] = 1  # one background voxel predicted as class 2
    scores = scores_from_confusion(confusion)
    assert scores["dice"][2] == 0.0
    assert scores["dice"][1] == 1.0 and scores["f1_macro"] == pytest.approx((10 / 11 + 1) / 3)
    assert np.isnan(scores_from_confusion(np.diag([4, 2, 0]))["dice"][2])


def test_surfaces_are_face_connected_boundaries_of_any_shape():
    """A ball (not a box, where every boundary definition agrees) shifted against another: the
    surface is the voxels with a background face neighbour; a one-voxel reference works too;
    one empty mask gives NaN distances."""
    z, y, x = np.mgrid[:24, :24, :24]
    reference = (z - 12) ** 2 + (y - 11.5) ** 2 + (x - 12.3) ** 2 <= 49
    prediction = (z - 12) ** 2 + (y - 12.5) ** 2 + (x - 13.3) ** 2 <= 56
    scores = overlap_and_distances(_image(prediction), _image(reference))
    forward, backward = _directed(prediction, reference), _directed(reference, prediction)
    expected = max(np.percentile(forward, 95), np.percentile(backward, 95))
    assert scores["hd95_mm"] == pytest.approx(expected, rel=1e-6)
    assert scores["assd_mm"] == pytest.approx(np.concatenate([forward, backward]).mean())
    dot = np.zeros_like(reference)
    dot[12, 12, 12] = True
    one = overlap_and_distances(_image(prediction), _image(dot))
    distances = _directed(prediction, dot)
    assert one["hd95_mm"] == pytest.approx(max(np.percentile(distances, 95), 0.0))
    empty = overlap_and_distances(_image(prediction), _image(np.zeros_like(dot)))
    assert empty["dice"] == 0 and np.isnan(empty["hd95_mm"]) and np.isnan(empty["assd_mm"])


def test_case_metrics_of_a_class_absent_from_both():
    reference = np.zeros((4, 6, 6), np.uint8)
    reference[1:3, 1:4, 1:4] = 1
    rows = case_metrics(_image(reference), _image(reference), ("bg", "a", "b"))
    assert rows[1] == {
        "class": "b",
        "dice": 1.0,
        "hd95_mm": 0.0,
        "assd_mm": 0.0,
        "reference_voxels": 0,
        "predicted_voxels": 0,
    }


def test_spider_borders_reach_the_edge_of_the_array():
    """Instances touching the first and last voxels of the array: outside counts as
    background, so their faces there are border voxels, and the ASD is scipy's."""
    full = ndimage.generate_binary_structure(3, 3)
    reference = np.zeros((8, 12, 12), np.uint16)
    reference[0:4, 0:6, 0:12] = 1
    prediction = np.zeros_like(reference)
    prediction[0:5, 0:7, 0:12] = 1
    table = spider_instances(_image(reference), _image(prediction)).set_index("label")
    r, p = reference == 1, prediction == 1
    borders = [m & ~ndimage.binary_erosion(m, full, border_value=0) for m in (r, p)]
    maps = [ndimage.distance_transform_edt(~b, sampling=SPACING[::-1]) for b in borders]
    pooled = np.concatenate([maps[1][borders[0]], maps[0][borders[1]]])
    assert table.loc[1, "asd_mm"] == pytest.approx(pooled.mean(), rel=1e-6)


def test_spider_labels_must_not_be_negative_and_partial_vertebrae_share_the_level():
    from spider_metrics import _level_key

    signed = np.zeros((4, 6, 6), np.int16)
    signed[1:3, 1:4, 1:4] = 1
    fine = sitk.GetImageFromArray(signed)  # signed, from 0 up: a valid mask
    assert fine.GetPixelID() == sitk.sitkInt16
    assert len(spider_instances(fine, fine)) == 1
    signed[0, 0, 0] = -1
    image = sitk.GetImageFromArray(signed)
    with pytest.raises(ValueError, match="reference mask has negative label -1"):
        spider_instances(image, image)
    assert [_level_key(v) for v in (100, 101, 125, 126, 201)] == [100, 1, 25, 126, 201]
