"""Particle size distribution (PSD): summary statistics and a lognormal fit of the equivalent diameter.

Only interior particles count towards sizes: a particle cut by the frame edge looks smaller than it is.
Every value is JSON-safe: a statistic that needs more particles than there are is None, never NaN.

    summary = psd_summary(df, images=["a.tif", "b.tif"])
    write_summary(summary, run_dir / "psd.json")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tgan_ray.analysis.bootstrap import DEFAULT_RESAMPLES, bootstrap_psd
from tgan_ray.analysis.report import atomic_path


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def lognormal_fit(diameters: np.ndarray) -> dict[str, float] | None:
    """Maximum-likelihood lognormal fit with the location fixed at 0.

    Args:
        diameters: positive sizes. Shape: (n,).

    Returns:
        ``{'mu', 'sigma', 'median', 'mean'}`` (mu, sigma of ln d; median exp(mu) and mean exp(mu + sigma²/2) in
        the unit of the input), or None for fewer than 2 distinct positive sizes (no spread to fit).
    """
    d = np.asarray(diameters, dtype=float)
    d = d[np.isfinite(d) & (d > 0)]
    if d.size < 2 or np.ptp(d) == 0:
        return None
    sigma, _, scale = stats.lognorm.fit(d, floc=0)
    mu = math.log(scale)
    fit = {"mu": mu, "sigma": float(sigma), "median": float(scale), "mean": math.exp(mu + sigma**2 / 2)}
    return {k: _number(v) for k, v in fit.items()}


def _unit_of(df: pd.DataFrame) -> str | None:
    if "unit" not in df or df.empty:
        return None
    units = sorted(set(df["unit"].astype(str)))
    if len(units) > 1:
        raise ValueError(f"particle table mixes units {units}; give every image a pixel size or none")
    return units[0]


def _shape_medians(interior: pd.DataFrame) -> dict[str, float | None]:
    out = {}
    for col in ("circularity", "eccentricity", "solidity"):
        out[f"{col}_median"] = _number(interior[col].median()) if len(interior) else None
    ratio = interior["minor_axis"] / interior["major_axis"].where(interior["major_axis"] > 0)
    out["axis_ratio_median"] = _number(ratio.median()) if ratio.notna().any() else None
    return out


def psd_summary(
    df: pd.DataFrame, images: list[str] | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """Summarise the particle table from :func:`~tgan_ray.analysis.particles.measure_particles`.

    Args:
        df: particle table (any number of images, one unit).
        images: every image that was analysed, so that images without particles are listed with count 0.
        resamples: bootstrap draws for ``intervals`` (0: none).
        seed: the bootstrap's seed.

    Returns:
        ``count`` (interior particles), ``border_count``, ``unit`` ('nm' / 'px' / None when empty),
        ``mean``, ``median``, ``sd`` (ddof 1), ``dispersion`` (sd / mean, the coefficient of variation),
        ``d10``, ``d50``, ``d90`` of the equivalent diameter, ``lognormal`` (see :func:`lognormal_fit`),
        ``shape`` (median circularity, eccentricity, solidity, minor/major axis ratio), ``intervals``
        (95% bootstrap intervals of mean, median, d10, d50, d90, resampling images: see
        :func:`~tgan_ray.analysis.bootstrap.bootstrap_psd`) and ``per_image``
        (``{image: {'count', 'border_count'}}``). Statistics a sample is too small for are None.
    """
    required = {"image", "equivalent_diameter", "touches_border"}
    missing = required - set(df.columns)
    if missing:
        raise KeyError(f"particle table lacks column(s) {sorted(missing)}; build it with measure_particles()")
    interior = df[~df["touches_border"].astype(bool)]
    d = interior["equivalent_diameter"].to_numpy(dtype=float)
    n = int(d.size)
    mean = float(d.mean()) if n else None
    sd = float(d.std(ddof=1)) if n > 1 else None
    d10, d50, d90 = np.percentile(d, [10, 50, 90]).tolist() if n else (None, None, None)
    shape_cols = {"circularity", "eccentricity", "solidity", "minor_axis", "major_axis"}
    per_image: dict[str, dict[str, int]] = {
        str(name): {"count": 0, "border_count": 0} for name in images or []
    }
    for name, group in df.groupby("image", sort=True):
        border = int(group["touches_border"].astype(bool).sum())
        per_image[str(name)] = {"count": len(group) - border, "border_count": border}
    return {
        "count": n,
        "border_count": int(len(df) - n),
        "unit": _unit_of(df),
        "mean": _number(mean) if mean is not None else None,
        "median": _number(np.median(d)) if n else None,
        "sd": _number(sd) if sd is not None else None,
        "dispersion": _number(sd / mean) if sd is not None and mean else None,
        "d10": _number(d10) if n else None,
        "d50": _number(d50) if n else None,
        "d90": _number(d90) if n else None,
        "lognormal": lognormal_fit(d),
        "shape": _shape_medians(interior) if shape_cols <= set(df.columns) else None,
        "intervals": bootstrap_psd(d, interior["image"].astype(str).to_numpy(), resamples, seed=seed),
        "per_image": per_image,
    }


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars made Python numbers and NaN / inf made None, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a summary as indented JSON, atomically; NaN / inf become null so any JSON reader accepts it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    return path
