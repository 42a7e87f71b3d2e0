"""Steps 2 and 4: rough masks of subset 1, and random masks from their morphology prior."""

from tgan_ray.masks.prior import (
    MorphologyPrior,
    compare_to_prior,
    sample_mask,
    sample_mask_at,
    sample_masks,
)
from tgan_ray.masks.rough import (
    ClassicalSegmenter,
    NoParticlesError,
    SamSegmenter,
    check_masks,
    create_rough_segmenter,
)

__all__ = [
    "ClassicalSegmenter",
    "MorphologyPrior",
    "NoParticlesError",
    "SamSegmenter",
    "check_masks",
    "compare_to_prior",
    "create_rough_segmenter",
    "sample_mask",
    "sample_mask_at",
    "sample_masks",
]
