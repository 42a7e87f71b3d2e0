"""Steps 2 and 4: rough masks of subset 1, and random masks from their morphology prior."""

from tgan_ray.masks.classical import ClassicalSegmenter
from tgan_ray.masks.prior import MorphologyPrior, compare_to_prior
from tgan_ray.masks.rough import NoParticlesError, SamSegmenter, check_masks, create_rough_segmenter
from tgan_ray.masks.sampling import sample_mask, sample_mask_at, sample_masks

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
