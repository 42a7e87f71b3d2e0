"""Step 4: random masks drawn from the morphology prior.

Each mask draws a particle count from the prior's densities, particle shapes resampled jointly from its
measurements (with kernel jitter), and centres that are Poisson or clustered like the rough masks; particles are
then placed one by one without overlapping. Masks are reproducible from (seed, index) alone
(:func:`sample_mask_at`), so shards run in parallel, and :func:`sample_capped_mask_at` keeps sparse stacks from
giving mostly empty masks. The prior itself is measured in :mod:`tgan_ray.masks.prior`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import stats
from skimage.draw import polygon

if TYPE_CHECKING:  # only for annotations: prior.py imports this module
    from tgan_ray.masks.prior import MorphologyPrior

BorderPolicy = Literal["clip", "exclude"]
_HARMONICS = np.arange(3, 9)  # boundary wiggles; harmonic 2 is the ellipse itself
_MAX_TRIES = 20  # placements tried per particle before it is dropped (a crowded frame)
_OVERLAP_TOLERANCE = 0.05  # fraction of a particle that may land on its neighbours' 1-px halo


def _bandwidth(x: np.ndarray) -> float:
    """Half of Silverman's rule: enough jitter that no particle is copied, little enough to keep the shape."""
    spread = min(np.std(x), stats.iqr(x) / 1.34) if len(x) > 1 else 0.0
    return 0.5 * 0.9 * (spread if spread > 0 else 0.1) * len(x) ** -0.2


def _draw_shapes(prior: MorphologyPrior, n: int, rng: np.random.Generator) -> np.ndarray:
    """Resample (diameter, axis ratio, roughness, orientation) rows jointly, with kernel jitter in log space.

    Returns:
        (n, 4): semi-axes a >= b (px), orientation (rad), roughness amplitude.
    """
    p = prior.particles
    table = np.column_stack(
        [np.log(p["diameter"]), np.log(p["axis_ratio"]), np.log(np.add(p["roughness"], 1e-3))]
    )
    rows = rng.integers(0, len(table), n)
    jitter = rng.normal(0.0, [_bandwidth(col) for col in table.T], (n, 3))
    diameter = np.exp(table[rows, 0] + jitter[:, 0])
    axis_ratio = np.exp(np.abs(table[rows, 1] + jitter[:, 1]))  # reflected at 1: major >= minor
    roughness = np.maximum(np.exp(table[rows, 2] + jitter[:, 2]) - 1e-3, 0.0)
    orientation = np.asarray(p["orientation"])[rows] + rng.normal(0.0, 0.1, n)
    a, b = diameter / 2 * np.sqrt(axis_ratio), diameter / 2 / np.sqrt(axis_ratio)
    # A rasterised smooth ellipse already measures ~0.45/d rough (pixel steps): draw only the excess.
    roughness = np.sqrt(np.maximum(roughness**2 - (0.45 / diameter) ** 2, 0.0))
    return np.column_stack([a, b, orientation, roughness])


