"""Steps 2 -> 4: the morphology prior of the rough masks, measured and fitted.

The paper's step 4 samples "many random masks whose particle statistics (size, shape, density, spacing) follow
the rough masks". :class:`MorphologyPrior` measures those statistics; :mod:`tgan_ray.masks.sampling` draws the
random masks from it:

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import cKDTree
from skimage.measure import find_contours, label, regionprops

from tgan_ray.masks.rough import NoParticlesError
from tgan_ray.masks.sampling import draw_mask

FEATURES = ("area", "diameter", "axis_ratio", "eccentricity", "solidity", "orientation", "roughness")


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


# -- fitting the clustering -------------------------------------------------------------------------------
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
        values = [_clark_evans_of(draw_mask(prior, shape, rng, "clip", sigma)[1]) for _ in range(frames)]
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
