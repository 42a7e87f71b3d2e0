"""Bootstrap intervals of the PSD: coverage of the true values on synthetic stacks, exact weighted quantiles,
and their place in psd_summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tgan_ray.analysis.bootstrap import _weighted_quantiles, bootstrap_psd
from tgan_ray.analysis.psd import psd_summary

# Synthetic stacks: ln d = ln 10 nm + image effect (sd 0.1: focus, thickness) + particle scatter (sd 0.25).
# Pooled over images, d is lognormal with sigma = hypot(0.1, 0.25), so every true value is known exactly.
MU, SD_IMAGE, SD_PARTICLE = np.log(10.0), 0.1, 0.25
SIGMA = np.hypot(SD_IMAGE, SD_PARTICLE)
TRUTH = {
    "mean": np.exp(MU + SIGMA**2 / 2),
    "median": np.exp(MU),
    "d10": np.exp(MU + stats.norm.ppf(0.1) * SIGMA),
    "d50": np.exp(MU),
    "d90": np.exp(MU + stats.norm.ppf(0.9) * SIGMA),
}


def _stack(seed: int, n_images: int = 25, per_image: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    effect = rng.normal(0, SD_IMAGE, n_images)
    image = np.repeat(np.arange(n_images), rng.poisson(per_image, n_images))
    return np.exp(MU + effect[image] + rng.normal(0, SD_PARTICLE, image.size)), image


def _covers(interval: dict, truth: float) -> bool:
    return interval["low"] <= truth <= interval["high"]


def test_mean_interval_covers_the_true_mean_in_about_95_percent_of_stacks():
    seeds = range(200)
    stacks = [_stack(seed) for seed in seeds]
    by_image = [
        _covers(bootstrap_psd(d, im, seed=s, statistics=("mean",))["mean"], TRUTH["mean"])
        for s, (d, im) in zip(seeds, stacks)
    ]
    assert 0.88 <= np.mean(by_image) <= 0.99
    # Particles of one image are not independent: resampling them ignores the image effect and undercovers.
    by_particle = [
        _covers(bootstrap_psd(d, None, resamples=200, seed=s, statistics=("mean",))["mean"], TRUTH["mean"])
        for s, (d, _) in zip(seeds[:100], stacks)
    ]
    assert np.mean(by_particle) < 0.8


def test_median_and_d10_d50_d90_intervals_cover_the_truth():
    seeds = range(100)
    covered = dict.fromkeys(TRUTH, 0)
    for seed in seeds:
        d, image = _stack(1000 + seed, n_images=20)
        intervals = bootstrap_psd(d, image, resamples=500, seed=seed)
        assert intervals["resampled"] == "images" and intervals["units"] == 20
        for key, truth in TRUTH.items():
            covered[key] += _covers(intervals[key], truth)
    rates = {k: v / len(seeds) for k, v in covered.items()}
    assert all(0.85 <= r <= 0.99 for r in rates.values()), rates


def test_weighted_quantiles_equal_numpy_on_the_repeated_sample():
    rng = np.random.default_rng(1)
    d = np.sort(rng.lognormal(2, 0.3, 50))
    weights = rng.integers(0, 4, (30, 50))
    weights[:, 7] += 1  # no empty resample
    qs = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]
    got = _weighted_quantiles(d, weights, qs)
    for row in range(len(weights)):
        np.testing.assert_allclose(got[:, row], np.quantile(np.repeat(d, weights[row]), qs))


def test_intervals_are_seeded_and_bracket_the_estimate():
    d, image = _stack(7)
    a = bootstrap_psd(d, image, seed=3)
    assert a == bootstrap_psd(d, image, seed=3) and a != bootstrap_psd(d, image, seed=4)
    point = {
        "mean": d.mean(),
        **{k: np.quantile(d, q) for k, q in (("median", 0.5), ("d10", 0.1), ("d90", 0.9))},
    }
    for key, value in point.items():
        assert a[key]["low"] < value < a[key]["high"], key


def test_psd_summary_carries_intervals_per_image_resampling():
    d, image = _stack(11, n_images=6)
    df = pd.DataFrame(
        {
            "image": [f"img_{i}" for i in image],
            "equivalent_diameter": d,
            "touches_border": False,
            "unit": "nm",
        }
    )
    df.loc[0, "touches_border"] = True  # cut by the frame: not in the sizes, nor in their intervals
    summary = psd_summary(df)
    intervals = summary["intervals"]
    assert (intervals["resampled"], intervals["units"], intervals["resamples"]) == ("images", 6, 1000)
    assert intervals == bootstrap_psd(d[1:], image[1:])
    assert intervals["mean"]["low"] < summary["mean"] < intervals["mean"]["high"]

    one = psd_summary(df[df.image == "img_0"])  # one image: its particles are what can be resampled
    assert one["intervals"]["resampled"] == "particles"
    assert psd_summary(df.iloc[:2])["intervals"] is None  # one interior particle: no spread to resample
    assert psd_summary(df, resamples=0)["intervals"] is None


def test_too_few_particles_or_bad_arguments():
    assert bootstrap_psd([5.0], ["a"]) is None
    assert bootstrap_psd([], []) is None
    with pytest.raises(ValueError, match="unknown statistic"):
        bootstrap_psd([1.0, 2.0], statistics=("mode",))
    with pytest.raises(ValueError, match="2 image labels for 3 diameters"):
        bootstrap_psd([1.0, 2.0, 3.0], ["a", "b"])
