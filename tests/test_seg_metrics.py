"""Segmentation metrics on tiny masks whose scores are computed by hand in each test."""

import numpy as np
import pytest

from tgan_ray.metrics.segmentation import (
    aggregate,
    box_detection_scores,
    box_iou,
    dice,
    instance_iou_matrix,
    match_by_iou,
    mean_iou,
    object_scores,
    particle_iou,
    pixel_accuracy,
    segmentation_scores,
)

# 3x3 case: tp = 2 ((0,0), (1,1)), fp = 1 ((0,1)), fn = 1 ((1,2)), tn = 5.
PRED = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
GT = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])


def test_pixel_metrics_by_hand():
    assert pixel_accuracy(PRED, GT) == pytest.approx(7 / 9)
    assert particle_iou(PRED, GT) == pytest.approx(2 / 4)
    # IoU_background = tn / (tn + fp + fn) = 5 / 7; MIoU = (1/2 + 5/7) / 2.
    assert mean_iou(PRED, GT) == pytest.approx((0.5 + 5 / 7) / 2)
    assert dice(PRED, GT) == pytest.approx(4 / 6)


def test_absent_class_counts_as_iou_one():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    assert mean_iou(empty, empty) == 1.0 and particle_iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0
    assert mean_iou(full, full) == 1.0  # no background anywhere: IoU_background = 1
    # Everything missed: particle IoU 0, background IoU 12/16, PA 12/16.
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    assert particle_iou(empty, gt) == 0.0 and dice(empty, gt) == 0.0
    assert mean_iou(empty, gt) == pytest.approx((0 + 12 / 16) / 2)
    assert pixel_accuracy(empty, gt) == pytest.approx(12 / 16)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(4, 4\)"):
        pixel_accuracy(PRED, np.zeros((4, 4)))


def _scene():
    """Reference: A (found), B (missed), C (split in two by the prediction). Prediction adds D."""
    gt = np.zeros((40, 40), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:8, 2:8] = pred[2:8, 2:8] = 1  # A: exact
    gt[2:8, 20:26] = 1  # B: missed
    gt[20:24, 2:8] = 1  # C: 4x6 = 24 px
    pred[20:24, 2:4] = 1  # C left piece: IoU 8/24
    pred[20:24, 6:8] = 1  # C right piece: IoU 8/24
    pred[30:36, 30:36] = 1  # D: extra
    return pred, gt


def test_object_scores_missed_extra_split():
    pred, gt = _scene()
    s = object_scores(pred, gt)
    # tp = A; fp = two C pieces + D; fn = B + C.
    assert (s["tp"], s["fp"], s["fn"]) == (1, 3, 2)
    assert s["precision"] == pytest.approx(1 / 4)
    assert s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(2 * 1 / (2 * 1 + 3 + 2))


def test_object_scores_threshold_is_inclusive_and_label_maps_kept():
    gt = np.zeros((10, 10), np.int32)
    gt[2:6, 2:4] = 1
    gt[2:6, 4:6] = 2  # two touching instances
    assert object_scores(gt.copy(), gt)["tp"] == 2
    # The binary prediction is one blob: IoU 8/16 = 0.5 with each, so exactly one match at threshold 0.5.
    s = object_scores(gt > 0, gt)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
    assert object_scores(gt > 0, gt, iou_threshold=0.51)["tp"] == 0


def test_object_scores_empty_both_is_perfect():
    s = object_scores(np.zeros((5, 5)), np.zeros((5, 5)))
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)


def test_match_by_iou_prefers_more_matches():
    # Greedy on the best pair (0.9) would leave one match; two matches (0.4 + 0.5) are better.
    iou = np.array([[0.9, 0.4], [0.5, 0.0]])
    ref, pred = match_by_iou(iou, iou_threshold=0.3)
    assert sorted(zip(ref.tolist(), pred.tolist(), strict=True)) == [(0, 1), (1, 0)]
    ref, pred = match_by_iou(iou, iou_threshold=0.5)
    assert sorted(zip(ref.tolist(), pred.tolist(), strict=True)) == [(0, 0)]


def test_segmentation_scores_and_aggregate_micro_average():
    pred, gt = _scene()
    one = segmentation_scores(pred, gt)
    assert {"pa", "miou", "iou", "dice", "precision", "recall", "f1"} <= set(one)
    two = segmentation_scores(PRED, GT)
    total = aggregate([one, two])
    tp, fp, fn = one["tp_px"] + 2, one["fp_px"] + 1, one["fn_px"] + 1
    tn = 40 * 40 + 9 - tp - fp - fn
    assert total["pa"] == pytest.approx((tp + tn) / (40 * 40 + 9))
    assert total["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert total["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # PRED/GT objects: (0,0)-(0,1)-(1,1) vs (0,0)-(1,1)-(1,2) (8-connected): IoU 2/4 -> one match.
    assert (total["tp"], total["fp"], total["fn"]) == (1 + 1, 3, 2)
    assert total["n_images"] == 2
    with pytest.raises(KeyError, match="segmentation_scores"):
        aggregate([{"pa": 1.0}])


def test_box_iou_by_hand():
    assert box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3]])[0, 0] == pytest.approx(1 / 7)
    assert box_iou([[0, 0, 2, 2]], [[5, 5, 6, 6]])[0, 0] == 0.0


def test_box_detection_scores():
    mask = np.zeros((50, 50), bool)
    mask[5:15, 5:15] = True  # box (5, 5, 15, 15): exact reference
    mask[30:40, 5:15] = True  # box (5, 30, 15, 40): reference shifted by 2 px -> IoU 80/120
    mask[30:36, 30:36] = True  # no reference box: fp
    boxes = [[5, 5, 15, 15], [7, 30, 17, 40], [30, 5, 40, 12]]  # the last has no particle: fn
    s = box_detection_scores(mask, boxes)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert box_detection_scores(mask, boxes, iou_threshold=0.7)["tp"] == 1
    assert box_detection_scores(np.zeros((5, 5)), np.zeros((0, 4)))["f1"] == 1.0
    with pytest.raises(ValueError, match="boxes_xyxy"):
        box_detection_scores(mask, [[1, 2, 3]])


def test_instance_iou_matrix_is_every_pair_iou_and_empty_maps_give_empty_matrices():
    """It counts overlaps on the labelled pixels only; the result must be each pair's IoU over the whole frame."""
    from skimage.measure import label

    rng = np.random.default_rng(3)
    ref, pred = label(rng.random((48, 40)) > 0.7), label(rng.random((48, 40)) > 0.6)
    ref[ref == 3] = 0  # a gap in the label values: rows follow the labels that exist, ascending
    iou = instance_iou_matrix(ref, pred)
    ref_ids, pred_ids = np.unique(ref[ref > 0]), np.unique(pred[pred > 0])
    assert iou.shape == (ref_ids.size, pred_ids.size)
    for i, a in enumerate(ref_ids):
        for j, b in enumerate(pred_ids):
            inter, union = np.sum((ref == a) & (pred == b)), np.sum((ref == a) | (pred == b))
            assert iou[i, j] == inter / union
    empty = np.zeros_like(ref)
    assert instance_iou_matrix(empty, empty).shape == (0, 0)
    assert instance_iou_matrix(empty, pred).shape == (0, pred_ids.size)
    assert instance_iou_matrix(ref, empty).shape == (ref_ids.size, 0)
