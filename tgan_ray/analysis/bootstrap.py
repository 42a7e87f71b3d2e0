"""Bootstrap confidence intervals of the PSD (mean, median, d10 / d50 / d90 of the equivalent diameter).

Particles of one image share its focus, support thickness and local history, so they are not independent
samples: resampling single particles gives intervals that are far too narrow. The unit resampled is therefore
the image: draw as many images as there are, with replacement, pool their particles, recompute the statistics.
With a single image there is nothing to resample between images and particles are resampled instead
(``resampled: 'particles'`` says so).

    intervals = bootstrap_psd(df.equivalent_diameter, df.image, resamples=1000, seed=0)
    intervals["mean"]   # {'low': 11.8, 'high': 12.9}

Vectorised: a draw is a row of image multiplicities, the mean is a matrix product and the
quantiles are weighted quantiles over the particles sorted once, in chunks of bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

STATISTICS = ("mean", "median", "d10", "d50", "d90")
QUANTILES = {"median": 0.5, "d10": 0.1, "d50": 0.5, "d90": 0.9}
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
_CHUNK_CELLS = 2**21  # resamples x particles held at once (int64: 16 MB)


def _weighted_quantiles(sorted_d: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles of each row's sample, where particle j appears ``weights[row, j]`` times.

    Exactly ``np.quantile`` (linear method) of the sample written out with its repeats.

    Shape:
        sorted_d: (n,) ascending; weights: (b, n) non-negative integers. Returns (len(qs), b).
    """
    cum = np.cumsum(weights, axis=1)
    size = cum[:, -1]
    # One searchsorted over all rows: shift each row above the previous so the flat array stays sorted.
    shift = np.arange(len(cum), dtype=np.int64) * (int(size.max()) + 1)
    flat = (cum + shift[:, None]).ravel()
    n = sorted_d.size

    def order_statistic(k: np.ndarray) -> np.ndarray:  # 0-based k-th smallest of each row
        j = np.searchsorted(flat, k + shift, side="right") - np.arange(len(cum)) * n
        return sorted_d[j]

    out = []
    for q in qs:
        h = (size - 1) * q
        low = np.floor(h).astype(np.int64)
        below, above = order_statistic(low), order_statistic(np.minimum(low + 1, size - 1))
        out.append(below + (h - low) * (above - below))
    return np.asarray(out)


def bootstrap_psd(
    diameters: Sequence[float] | np.ndarray,
    images: Sequence[Any] | np.ndarray | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    statistics: Sequence[str] = STATISTICS,
) -> dict[str, Any] | None:
    """Percentile-bootstrap intervals of the mean and quantiles of ``diameters``, resampling images.

    Args:
        diameters: one size per particle. Shape: (n,).
        images: the image of each particle (any hashable labels); None resamples particles.
        resamples: bootstrap draws.
        level: coverage of each interval, e.g. 0.95.
        seed: the random generator's seed (same inputs, same seed: same intervals).
        statistics: which of ``STATISTICS`` to compute.

    Returns:
        ``{'level', 'resamples', 'resampled' ('images' | 'particles'), 'units' (how many were resampled),
        'seed', <statistic>: {'low', 'high'}}``, or None with fewer than 2 particles (no spread to resample).
    """
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistic(s) {sorted(unknown)}; choose from {STATISTICS}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    d = np.asarray(diameters, dtype=float)
    groups = np.arange(d.size) if images is None else np.asarray(images)
    if groups.shape != d.shape:
        raise ValueError(f"{groups.size} image labels for {d.size} diameters")
    finite = np.isfinite(d)
    d, groups = d[finite], groups[finite]
    if d.size < 2 or resamples < 1:
        return None
    codes = np.unique(groups, return_inverse=True)[1].ravel()
    resampled = "images"
    if images is None or codes.max() == 0:  # one image: particles are the only replicates there are
        codes, resampled = np.arange(d.size), "particles"
    n_units = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    # Row b: how often each image is drawn when n_units images are drawn with replacement.
    picks = rng.integers(0, n_units, (resamples, n_units))
    rows = np.arange(resamples)[:, None] * n_units
    draws = np.bincount((picks + rows).ravel(), minlength=resamples * n_units).reshape(resamples, n_units)

    boot: dict[str, np.ndarray] = {}
    if "mean" in statistics:
        sums, counts = np.bincount(codes, d, n_units), np.bincount(codes, minlength=n_units)
        as_float = draws.astype(np.float64)  # BLAS products; integer matmul is many times slower
        boot["mean"] = (as_float @ sums) / (as_float @ counts.astype(np.float64))
    wanted = [s for s in statistics if s in QUANTILES]
    if wanted:
        order = np.argsort(d, kind="stable")
        sorted_d, sorted_codes = d[order], codes[order]
        rows = max(1, _CHUNK_CELLS // d.size)
        chunks = [
            _weighted_quantiles(
                sorted_d, draws[i : i + rows][:, sorted_codes], [QUANTILES[s] for s in wanted]
            )
            for i in range(0, resamples, rows)
        ]
        for s, values in zip(wanted, np.concatenate(chunks, axis=1), strict=True):
            boot[s] = values
    tails = [(1 - level) / 2, (1 + level) / 2]
    out: dict[str, Any] = {
        "level": level,
        "resamples": int(resamples),
        "resampled": resampled,
        "units": n_units,
        "seed": int(seed),
    }
    for s in statistics:
        low, high = np.quantile(boot[s], tails)
        out[s] = {"low": float(low), "high": float(high)}
    return out
