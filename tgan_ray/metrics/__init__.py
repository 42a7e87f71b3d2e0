"""Scores for segmentations (PA, MIoU, IoU, Dice, particle matching) and, in ``gan``, for generated images.

The GAN scores (FID, KID, IS, SSIM, PSNR) are exported lazily: they pull in torch, torchvision, torch-fidelity and
torchmetrics, which a caller that only scores masks should not pay for.
"""

from tgan_ray.metrics.segmentation import (
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

_GAN_EXTRACTOR_EXPORTS = (
    "EXTRACTORS",
    "MissingWeightsError",
    "RandomResNetFeatures",
    "build_feature_extractor",
    "extractor_label",
)
_GAN_SCORE_EXPORTS = (
    "GANMetricWarning",
    "fid_from_features",
    "image_quality",
    "is_from_logits",
    "kid_from_features",
    "paired_quality",
)

__all__ = [
    "aggregate",
    "box_detection_scores",
    "box_iou",
    "dice",
    "mean_iou",
    "object_scores",
    "particle_iou",
    "pixel_accuracy",
    "segmentation_scores",
    *_GAN_EXTRACTOR_EXPORTS,
    *_GAN_SCORE_EXPORTS,
]


def __getattr__(name: str):
    if name in _GAN_EXTRACTOR_EXPORTS:
        from tgan_ray.metrics import gan_extractors

        return getattr(gan_extractors, name)
    if name in _GAN_SCORE_EXPORTS:
        from tgan_ray.metrics import gan

        return getattr(gan, name)
    raise AttributeError(f"module 'tgan_ray.metrics' has no attribute {name!r}")
