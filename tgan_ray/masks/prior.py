"""Steps 2 -> 4: the morphology prior of the rough masks, and random masks that follow it.

The paper's step 4 samples "many random masks whose particle statistics (size, shape, density, spacing) follow
the rough masks". :class:`MorphologyPrior` measures those statistics; :func:`sample_mask` draws a new mask:

    prior = MorphologyPrior.from_masks(rough_masks)
    mask, labels = sample_mask_at(prior, 512, seed=0, index=7)    # reproducible from (seed, index) alone
    ks = compare_to_prior(prior, [sample_mask_at(prior, 512, 0, i)[0] for i in range(200)])

Masks are generated at the pixel scale of the rough masks; the caller resizes. Conventions:

- Particles touching a frame border are cut, so they are left out of the size and shape statistics (as are
  specks under 3 px), but they are counted for the number density (they are there) and as neighbours for the
  spacing.
- Spacing is the nearest-neighbour distance between centroids; clustering is the Clark-Evans ratio
  R = mean NN distance / (0.5 / sqrt(density)): 1 for a Poisson pattern, < 1 clustered, > 1 regular.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats
from scipy.spatial import cKDTree
from skimage.draw import polygon
from skimage.measure import find_contours, label, regionprops

from tgan_ray.masks.rough import NoParticlesError

BorderPolicy = Literal["clip", "exclude"]
FEATURES = ("area", "diameter", "axis_ratio", "eccentricity", "solidity", "orientation", "roughness")
_HARMONICS = np.arange(3, 9)  # boundary wiggles; harmonic 2 is the ellipse itself
_MAX_TRIES = 20  # placements tried per particle before it is dropped (a crowded frame)
_OVERLAP_TOLERANCE = 0.05  # fraction of a particle that may land on its neighbours' 1-px halo


def _roughness(region, ellipse_axes: tuple[float, float], orientation: float) -> float:
    """RMS relative deviation of the boundary from the particle's inertia ellipse (0 for a perfect ellipse)."""
    padded = np.pad(region.image, 1).astype(float)
    contour = max(find_contours(padded, 0.5), key=len)
    cy, cx = (np.asarray(region.centroid) - region.bbox[:2] + 1).tolist()
    dy, dx = contour[:, 0] - cy, contour[:, 1] - cx
    # Major axis along (cos o, sin o) in (row, col), as regionprops defines orientation.
    along = dy * np.cos(orientation) + dx * np.sin(orientation)
    across = -dy * np.sin(orientation) + dx * np.cos(orientation)
    theta, rho = np.arctan2(across, along), np.hypot(along, across)
    a, b = ellipse_axes
    rho_ellipse = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2 + 1e-12)
    return float(np.sqrt(np.mean((rho / rho_ellipse - 1) ** 2)))


def _round(value: float) -> float:
    # Measurements are kept at 6 significant digits, so the JSON manifest is compact and round-trips exactly.
    return float(f"{float(value):.6g}")


