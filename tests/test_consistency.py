"""Virtual images that leave out a masked particle are found."""

import numpy as np
import pytest

from tgan_ray.masks.consistency import (
    median_contrast,
    particle_contrast,
    shows_all_particles,
    undrawn_particles,
)


def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _pair(polarity: float):
    rng = np.random.default_rng(0)
    shape = (64, 64)
    drawn = [_disk(shape, (16, 16), 5), _disk(shape, (45, 20), 4)]
    missing = _disk(shape, (40, 48), 5)
    image = 0.5 + rng.normal(0, 0.02, shape)
    for d in drawn:
        image[d] += polarity * 0.3
    image[missing] += polarity * 0.02  # the generator all but left this one out
    mask = drawn[0] | drawn[1] | missing
    return image.astype(np.float32), mask, missing


@pytest.mark.parametrize("polarity", [1.0, -1.0])  # HAADF bright particles, BF-TEM dark ones
def test_a_particle_the_generator_left_out_is_found(polarity):
    image, mask, missing = _pair(polarity)
    contrast, labels = particle_contrast(image, mask)
    assert len(contrast) == 3 and labels.max() == 3
    reference = median_contrast([image], [mask & ~missing])
    assert reference == pytest.approx(polarity * 0.3, abs=0.03)

    assert not shows_all_particles(image, mask, reference, 0.3)
    assert shows_all_particles(image, mask & ~missing, reference, 0.3)
    # Drawn in the opposite polarity is not drawn either; 0 switches the check off.
    assert not shows_all_particles(image, mask & ~missing, -reference, 0.3)
    assert shows_all_particles(image, mask, reference, 0.0)
    # The pixels of the particle left out, and of no other (step 7 leaves them out of the loss).
    np.testing.assert_array_equal(undrawn_particles(image, mask, reference, 0.3), missing)
    assert not undrawn_particles(image, mask, reference, 0.0).any()


def test_empty_masks_and_particles_without_a_ring_are_kept():
    image = np.full((16, 16), 0.5, np.float32)
    empty = np.zeros((16, 16), bool)
    assert particle_contrast(image, empty)[0].size == 0
    full = np.ones((16, 16), bool)  # no support around it to compare with
    assert shows_all_particles(image, full, 0.2) and shows_all_particles(image, empty, 0.2)
    assert median_contrast([image], [empty]) == 0.0


@pytest.mark.parametrize("polarity", [1.0, -1.0])
def test_a_particle_painted_outside_the_mask_is_found_by_the_classical_segmenter(polarity):
    from tgan_ray.masks import ClassicalSegmenter
    from tgan_ray.masks.consistency import unmasked_particles

    image, mask, missing = _pair(polarity)
    image[missing] += polarity * 0.28  # now drawn, as strongly as the others
    painted = _disk(image.shape, (16, 48), 5)
    image[painted] += polarity * 0.3  # a particle the mask does not have
    contrast = "bright" if polarity > 0 else "dark"
    candidates = ClassicalSegmenter(contrast, confidence=0.0).segment(image, 5.0)
    unsure = unmasked_particles(candidates, mask)
    assert unsure[painted].mean() > 0.8
    assert not (unsure & mask).any()  # a blob touching a masked particle keeps its label
    assert not unmasked_particles(candidates, mask | painted).any()
