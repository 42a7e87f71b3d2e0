"""Scores for segmentations (PA, MIoU, IoU, Dice, particle matching) and, in ``gan``, for generated images."""

from tgan_ray.metrics.segmentation import (
    PixelMetrics,
    aggregate,
    box_detection_scores,
    box_iou,
    dice,
    mean_iou,
    object_scores,
    particle_iou,
    pixel_accuracy,
    segmentation_scores,
)

__all__ = [
    "PixelMetrics",
    "aggregate",
    "box_detection_scores",
    "box_iou",
    "dice",
    "mean_iou",
    "object_scores",
    "particle_iou",
    "pixel_accuracy",
    "segmentation_scores",
]
