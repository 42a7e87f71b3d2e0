"""Particle geometry of the synthetic micrographs: where the particles are and what shape they have.

:func:`sample_particles` draws sizes (lognormal, in nm), ellipse shapes with rough boundaries and non-overlapping,
optionally clustered positions; :func:`render_particles` rasterises them into instance labels and projected
thickness. How a microscope images that thickness (support, contrast, blur, noise) lives in ``synthetic.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: synthetic.py imports this module at run time
    from .synthetic import SynthConfig


@dataclass
class Particles:
    """Sampled particle geometry, one entry per particle, in px (image frame)."""

    centers: np.ndarray  # (N, 2) row, col
    semi_axes: np.ndarray  # (N, 2) major, minor
    angles: np.ndarray  # (N,) radians
    harmonics: np.ndarray  # (N, 4, 2) amplitude and phase of boundary harmonics k=2..5
    diameters_nm: np.ndarray  # (N,) requested equivalent-circle diameters


def sample_particles(cfg: SynthConfig, rng: np.random.Generator) -> Particles:
    """Draw sizes, shapes and non-overlapping positions (light touching allowed)."""
    fov_nm = cfg.size * cfg.pixel_size_nm
    if cfg.count is not None:
        n = int(rng.integers(cfg.count[0], cfg.count[1] + 1))
    else:
        n = int(rng.poisson(cfg.density * (fov_nm / 100.0) ** 2))
    # Lognormal with E[d] = mean_diameter_nm: mu = ln(mean) - sigma^2 / 2.
    d_nm = cfg.mean_diameter_nm * np.exp(cfg.sigma_log * rng.standard_normal(n) - cfg.sigma_log**2 / 2)
    radius = np.maximum(d_nm / cfg.pixel_size_nm / 2, 1.25)
    ratio = rng.uniform(cfg.axis_ratio_min, 1.0, n)
    semi = np.stack([radius / np.sqrt(ratio), radius * np.sqrt(ratio)], axis=1)  # area-preserving: a*b = r^2
    angles = rng.uniform(0, np.pi, n)
    k = np.arange(2, 6)
    harmonics = np.stack(
        [cfg.roughness * rng.standard_normal((n, 4)) / k, rng.uniform(0, 2 * np.pi, (n, 4))], -1
    )
    bound = semi[:, 0] * (1 + np.abs(harmonics[:, :, 0]).sum(1))

    n_cluster = int(round(cfg.clustering * n))
    cluster_centres = rng.uniform(0, cfg.size - 1, (max(1, n_cluster // 12), 2))
    cluster_sigma = 2.5 * cfg.mean_diameter_nm / cfg.pixel_size_nm
    # Place big particles first: they are the hardest to fit.
    order = np.argsort(-bound)
    kept: list[int] = []
    centers = np.zeros((n, 2))
    for rank, i in enumerate(order):
        for _ in range(60):
            if rank < n_cluster:
                c = cluster_centres[rng.integers(len(cluster_centres))] + rng.normal(0, cluster_sigma, 2)
            else:
                c = rng.uniform(0, cfg.size - 1, 2)
            if not (0 <= c[0] <= cfg.size - 1 and 0 <= c[1] <= cfg.size - 1):
                continue
            if kept:
                dist = np.hypot(*(centers[kept] - c).T)
                if np.any(dist < 0.9 * (bound[kept] + bound[i])):  # 0.9: neighbours may just touch
                    continue
            centers[i] = c
            kept.append(i)
            break
    kept_arr = np.sort(np.array(kept, dtype=int))
    return Particles(centers[kept_arr], semi[kept_arr], angles[kept_arr], harmonics[kept_arr], d_nm[kept_arr])


def render_particles(
    particles: Particles, size: int, row_shift: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise particles: instance labels and projected thickness (ellipsoid profile).

    Args:
        particles: Geometry from :func:`sample_particles`.
        size: Image side, px.
        row_shift: Optional per-row scan displacement, px; pixel (r, c) samples position (r, c + row_shift[r]).

    Returns:
        (labels, thickness): labels int32 with particle i -> i + 1 (first-painted wins where two touch);
        thickness float32 in px, > 0 exactly on particle pixels.

    Shape:
        labels, thickness: (size, size).
    """
    labels = np.zeros((size, size), np.int32)
    thickness = np.zeros((size, size), np.float32)
    shift = np.zeros(size) if row_shift is None else row_shift
    k = np.arange(2, 6)[:, None, None]
    for i, (c, (a, b), ang, harm) in enumerate(
        zip(particles.centers, particles.semi_axes, particles.angles, particles.harmonics, strict=True)
    ):
        reach = a * (1 + np.abs(harm[:, 0]).sum()) + np.abs(shift).max() + 2
        r0, r1 = max(0, int(c[0] - reach)), min(size, int(c[0] + reach) + 2)
        c0, c1 = max(0, int(c[1] - reach)), min(size, int(c[1] + reach) + 2)
        rows, cols = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        dy, dx = rows - c[0], cols + shift[r0:r1, None] - c[1]
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        rho = np.hypot(u / a, v / b)
        theta = np.arctan2(v / b, u / a)
        edge = 1 + (harm[:, 0, None, None] * np.cos(k * theta + harm[:, 1, None, None])).sum(0)
        inside = rho < edge
        # Projected thickness of an ellipsoid whose depth is the mean of its two in-plane axes.
        t = (a + b) * np.sqrt(np.clip(1 - (rho / edge) ** 2, 0, None))
        thickness[r0:r1, c0:c1] += np.where(inside, t, 0).astype(np.float32)
        box = labels[r0:r1, c0:c1]
        box[inside & (box == 0)] = i + 1
    return labels, thickness