def _outline(
    cy: float, cx: float, shape_row: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of a rough-edged ellipse: radial Fourier wiggles (harmonics 3-8, 1/k amplitudes) on an ellipse."""
    a, b, orientation, roughness = shape_row
    t = np.linspace(0, 2 * np.pi, int(np.clip(4 * a, 12, 128)), endpoint=False)
    rho = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    weights = 1.0 / _HARMONICS
    amplitude = roughness * np.sqrt(2) * weights / np.sqrt(np.sum(weights**2))  # RMS of the sum = roughness
    phase = rng.uniform(0, 2 * np.pi, len(_HARMONICS))
    rho = rho * np.maximum(
        1 + (amplitude[:, None] * np.cos(_HARMONICS[:, None] * t + phase[:, None])).sum(0), 0.3
    )
    along, across = rho * np.cos(t), rho * np.sin(t)
    return (
        cy + along * np.cos(orientation) - across * np.sin(orientation),
        cx + along * np.sin(orientation) + across * np.cos(orientation),
    )


def _centres(n: int, shape: tuple[int, int], sigma: float | None, offspring: float, rng: np.random.Generator):
    """Poisson centres, or a Thomas cluster process; returns (centres (n, 2), a redraw function per point)."""
    h, w = shape
    if sigma is None:

        def redraw(_: int) -> np.ndarray:
            return rng.uniform((0, 0), (h, w))

        return rng.uniform((0, 0), (h, w), (n, 2)), redraw
    parents = rng.uniform((0, 0), (h, w), (max(1, rng.poisson(n / offspring)), 2))
    owner = rng.integers(0, len(parents), n)

    def redraw(i: int) -> np.ndarray:  # a new spot in the same cluster; wrapped so density stays uniform
        return (parents[owner[i]] + rng.normal(0, sigma, 2)) % (h, w)

    return (parents[owner] + rng.normal(0, sigma, (n, 2))) % (h, w), redraw


def sample_mask(
    prior: MorphologyPrior,
    size: int | tuple[int, int],
    rng: np.random.Generator,
    border_policy: BorderPolicy = "clip",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one random mask whose particles follow the prior.

    The count is Poisson around a resampled per-image density times the area; shapes are resampled jointly with
    jitter; centres are Poisson or clustered to match the Clark-Evans ratio; a particle that would overlap its
    neighbours (beyond a 1-px gap, ``_OVERLAP_TOLERANCE``) or, with ``border_policy='exclude'``, cross the
    border is placed again (up to ``_MAX_TRIES`` times, then dropped).

    Args:
        prior: The morphology prior.
        size: Side, or (height, width), px at the rough masks' scale.
        rng: Random generator.
        border_policy: 'clip' particles at the border as real frames do, or 'exclude' them.

    Returns:
        (mask, labels): bool mask with touching particles kept 1 px apart, and int32 labels (0 = background).

    Shape:
        (H, W), (H, W).
    """
    if border_policy not in ("clip", "exclude"):
        raise ValueError(f"border_policy={border_policy!r}; choose clip or exclude")
    h, w = (int(size), int(size)) if np.isscalar(size) else tuple(int(v) for v in size)
    if h < 4 or w < 4:
        raise ValueError(f"mask size {size} is too small (at least 4 px a side)")
    return draw_mask(prior, (h, w), rng, border_policy, prior.cluster_sigma)


def draw_mask(
    prior: MorphologyPrior,
    shape: tuple[int, int],
    rng: np.random.Generator,
    border_policy: str,
    sigma: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The body of :func:`sample_mask`: (H, W) already checked, cluster spread in px given (None: Poisson).

    The prior's fitting calls it with trial spreads (``_calibrate_cluster_sigma`` in :mod:`tgan_ray.masks.prior`).
    """
    h, w = shape
    density = rng.choice(prior.densities) * np.exp(rng.normal(0.0, 0.1))
    n = int(rng.poisson(density * h * w))
    shapes = _draw_shapes(prior, n, rng) if n else np.zeros((0, 4))
    centres, redraw = _centres(n, (h, w), sigma, prior.offspring, rng)
    labels = np.zeros((h, w), np.int32)
    halo = np.zeros((h + 2, w + 2), bool)  # particles grown by 1 px, offset by 1 px for the border
    drawn = 0
    for i in range(n):
        centre = centres[i]
        for _ in range(_MAX_TRIES):
            ry, rx = _outline(*centre, shapes[i], rng)
            inside = ry.min() >= 0 and rx.min() >= 0 and ry.max() <= h - 1 and rx.max() <= w - 1
            rr, cc = polygon(ry, rx, (h, w))
            if not len(rr) and 0 <= centre[0] < h and 0 <= centre[1] < w:
                rr, cc = np.array([int(centre[0])]), np.array([int(centre[1])])  # sub-pixel particle
            taken = halo[rr + 1, cc + 1]
            if (
                len(rr)
                and (inside or border_policy == "clip")
                and taken.sum() <= _OVERLAP_TOLERANCE * len(rr)
            ):
                drawn += 1
                rr, cc = rr[~taken], cc[~taken]
                labels[rr, cc] = drawn
                for dy in (0, 1, 2):
                    for dx in (0, 1, 2):
                        halo[rr + dy, cc + dx] = True
                break
            centre = redraw(i)
    return labels > 0, labels


def sample_mask_at(
    prior: MorphologyPrior,
    size: int | tuple[int, int],
    seed: int,
    index: int,
    border_policy: BorderPolicy = "clip",
) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``index`` of the stream ``seed``: reproducible from (seed, index) alone, so shards run in parallel."""
    return sample_mask(prior, size, np.random.default_rng([int(seed), int(index)]), border_policy)


# Key of the draw that decides whether a mask may stay empty; redraws use (seed, index, 1..MAX_EMPTY_REDRAWS), and
# (seed, index) alone is the first draw. A non-zero key: SeedSequence pads with zeros, so [s, i, 0] == [s, i].
_EMPTY_ALLOWANCE_KEY = 0x454D5054
MAX_EMPTY_REDRAWS = 50


def sample_capped_mask_at(
    prior: MorphologyPrior,
    size: int | tuple[int, int],
    seed: int,
    index: int,
    max_empty_fraction: float = 1.0,
    border_policy: BorderPolicy = "clip",
) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``index`` of the stream ``seed``, where at most about ``max_empty_fraction`` of the masks are empty.

    Sparse stacks leave most small tiles without a particle, and a segmenter trained on such pairs learns to
    find nothing. Index ``i`` may keep an empty first draw only if a uniform draw from (seed, i) is below
    ``max_empty_fraction``; otherwise empty draws are redrawn from (seed, i, attempt), up to
    ``MAX_EMPTY_REDRAWS`` times. The rule is per index, so each mask stays reproducible from (seed, index)
    alone and shards stay independent. The expected share of empty masks is P(empty draw) x
    ``max_empty_fraction`` (plus the tiny chance that every redraw is empty); 1.0 gives
    :func:`sample_mask_at`'s stream unchanged.

    Args:
        prior: The morphology prior.
        size: Side, or (height, width), px.
        seed: Stream seed (non-negative).
        index: Mask index (non-negative).
        max_empty_fraction: Chance, in [0, 1], that an index may stay empty (``prior.max_empty_fraction``).
        border_policy: 'clip' or 'exclude' (see :func:`sample_mask`).

    Returns:
        (mask, labels) as :func:`sample_mask`.
    """
    if not 0.0 <= max_empty_fraction <= 1.0:
        raise ValueError(f"max_empty_fraction={max_empty_fraction} must be within [0, 1]")
    mask, labels = sample_mask_at(prior, size, seed, index, border_policy)
    if mask.any() or max_empty_fraction >= 1.0:
        return mask, labels
    if np.random.default_rng([int(seed), int(index), _EMPTY_ALLOWANCE_KEY]).random() < max_empty_fraction:
        return mask, labels
    for attempt in range(1, MAX_EMPTY_REDRAWS + 1):
        rng = np.random.default_rng([int(seed), int(index), attempt])
        mask, labels = sample_mask(prior, size, rng, border_policy)
        if mask.any():
            break
    return mask, labels


def sample_masks(
    prior: MorphologyPrior,
    n: int,
    size: int | tuple[int, int],
    seed: int = 0,
    border_policy: BorderPolicy = "clip",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Masks 0..n-1 of the stream ``seed`` (see :func:`sample_mask_at`), lazily: (mask, labels) pairs."""
    for index in range(n):
        yield sample_mask_at(prior, size, seed, index, border_policy)
