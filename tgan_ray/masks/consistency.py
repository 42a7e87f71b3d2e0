"""Do the virtual images show the particles their masks promise? (between steps 6 and 7)

A generator trained for minutes sometimes leaves a masked particle out: CycleGAN in particular can fade it into
the support. Such a pair teaches NPsSegNet that a particle looks like background. Each particle's contrast against
a thin ring of support around it is compared with the real particles' contrast (rough masks on real frames); the
pipeline then takes, pair by pair, a generation that shows every particle of the mask.

    reference = median_contrast(real_frames, rough_masks)
    ok = shows_all_particles(image, mask, reference, min_fraction=0.3)

(Taking the undrawn particles out of the masks instead was tried: the segmenter then learned that faint
particles are support, and its recall on a low-SNR stack fell from 0.43-0.68 to 0.20.) Where neither generation
drew a particle, step 7 leaves it out of the loss instead (``segmenter.ignore_undrawn``): it is neither taught
as a particle that looks like support nor as support.

    undrawn = undrawn_particles(image, mask, reference, min_fraction=0.3)

The other way round, a generator also paints particles its mask does not hold: pix2pix learned from rough masks
that leave real particles unlabelled, so it learned that support sometimes grows a particle. Those blobs are left
out of the segmenter's loss, as the unsure regions of the real pseudo-labels are (``masks/pseudo.py``):

    unsure = unmasked_particles(candidates, mask)   # candidates: the classical segmenter's loosest mask
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label

from tgan_ray.masks.particle_labels import expand_labels_near, labelled_stat

# Width of the support ring around each particle, px at the working scale.
RING_PX = 3


def particle_contrast(
    image: np.ndarray, mask: np.ndarray, ring_px: int = RING_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity inside each particle minus that of the ring of support around it.

    Args:
        image: (H, W) float in [0, 1].
        mask: (H, W) bool particle mask.
        ring_px: ring width; rings stop where they meet another particle's (``expand_labels_near``).

    Returns:
        (contrast per particle (K,), labels (H, W) int, particle k = label k + 1).
    """
    labels = label(mask)
    if labels.max() == 0:
        return np.zeros(0, np.float32), labels
    ring = np.where(mask, 0, expand_labels_near(labels, ring_px))
    index = np.arange(1, labels.max() + 1)
    inside = labelled_stat(ndi.mean, image, labels, index)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty ring gives 0/0: handled below
        around = labelled_stat(ndi.mean, image, ring, index)
    # A particle filling its whole tile has no ring: nothing to compare, so it counts as drawn.
    return np.nan_to_num(inside - around, nan=np.inf).astype(np.float32), labels


def median_contrast(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Signed median particle contrast over images (positive: bright particles, as in HAADF; negative: BF-TEM)."""
    values = [particle_contrast(i, m)[0] for i, m in zip(images, masks, strict=True)]
    values = np.concatenate(values) if values else np.zeros(0)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else 0.0


def shows_all_particles(
    image: np.ndarray, mask: np.ndarray, reference: float, min_fraction: float = 0.3
) -> bool:
    """Whether every particle of ``mask`` stands out in ``image`` as the real ones do.

    Args:
        image: (H, W) virtual image in [0, 1].
        mask: (H, W) its mask.
        reference: the real particles' signed median contrast (:func:`median_contrast`); 0 disables the check.
        min_fraction: a particle is drawn when its contrast, in the reference's sign, is at least this fraction
            of the reference.

    Returns:
        True when each particle is drawn (always for an empty mask, or with the check disabled).
    """
    return not undrawn_particles(image, mask, reference, min_fraction).any()


def undrawn_particles(
    image: np.ndarray, mask: np.ndarray, reference: float, min_fraction: float = 0.3, ring_px: int = RING_PX
) -> np.ndarray:
    """The particles of ``mask`` that ``image`` does not show (arguments as :func:`shows_all_particles`).

    ``ring_px``: the support ring's width; ``RING_PX`` at the working scale, ``RING_PX / scale`` on a frame at its
    own resolution.

    Returns:
        (H, W) bool, the pixels of the masked particles whose contrast falls short (none with the check disabled).
    """
    mask = np.asarray(mask) > 0
    if reference == 0 or min_fraction <= 0:
        return np.zeros_like(mask)
    contrast, labels = particle_contrast(image, mask, ring_px)
    short = np.flatnonzero(np.sign(reference) * contrast < min_fraction * abs(reference)) + 1
    return np.isin(labels, short)


def unmasked_particles(candidates: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The candidate blobs of a virtual image that touch no particle of its mask.

    Args:
        candidates: (H, W) bool, what the classical segmenter finds in the image at its loosest setting.
        mask: (H, W) the image's mask.

    Returns:
        (H, W) bool, the blobs the generator painted without a masked particle under them.
    """
    blobs = label(np.asarray(candidates, bool))
    masked = np.unique(blobs[(np.asarray(mask) > 0) & (blobs > 0)])
    return (blobs > 0) & ~np.isin(blobs, masked)
