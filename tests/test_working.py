"""The working scale and the crops GANs train on."""

import numpy as np
import pytest

from tgan_ray.config import DataConfig
from tgan_ray.data.working import (
    frame_scales,
    missing_noise_std,
    noise_std,
    random_crops,
    to_original,
    to_working,
    working_scale,
)


def test_positive_crops_find_the_rare_particles():
    image = np.zeros((512, 512), np.float32)
    mask = np.zeros((512, 512), bool)
    mask[400:410, 30:40] = True  # one particle in a big, otherwise empty frame
    rng = np.random.default_rng(0)
    _, surely = random_crops([image], 64, 20, rng, [mask], positive_fraction=1.0)
    assert all(m.any() for m in surely)
    _, plain = random_crops([image], 64, 20, np.random.default_rng(0), [mask], positive_fraction=0.0)
    assert sum(m.any() for m in plain) < 10


def test_scale_rules_and_round_trip():
    assert working_scale((1024, 512), DataConfig(image_size=512, resize_mode="resize")) == 0.5
    assert working_scale((1024, 512), DataConfig(image_size=64, resize_mode="tile", scale=0.25)) == 0.25
    frame = np.random.default_rng(1).random((100, 80)).astype(np.float32)
    small = to_working(frame, 0.5)
    assert small.shape == (50, 40)
    assert to_original(small, frame.shape).shape == frame.shape


def test_a_frame_taken_at_another_magnification_gets_its_own_scale():
    # particles of one series vary (sintering): within 1.5x of the median frame, one scale for all
    assert frame_scales(0.5, [10.0, 12.0, 14.0, 9.0], 1.5) == [0.5] * 4
    # a frame whose particles measure 3x the others' was taken at 3x the magnification: shrunk to match
    scales = frame_scales(0.5, [10.0, 11.0, 30.0, None, 10.0], 1.5)
    assert scales[:2] == [0.5, 0.5] and scales[3:] == [0.5, 0.5]  # None: too few particles to tell
    assert scales[2] == pytest.approx(0.5 * 10.5 / 30.0)
    assert frame_scales(0.5, [10.0, 30.0], None) == [0.5, 0.5]  # switched off
    assert frame_scales(0.5, [None, None], 1.5) == [0.5, 0.5]


def test_noise_std_measures_pixel_noise_beside_structure():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    clean = (0.3 + 0.2 * np.sin(xx / 9.0) + 0.4 * (((yy - 64) ** 2 + (xx - 40) ** 2) < 100)).astype(
        np.float32
    )
    real = [clean + rng.normal(0, 0.05, clean.shape).astype(np.float32) for _ in range(3)]
    virtual = [clean + rng.normal(0, 0.03, clean.shape).astype(np.float32) for _ in range(3)]
    assert noise_std(real) == pytest.approx(0.05, rel=0.15)
    assert missing_noise_std(real, virtual) == pytest.approx(0.04, rel=0.2)
    assert missing_noise_std(virtual, real) == 0.0  # never negative: smoother real frames need no noise
    assert noise_std([]) == 0.0