def _as_labels(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype.kind in "iu" and len(np.unique(mask)) > 2:
        return mask.astype(np.int32)  # already one label per particle (a 0/255 PNG is still a plain mask)
    return label(mask > 0, connectivity=2)


def _measure(masks: Sequence[np.ndarray]) -> tuple[dict[str, list[float]], list[dict[str, Any]], list[float]]:
    """Per-particle features (inner particles only), per-image stats, and pooled NN spacings."""
    particles: dict[str, list[float]] = {k: [] for k in FEATURES}
    images, spacing = [], []
    for mask in masks:
        labels = _as_labels(mask)
        h, w = labels.shape
        props = regionprops(labels)
        for p in props:
            r0, c0, r1, c1 = p.bbox
            if r0 == 0 or c0 == 0 or r1 == h or c1 == w or p.area < 3:
                continue  # cut by the frame: its size and shape are not the particle's
            a, b = p.axis_major_length / 2, max(p.axis_minor_length / 2, 0.5)
            for key, value in (
                ("area", p.area),
                ("diameter", p.equivalent_diameter_area),
                ("axis_ratio", a / b),
                ("eccentricity", p.eccentricity),
                ("solidity", p.solidity),
                ("orientation", p.orientation),
                ("roughness", _roughness(p, (a, b), p.orientation)),
            ):
                particles[key].append(_round(value))
        centres = np.array([p.centroid for p in props]).reshape(-1, 2)
        density = len(props) / float(h * w)
        stats_ = {"shape": [h, w], "count": len(props), "density": _round(density), "clark_evans": None}
        if len(props) >= 2:
            nn = cKDTree(centres).query(centres, k=2)[0][:, 1]
            spacing.extend(_round(v) for v in nn)
            if len(props) >= 5:  # R from fewer points is noise
                stats_["clark_evans"] = _round(nn.mean() / (0.5 / np.sqrt(density)))
        images.append(stats_)
    return particles, images, spacing


@dataclass
class MorphologyPrior:
    """Particle statistics of the rough masks, at their pixel scale.

    Attributes:
        particles: Feature -> one value per inner particle (``FEATURES``): area (px^2), diameter (equivalent
            circle, px), axis_ratio (major / minor), eccentricity, solidity, orientation (rad, regionprops'),
            roughness (RMS relative deviation of the boundary from the inertia ellipse).
        images: Per rough mask: shape, count (border particles included), density (particles / px^2),
            clark_evans (None under 5 particles).
        nn_spacing: Nearest-neighbour centroid distances (px), pooled over images.
        offspring: Mean particles per cluster of the Thomas process used when the masks are clustered.
    """

    particles: dict[str, list[float]]
    images: list[dict[str, Any]]
    nn_spacing: list[float] = field(default_factory=list)
    offspring: float = 4.0

    @classmethod
    def from_masks(cls, masks: Sequence[np.ndarray]) -> MorphologyPrior:
        """Measure the prior from rough masks (bool, 0/1 or int labels, each H x W)."""
        particles, images, spacing = _measure(masks)
        prior = cls(particles, images, spacing)
        prior._check()
        return prior

    def _check(self) -> None:
        if not self.particles["diameter"]:
            total = sum(im["count"] for im in self.images)
            found = (
                f"all {total} particle(s) are cut by the frame border" if total else "they hold no particles"
            )
            raise NoParticlesError(
                f"the morphology prior has no particle to learn from in {len(self.images)} rough mask(s): {found};"
                " try --particle-contrast bright|dark or a --seed-model"
            )

    # -- derived statistics ----------------------------------------------------------------------------------
    @property
    def n_particles(self) -> int:
        return len(self.particles["diameter"])

    @property
    def densities(self) -> np.ndarray:
        return np.array([im["density"] for im in self.images], float)

    @property
    def clark_evans(self) -> float:
        """Median Clark-Evans ratio over images with enough particles (1.0, Poisson, when none has)."""
        values = [im["clark_evans"] for im in self.images if im["clark_evans"] is not None]
        return float(np.median(values)) if values else 1.0

    @cached_property
    def cluster_sigma(self) -> float | None:
        """Thomas-process cluster spread (px) that matches :attr:`clark_evans`; None: place as Poisson."""
        counted = [im for im in self.images if im["count"] >= 5]
        if not counted:
            return None
        shape = tuple(int(np.median([im["shape"][k] for im in counted])) for k in (0, 1))
        return _calibrate_cluster_sigma(self, shape, self.clark_evans)

    # -- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (for the run manifest)."""
        sigma = self.cluster_sigma
        return {
            "format": "tgan_ray.morphology_prior/1",
            "summary": self.summary(),
            "particles": {k: list(vs) for k, vs in self.particles.items()},
            "images": [dict(im) for im in self.images],
            "nn_spacing": list(self.nn_spacing),
            "offspring": self.offspring,
            "cluster_sigma": None if sigma is None else _round(sigma),  # saved: a reload need not recalibrate
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MorphologyPrior:
        try:
            particles = {k: [float(v) for v in data["particles"][k]] for k in FEATURES}
            prior = cls(
                particles,
                list(data["images"]),
                [float(v) for v in data.get("nn_spacing", [])],
                float(data.get("offspring", 4.0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a morphology prior dict: missing or bad key {exc}") from None
        prior._check()
        if "cluster_sigma" in data:  # fills the cached property: no recalibration after a reload
            prior.__dict__["cluster_sigma"] = (
                None if data["cluster_sigma"] is None else float(data["cluster_sigma"])
            )
        return prior

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MorphologyPrior:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"morphology prior not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        return cls.from_dict(data)

    def summary(self) -> dict[str, float | int]:
        """A few headline numbers, for logs and MLflow."""
        d = np.array(self.particles["diameter"])
        return {
            "particles": self.n_particles,
            "images": len(self.images),
            "diameter_median_px": float(np.median(d)) if len(d) else 0.0,
            "axis_ratio_median": float(np.median(self.particles["axis_ratio"])) if len(d) else 0.0,
            "density_per_mpx": float(np.median(self.densities) * 1e6) if self.images else 0.0,
            "clark_evans": self.clark_evans,
        }


# -- sampling ----------------------------------------------------------------------------------------------------
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


def _clark_evans_of(labels: np.ndarray) -> float | None:
    n = int(labels.max())
    if n < 5:
        return None
    flat = labels.ravel()
    yy, xx = (a.ravel() for a in np.indices(labels.shape))
    area = np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)
    centres = np.column_stack([np.bincount(flat, v, n + 1)[1:] / area for v in (yy, xx)])
    nn = cKDTree(centres).query(centres, k=2)[0][:, 1]
    return float(nn.mean() / (0.5 / np.sqrt(n / labels.size)))


def _calibrate_cluster_sigma(prior: MorphologyPrior, shape: tuple[int, int], target_r: float) -> float | None:
    """Cluster spread (px) whose sampled masks have the Clark-Evans ratio ``target_r``; None: Poisson suffices.

    R has no closed form for a Thomas process whose particles may not overlap, so the sampler itself is run
    (fixed seed) in the rough masks' frame shape, where their R was measured (the edge bias then cancels), and
    the spread is bisected in log space: R grows with it.
    """
    density = float(np.median([im["density"] for im in prior.images if im["count"] >= 5]))
    expected_count = density * shape[0] * shape[1]
    frames = int(np.clip(400 / max(expected_count, 1.0), 6, 48))  # R of a few particles is noisy: pool ~400

    def ratio(sigma: float | None) -> float:
        rng = np.random.default_rng(0)
        values = [_clark_evans_of(_sample(prior, shape, rng, "clip", sigma)[1]) for _ in range(frames)]
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else 1.0  # as the prior's R: a median over frames

    if target_r >= ratio(None) - 0.02:
        return None
    spacing = 0.5 / np.sqrt(density)
    lo, hi = np.log(0.02 * spacing), np.log(4.0 * spacing)
    for _ in range(7):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(float(np.exp(mid))) < target_r else (lo, mid)
    return float(np.exp((lo + hi) / 2))


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
    return _sample(prior, (h, w), rng, border_policy, prior.cluster_sigma)


def _sample(
    prior: MorphologyPrior,
    shape: tuple[int, int],
    rng: np.random.Generator,
    border_policy: str,
    sigma: float | None,
) -> tuple[np.ndarray, np.ndarray]:
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


def compare_to_prior(prior: MorphologyPrior, masks: Sequence[np.ndarray]) -> dict[str, float | None]:
    """Two-sample KS statistic between the prior and the particles of ``masks``, per feature (0 = identical).

    Features: diameter, axis_ratio, solidity, roughness, nn_spacing, density. None where either side is empty.
    """
    particles, images, spacing = _measure(masks)
    pairs = {
        k: (prior.particles[k], particles[k]) for k in ("diameter", "axis_ratio", "solidity", "roughness")
    }
    pairs["nn_spacing"] = (prior.nn_spacing, spacing)
    pairs["density"] = (prior.densities, [im["density"] for im in images])
    return {
        k: (float(stats.ks_2samp(a, b).statistic) if len(a) and len(b) else None)
        for k, (a, b) in pairs.items()
    }
