"""The working scale: real frames, normalised and rescaled to the scale the networks train and predict at.

- ``resize`` mode (paper): each frame's long side becomes ``data.image_size``: one tile per frame.
- ``tile`` mode: frames are rescaled by ``data.scale`` and cut into ``image_size`` tiles; large micrographs keep
  their small particles instead of shrinking them away.
Sizes are always reported back in the original calibration: ``pixel_size_nm / scale`` at the working scale.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import rescale, resize

from tgan_ray.config import DataConfig

# Gaussian smoothing (px) whose residual is taken as pixel noise (noise_std).
NOISE_SMOOTHING_PX = 1.5


def working_scale(shape: tuple[int, int], cfg: DataConfig) -> float:
    """Factor from original pixels to working pixels for a frame of this shape."""
    if cfg.resize_mode == "resize":
        return cfg.image_size / max(shape)
    return cfg.scale


def frame_scales(stack_scale: float, diameters: list[float | None], tolerance: float | None) -> list[float]:
    """Each frame's working scale: the stack's, unless its particles say it was taken at another magnification.

    A frame whose measured particle diameter (at the stack's scale) is more than ``tolerance`` times larger or
    smaller than the median frame's is rescaled so that its particles come to the median frame's size: the
    networks then meet particles of the size they learnt. Within the tolerance, frames keep one scale, so that
    real size differences of one series (sintering, growth) survive. None diameters (too few particles to
    measure) and ``tolerance=None`` keep the stack's scale.
    """
    measured = [x for x in diameters if x]
    if tolerance is None or not measured:
        return [stack_scale] * len(diameters)
    typical = float(np.median(measured))
    out = []
    for x in diameters:
        off = bool(x) and max(x / typical, typical / x) > tolerance
        out.append(float(np.clip(stack_scale * typical / x, 1 / 16, 4)) if off else stack_scale)
    return out


def to_working(image: np.ndarray, scale: float) -> np.ndarray:
    """Rescale a normalised frame (float32 [0, 1]) by ``scale`` (anti-aliased when shrinking)."""
    if abs(scale - 1.0) < 1e-6:
        return image.astype(np.float32, copy=False)
    return rescale(image, scale, order=1, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32)


def to_original(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Map a working-scale probability map back to the original frame's pixels."""
    if prob.shape == tuple(shape):
        return prob
    return resize(prob, shape, order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(size - a.shape[0], 0), max(size - a.shape[1], 0)
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw)), mode="reflect" if min(a.shape) > 1 else "edge")
    return a


def random_crops(
    images: list[np.ndarray],
    size: int,
    n_total: int,
    rng: np.random.Generator,
    masks: list[np.ndarray] | None = None,
    positive_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``n_total`` square crops spread evenly over the images (padded by reflection when smaller).

    With masks, ``positive_fraction`` of the crops are drawn around a particle pixel of the mask:
    in a sparse stack most tiles are empty, and a GAN that rarely sees a particle never learns to draw one.

    Returns:
        (crops N x size x size float32, mask crops N x size x size uint8 or None).
    """
    out_i, out_m = [], []
    for k in range(n_total):
        j = k % len(images)
        img = _pad_to(images[j], size)
        m = _pad_to(masks[j].astype(np.uint8), size) if masks is not None else None
        if m is not None and k < positive_fraction * n_total and (m == 1).any():
            # Draw around a random particle pixel (1; a pseudo-label's unsure pixels are not particles): any
            # crop position that still contains it.
            ys, xs = np.nonzero(m == 1)
            p = rng.integers(len(ys))
            y = rng.integers(max(0, ys[p] - size + 1), min(ys[p], img.shape[0] - size) + 1)
            x = rng.integers(max(0, xs[p] - size + 1), min(xs[p], img.shape[1] - size) + 1)
        else:
            y = rng.integers(0, img.shape[0] - size + 1)
            x = rng.integers(0, img.shape[1] - size + 1)
        out_i.append(img[y : y + size, x : x + size])
        if m is not None:
            out_m.append(m[y : y + size, x : x + size])
    crops = np.stack(out_i).astype(np.float32)
    return crops, (np.stack(out_m).astype(np.uint8) if masks is not None else None)


def noise_std(images) -> float:
    """Median pixel-noise std of images (float [0, 1]): robust spread of what Gaussian smoothing removes.

    Not ``skimage.restoration.estimate_sigma``: its wavelet estimate assumes independent pixels, and frames
    rescaled to the working scale carry interpolated, correlated noise, which it underestimates 3-4x. The median
    absolute deviation of ``image - gaussian(image, 1.5 px)`` ignores the particles and support edges (a
    minority of pixels) and measures real and virtual images alike.

    Args:
        images: iterable of 2-D arrays at one scale (working-scale frames, or virtual images).

    Returns:
        The median over images of the estimate; 0.0 for no images.
    """
    from scipy.ndimage import gaussian_filter

    sigmas = []
    for a in images:
        a = np.asarray(a, dtype=np.float32)
        residual = a - gaussian_filter(a, NOISE_SMOOTHING_PX)
        sigmas.append(1.4826 * float(np.median(np.abs(residual - np.median(residual)))))
    return float(np.median(sigmas)) if sigmas else 0.0


def missing_noise_std(real, virtual) -> float:
    """The Gaussian noise std that, added to the virtual images, gives them the real images' noise level."""
    return float(np.sqrt(max(noise_std(real) ** 2 - noise_std(virtual) ** 2, 0.0)))
