"""Segmentation scores: pixel-level (PA, MIoU, IoU, Dice) and object-level (matched particles).

Definitions follow the paper (arXiv 2407.19544) for the two classes background (0) and particle (1):

- PA   = correctly classified pixels / all pixels.
- IoU_c = |pred_c ∩ gt_c| / |pred_c ∪ gt_c|; MIoU = (IoU_background + IoU_particle) / 2.
  A class absent from both prediction and reference has nothing to get wrong, so its IoU counts as 1
  (an empty frame predicted empty scores MIoU 1, not NaN).
- Dice = 2|pred ∩ gt| / (|pred| + |gt|) of the particle class, 1 when both are empty.
- Object scores match connected particles one-to-one at IoU >= 0.5 (Hungarian assignment):
  precision = tp / (tp + fp), recall = tp / (tp + fn), F1 their harmonic mean. With no particle in either
  prediction or reference all three are 1; otherwise a 0/0 ratio is 0.

The segmenter stage's validation scores its virtual pairs with these numpy functions too (object matching needs
whole masks), so there is no torch version to keep in step with them.

    scores = segmentation_scores(pred_mask, gt_mask)       # {'pa', 'miou', 'iou', 'dice', 'precision', ...}
    overall = aggregate([scores_img1, scores_img2])        # micro-averaged over images
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from skimage.measure import label, regionprops

PIXEL_COUNT_KEYS = ("tp_px", "fp_px", "fn_px", "tn_px")
OBJECT_COUNT_KEYS = ("tp", "fp", "fn")


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    if pred.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {pred.shape}")
    return pred, gt


def to_instance_labels(mask: np.ndarray) -> np.ndarray:
    """Label map of particles: a binary mask is split into connected components, a label map is kept.

    Args:
        mask: bool / {0, 1} mask, or an integer label map (0 = background) whose labels are already instances
            (e.g. the output of ``split_touching``), which keeps touching particles apart.

    Returns:
        int32 label map, 0 = background, 1..n = particles. Shape: (H, W).
    """
    mask = np.asarray(mask)
    if mask.dtype == bool or mask.max(initial=0) <= 1:
        return label(mask > 0, connectivity=2).astype(np.int32)
    return mask.astype(np.int32)


def pixel_counts(pred: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """Confusion counts of the particle class (any non-zero value is particle).

    Shape:
        pred, gt: (H, W).

    Returns:
        ``{'tp_px', 'fp_px', 'fn_px', 'tn_px'}`` pixel counts.
    """
    pred, gt = _check_pair(pred, gt)
    p, g = pred > 0, gt > 0
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p & ~g))
    fn = int(np.count_nonzero(~p & g))
    return {"tp_px": tp, "fp_px": fp, "fn_px": fn, "tn_px": int(p.size) - tp - fp - fn}


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den > 0 else empty


def scores_from_pixel_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """PA, MIoU, particle IoU, background IoU and Dice from confusion counts (conventions: module docstring)."""
    total = tp + fp + fn + tn
    iou_particle = _ratio(tp, tp + fp + fn, 1.0)
    iou_background = _ratio(tn, tn + fp + fn, 1.0)
    return {
        "pa": _ratio(tp + tn, total, 1.0),
        "miou": (iou_particle + iou_background) / 2.0,
        "iou": iou_particle,
        "iou_background": iou_background,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
    }


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """PA: correctly classified pixels / all pixels. Shape: (H, W) each."""
    return scores_from_pixel_counts(*pixel_counts(pred, gt).values())["pa"]


def mean_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """MIoU over background and particle (a class absent from both counts as IoU 1). Shape: (H, W) each."""
    return scores_from_pixel_counts(*pixel_counts(pred, gt).values())["miou"]


def particle_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of the particle class (1 when both masks are empty). Shape: (H, W) each."""
    return scores_from_pixel_counts(*pixel_counts(pred, gt).values())["iou"]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice (F1 over pixels) of the particle class (1 when both masks are empty). Shape: (H, W) each."""
    return scores_from_pixel_counts(*pixel_counts(pred, gt).values())["dice"]


def scores_from_object_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 from matched-object counts (all 1 when there is no object at all)."""
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    return {
        "precision": _ratio(tp, tp + fp, 0.0),
        "recall": _ratio(tp, tp + fn, 0.0),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0),
    }


