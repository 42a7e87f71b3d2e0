"""Albumentations pipelines of the paper: Flip, ShiftScaleRotate, GaussNoise (p=0.5 each), test = identity.

Images are float32 (H, W) in [0, 1]; masks are uint8 (H, W). Geometric steps move image and mask together (the
mask with nearest-neighbour interpolation, so it stays binary); noise touches the image only.

The paper used albumentations 1.x names. In 2.0, ``Flip`` is gone and ``ShiftScaleRotate`` warns that it is a
special case of ``Affine``; the equivalents below keep the 1.x behaviour and defaults.

    aug = train_transform()
    out = aug(image=image, mask=mask)   # out["image"], out["mask"]
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

# albumentations 1.x ShiftScaleRotate defaults, which the paper used.
SHIFT_LIMIT = 0.0625
SCALE_LIMIT = 0.1
ROTATE_LIMIT = 45.0
# 1.x GaussNoise default var_limit=(10, 50) on 0..255 images, i.e. std sqrt(10)/255 .. sqrt(50)/255 on [0, 1].
NOISE_STD_RANGE = (10**0.5 / 255, 50**0.5 / 255)
# Exposure jitter of the segmenter's virtual images (see segmenter_transform).
BRIGHTNESS_LIMIT = 0.2
CONTRAST_LIMIT = 0.3
GAMMA_LIMIT = (70, 150)


def paper_flip(p: float = 0.5) -> A.BasicTransform:
    """albumentations 1.x ``Flip``: with probability p, flip horizontally, vertically or both (equally likely)."""
    return A.OneOf(
        [
            A.HorizontalFlip(p=1.0),
            A.VerticalFlip(p=1.0),
            A.Sequential([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)], p=1.0),
        ],
        p=p,
    )


def shift_scale_rotate(
    p: float = 0.5,
    shift_limit: float = SHIFT_LIMIT,
    scale_limit: float = SCALE_LIMIT,
    rotate_limit: float = ROTATE_LIMIT,
) -> A.BasicTransform:
    """1.x ``ShiftScaleRotate`` as ``A.Affine``; borders are reflected so no black corners look like support."""
    return A.Affine(
        translate_percent=(-shift_limit, shift_limit),
        scale=(1 - scale_limit, 1 + scale_limit),
        rotate=(-rotate_limit, rotate_limit),
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=cv2.BORDER_REFLECT_101,
        p=p,
    )


def train_transform(
    p: float = 0.5, noise_std_range: tuple[float, float] = NOISE_STD_RANGE, seed: int | None = None
) -> A.Compose:
    """Paper training augmentation: Flip, ShiftScaleRotate, GaussNoise, each with probability ``p``, in order.

    Args:
        p: Probability of each step (paper: 0.5).
        noise_std_range: Gaussian noise std as a fraction of the [0, 1] range (image only; output is clipped).
        seed: Seed of the pipeline's own random generator (None: random).

    Returns:
        Pipeline called as ``aug(image=float32 HxW, mask=uint8 HxW)``.
    """
    pipeline = A.Compose(
        [
            paper_flip(p),
            shift_scale_rotate(p),
            A.GaussNoise(std_range=noise_std_range, mean_range=(0.0, 0.0), p=p),
        ]
    )
    if seed is not None:
        reseed(pipeline, seed)
    return pipeline


def segmenter_transform(noise_std: float | None = None, p: float = 0.5, seed: int | None = None) -> A.Compose:
    """NPsSegNet training augmentation for virtual images: the paper's, plus exposure jitter and real noise.

    GAN images at small training budgets are smoother than the micrographs and span less of their exposure
    range (support thickness and detector gain vary between frames). A segmenter trained on them alone mistakes
    shot-noise specks for particles. So brightness, contrast and gamma vary, and the Gaussian noise is the noise
    the virtual images lack compared with the real stack (the pipeline measures it), not the paper's fixed range.

    Args:
        noise_std: Pixel noise std (fraction of [0, 1]) to add; each item draws from [0.75, 1.5] x this, with
            probability 0.9 (added noise is uncorrelated, so it hides particles less than the real, rescaled
            noise of the same std: the range leans high). None: the paper's GaussNoise. 0: no added noise (real frames have their own).
        p: Probability of each geometric step (paper: 0.5).
        seed: Seed of the pipeline's own random generator (None: random).

    Returns:
        Pipeline called as ``aug(image=float32 HxW, mask=uint8 HxW)``.
    """
    if noise_std is None:
        noise = A.GaussNoise(std_range=NOISE_STD_RANGE, mean_range=(0.0, 0.0), p=p)
    elif noise_std > 0:
        noise = A.GaussNoise(std_range=(0.75 * noise_std, 1.5 * noise_std), mean_range=(0.0, 0.0), p=0.9)
    else:
        noise = A.NoOp()
    pipeline = A.Compose(
        [
            paper_flip(p),
            shift_scale_rotate(p),
            A.RandomBrightnessContrast(
                brightness_limit=BRIGHTNESS_LIMIT, contrast_limit=CONTRAST_LIMIT, p=0.8
            ),
            A.RandomGamma(gamma_limit=GAMMA_LIMIT, p=0.5),
            noise,
        ]
    )
    if seed is not None:
        reseed(pipeline, seed)
    return pipeline


def reseed(pipeline: A.BaseCompose, seed: int) -> None:
    """Give a pipeline one shared, seeded random stream.

    Not ``A.Compose(seed=...)``: albumentations 2.0.8 hands that same seed to every child, so the children
    start on identical streams (two flips with the same p then always fire together). Reseeding per item also
    keeps DataLoader workers (forked copies of one generator) from repeating each other's augmentations.
    """
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def test_transform() -> A.Compose:
    """Test pipeline: identity. Normalisation to [0, 1] happens when images are loaded (paper: only normalised)."""
    return A.Compose([])