def match_by_iou(iou: np.ndarray, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of pairs with IoU >= ``iou_threshold``: the most matches, then the highest total IoU.

    Args:
        iou: IoU of reference i with prediction j. Shape: (n_ref, n_pred).
        iou_threshold: smallest IoU that counts as a match.

    Returns:
        (ref_index, pred_index) of the matched pairs, each of shape (n_matches,).
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    empty = np.zeros(0, dtype=np.int64)
    candidates = iou >= iou_threshold
    rows, cols = np.flatnonzero(candidates.any(1)), np.flatnonzero(candidates.any(0))
    if rows.size == 0:
        return empty, empty
    # Hungarian assignment only on the rows/columns that have a candidate: usually a tiny sub-matrix.
    # Each candidate pair is worth more than any sum of IoUs (<= 1 each), so the number of matches comes first
    # (matters below IoU 0.5, where one particle can be a candidate for several).
    bonus = float(min(rows.size, cols.size))
    sub = np.where(candidates[np.ix_(rows, cols)], iou[np.ix_(rows, cols)] + bonus, 0.0)
    r, c = linear_sum_assignment(sub, maximize=True)
    keep = candidates[rows[r], cols[c]]
    return rows[r[keep]], cols[c[keep]]


def instance_iou_matrix(ref_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """IoU between every reference and predicted instance, from their pixel overlaps (no per-pair masks).

    Shape:
        ref_labels, pred_labels: (H, W) label maps, 0 = background. Returns (n_ref, n_pred), where labels are
        re-indexed in ascending order of their value.
    """
    # Only pixels of some instance can overlap: particles cover a few percent of a frame, and unique() sorts.
    either = (np.asarray(ref_labels) != 0) | (np.asarray(pred_labels) != 0)
    if not either.any():
        return np.zeros((0, 0))
    ref_ids, ref_inv = np.unique(np.asarray(ref_labels)[either], return_inverse=True)
    pred_ids, pred_inv = np.unique(np.asarray(pred_labels)[either], return_inverse=True)
    # A sparse co-occurrence table gives all intersections in one pass over the pixels.
    overlap = sparse.coo_matrix(
        (np.ones(ref_inv.size, dtype=np.int64), (ref_inv.ravel(), pred_inv.ravel())),
        shape=(ref_ids.size, pred_ids.size),
    ).tocsr()
    ref_area = np.asarray(overlap.sum(1)).ravel()
    pred_area = np.asarray(overlap.sum(0)).ravel()
    ref_fg, pred_fg = ref_ids != 0, pred_ids != 0
    inter = overlap[ref_fg][:, pred_fg].tocoo()
    iou = np.zeros((int(ref_fg.sum()), int(pred_fg.sum())))
    union = ref_area[ref_fg][inter.row] + pred_area[pred_fg][inter.col] - inter.data
    iou[inter.row, inter.col] = inter.data / union
    return iou


def object_scores(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """Particle-level precision / recall / F1 with one-to-one matching at IoU >= ``iou_threshold``.

    Args:
        pred: predicted mask or label map (see :func:`to_instance_labels`).
        gt: reference mask or label map.
        iou_threshold: smallest IoU for a predicted particle to count as finding a reference particle.

    Shape:
        pred, gt: (H, W).

    Returns:
        ``{'precision', 'recall', 'f1', 'tp', 'fp', 'fn'}``.
    """
    pred, gt = _check_pair(pred, gt)
    pred_labels, gt_labels = to_instance_labels(pred), to_instance_labels(gt)
    iou = instance_iou_matrix(gt_labels, pred_labels)
    matched, _ = match_by_iou(iou, iou_threshold)
    tp = int(matched.size)
    fp, fn = iou.shape[1] - tp, iou.shape[0] - tp
    return {**scores_from_object_counts(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}


def segmentation_scores(
    pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float | int]:
    """All pixel and object scores of one image, plus the counts :func:`aggregate` needs.

    Shape:
        pred, gt: (H, W); any non-zero value is particle (label maps keep touching particles apart).

    Returns:
        ``{'pa', 'miou', 'iou', 'iou_background', 'dice', 'precision', 'recall', 'f1',
        'tp_px', 'fp_px', 'fn_px', 'tn_px', 'tp', 'fp', 'fn'}``.
    """
    counts = pixel_counts(pred, gt)
    return {**scores_from_pixel_counts(*counts.values()), **object_scores(pred, gt, iou_threshold), **counts}


def aggregate(per_image: Iterable[dict]) -> dict[str, float | int]:
    """Combine per-image scores: pixel metrics from summed confusion counts (micro average), object metrics
    from summed tp/fp/fn. Each dict must come from :func:`segmentation_scores`.

    Returns:
        The same keys as :func:`segmentation_scores`, plus ``'n_images'``.
    """
    items = list(per_image)
    totals = dict.fromkeys(PIXEL_COUNT_KEYS + OBJECT_COUNT_KEYS, 0)
    for i, scores in enumerate(items):
        missing = [k for k in totals if k not in scores]
        if missing:
            raise KeyError(f"scores #{i} lack count key(s) {missing}; build them with segmentation_scores()")
        for k in totals:
            totals[k] += int(scores[k])
    pixel = scores_from_pixel_counts(*(totals[k] for k in PIXEL_COUNT_KEYS))
    objects = scores_from_object_counts(*(totals[k] for k in OBJECT_COUNT_KEYS))
    return {**pixel, **objects, **totals, "n_images": len(items)}


def _boxes_of(labels: np.ndarray) -> np.ndarray:
    # regionprops bbox is (min_row, min_col, max_row, max_col), max exclusive -> (x0, y0, x1, y1).
    boxes = [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regionprops(labels)]
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of axis-aligned boxes (x0, y0, x1, y1).

    Same formula as ``torchvision.ops.box_iou``; written in numpy so box scores need no tensors.

    Shape:
        a: (n, 4), b: (m, 4). Returns (n, m).
    """
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_detection_scores(
    pred_mask: np.ndarray, boxes_xyxy: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float | int]:
    """Detection scores against reference bounding boxes, for data labelled with boxes only.

    Each predicted particle's bounding box is matched one-to-one (Hungarian, maximum total IoU) to a reference
    box with box IoU >= ``iou_threshold``.

    Args:
        pred_mask: predicted mask or label map (see :func:`to_instance_labels`).
        boxes_xyxy: reference boxes in pixels, (x0, y0, x1, y1) with x = column, y = row, and x1/y1 one past
            the last pixel (the ``regionprops`` convention). Shape: (n, 4).
        iou_threshold: smallest box IoU that counts as a detection.

    Returns:
        ``{'precision', 'recall', 'f1', 'tp', 'fp', 'fn'}``.
    """
    pred_mask = np.asarray(pred_mask)
    if pred_mask.ndim != 2:
        raise ValueError(f"pred_mask must be 2-D (H, W), got shape {pred_mask.shape}")
    ref = np.asarray(boxes_xyxy, dtype=float)
    if ref.size and (ref.ndim != 2 or ref.shape[1] != 4):
        raise ValueError(f"boxes_xyxy must have shape (n, 4), got {ref.shape}")
    ref = ref.reshape(-1, 4)
    if np.any(ref[:, 2:] < ref[:, :2]):
        raise ValueError("boxes_xyxy holds a box with x1 < x0 or y1 < y0; expected (x0, y0, x1, y1)")
    pred_boxes = _boxes_of(to_instance_labels(pred_mask))
    matched, _ = match_by_iou(box_iou(ref, pred_boxes), iou_threshold)
    tp = int(matched.size)
    fp, fn = len(pred_boxes) - tp, len(ref) - tp
    return {**scores_from_object_counts(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}
