"""Figures for the report and MLflow: PSD histogram, shape histograms, per-frame means, mask overlays, grids.

Figures are built as plain ``matplotlib.figure.Figure`` objects on the Agg canvas, not through pyplot: nothing
enters pyplot's global figure list, so nothing leaks and plotting is safe from Ray worker and Serve threads.
Every PNG is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from skimage.measure import find_contours, label, regionprops

from tgan_ray.analysis.report import atomic_path

_DPI = 120
_MAX_OVERLAY_PX = 1200  # width of overlay PNGs at most


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    fig.clear()  # free the artists now rather than at garbage collection
    return path


def _interior(df: pd.DataFrame) -> pd.DataFrame:
    return df[~df["touches_border"].astype(bool)] if "touches_border" in df else df


def _unit(df: pd.DataFrame, summary: dict | None = None) -> str:
    if summary and summary.get("unit"):
        return str(summary["unit"])
    return str(df["unit"].iloc[0]) if "unit" in df and len(df) else "px"


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_psd(df: pd.DataFrame, summary: dict, path: str | os.PathLike) -> Path:
    """Histogram of the equivalent diameter of interior particles, with the lognormal fit and the median.

    Args:
        df: particle table from ``measure_particles``.
        summary: its ``psd_summary`` (for the unit, the fit and the counts).
        path: PNG to write.
    """
    unit = _unit(df, summary)
    d = _interior(df)["equivalent_diameter"].to_numpy(dtype=float) if len(df) else np.zeros(0)
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    if d.size == 0:
        _no_data(ax, "no interior particles")
    else:
        bins = int(np.clip(np.sqrt(d.size) * 2, 5, 40)) if np.ptp(d) > 0 else 5
        ax.hist(
            d, bins=bins, density=True, color="#7aa6c2", edgecolor="white", label=f"measured (n = {d.size})"
        )
        fit = summary.get("lognormal") if summary else None
        if fit and fit.get("sigma"):
            x = np.linspace(max(d.min() * 0.5, 1e-9), d.max() * 1.3, 300)
            pdf = stats.lognorm.pdf(x, fit["sigma"], scale=np.exp(fit["mu"]))
            ax.plot(
                x,
                pdf,
                color="#c0392b",
                lw=2,
                label=f"lognormal: median {fit['median']:.3g} {unit}, σ {fit['sigma']:.2f}",
            )
        ax.axvline(float(np.median(d)), color="0.2", ls="--", lw=1, label=f"median {np.median(d):.3g} {unit}")
        intervals = summary.get("intervals") if summary else None
        note = _draw_intervals(ax, summary, intervals, unit) if intervals else None
        ax.set_ylabel(f"probability density (1/{unit})")
        # Below the axes: inside, "best" still sat on the interval bars that run along the top.
        ax.legend(
            frameon=False,
            fontsize=8,
            title=note,
            title_fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            ncol=2,
        )
    ax.set_xlabel(f"equivalent diameter ({unit})")
    border = summary.get("border_count") if summary else None
    ax.set_title(
        "Particle size distribution" + (f" ({border} edge particles excluded)" if border else ""), fontsize=10
    )
    return _save(fig, path)


def _draw_intervals(ax, summary: dict, intervals: dict, unit: str) -> str:
    """The mean's bootstrap interval as a shaded band; d10 / d50 / d90 as points with interval bars on top.
    Returns the note that says how the intervals were made (the legend's title)."""
    level = f"{100 * intervals.get('level', 0.95):.0f}%"
    mean, ci = summary.get("mean"), intervals.get("mean")
    if mean is not None and ci:
        ax.axvspan(ci["low"], ci["high"], color="#e67e22", alpha=0.25, lw=0)
        ax.axvline(
            mean,
            color="#e67e22",
            lw=1.5,
            label=f"mean {mean:.3g} {unit}, {level} CI {ci['low']:.4g}–{ci['high']:.4g}",
        )
    keys = [k for k in ("d10", "d50", "d90") if summary.get(k) is not None and intervals.get(k)]
    if keys:
        x = np.array([summary[k] for k in keys])
        low, high = (
            np.array([intervals[k]["low"] for k in keys]),
            np.array([intervals[k]["high"] for k in keys]),
        )
        # x in data units, y as a fraction of the axes: the bars sit above the histogram whatever its height.
        ax.errorbar(
            x,
            np.full(x.size, 0.95),
            xerr=[np.maximum(x - low, 0), np.maximum(high - x, 0)],
            fmt="v",
            color="0.15",
            ms=5,
            capsize=3,
            transform=ax.get_xaxis_transform(),
            label="d10 / d50 / d90, " + level + " CI",
        )
    ax.set_ylim(top=ax.get_ylim()[1] * 1.15)  # head room for the bars
    per = "image" if intervals.get("resampled") == "images" else "particle"
    return (
        f"{level} CIs: bootstrap of {intervals.get('units')} {per}s, {intervals.get('resamples')} resamples"
    )


def plot_shapes(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Histograms of circularity (4πA/P²), eccentricity, solidity and minor/major axis ratio (interior particles).

    Args:
        df: particle table from ``measure_particles``.
        path: PNG to write.
    """
    interior = _interior(df)
    ratio = (
        (interior["minor_axis"] / interior["major_axis"].where(interior["major_axis"] > 0))
        if len(df)
        else None
    )
    panels = {
        "circularity 4πA/P² (1 = disc)": interior["circularity"] if len(df) else None,
        "eccentricity (0 = circle)": interior["eccentricity"] if len(df) else None,
        "solidity (area / convex area)": interior["solidity"] if len(df) else None,
        "axis ratio minor/major (1 = round)": ratio,
    }
    fig = Figure(figsize=(8, 5.6))
    for i, (name, values) in enumerate(panels.items()):
        ax = fig.add_subplot(2, 2, i + 1)
        v = np.asarray(values.dropna(), dtype=float) if values is not None else np.zeros(0)
        if v.size == 0:
            _no_data(ax, "no interior particles")
        else:
            ax.hist(v, bins=np.linspace(0, 1, 21), color="#8fbf8f", edgecolor="white")
            ax.set_ylabel("particles")
        ax.set_xlabel(name, fontsize=9)
    fig.suptitle(f"Particle shape (n = {len(interior)}, no unit)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_mean_series(series: Sequence[dict], unit: str | None, path: str | os.PathLike) -> Path:
    """Mean diameter per frame of a time series (``tgan watch``), with each frame's 95% interval as a bar.

    Args:
        series: one dict per frame with ``frame_index``, ``mean_diameter`` and ``mean_diameter_ci95``
            ([low, high] or None), in acquisition order.
        unit: 'nm' or 'px'.
        path: PNG to write.
    """
    unit = unit or "px"
    points = [r for r in series if r.get("mean_diameter") is not None]
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    if not points:
        _no_data(ax, "no frame with interior particles yet")
    else:
        x = np.array([r["frame_index"] for r in points], dtype=float)
        y = np.array([r["mean_diameter"] for r in points], dtype=float)
        ci = np.array([r.get("mean_diameter_ci95") or (np.nan, np.nan) for r in points], dtype=float)
        err = np.vstack([y - ci[:, 0], ci[:, 1] - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(np.maximum(err, 0)), fmt="o-", ms=3, lw=1, capsize=2)
        ax.set_ylabel(f"mean equivalent diameter ({unit})")
    ax.set_xlabel("frame")
    ax.set_title("Mean diameter per frame (bars: 95% bootstrap interval over its particles)", fontsize=9)
    return _save(fig, path)


def _display(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """Image scaled for display: robust 1-99 percentile stretch of grey images; RGB shown as is."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image, {}
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W), (1, H, W) or (H, W, 3), got shape {image.shape}")
    image = image.astype(float)
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    return image, {"cmap": "gray", "vmin": lo, "vmax": hi if hi > lo else lo + 1}


def plot_overlay(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """Particle outlines over the micrograph: red for measured particles, cyan for those cut by the frame edge
    (left out of the PSD). A label map outlines each particle, so split touching particles show as such.

    Shape:
        image: (H, W) grey or (H, W, 3) RGB; mask: (H, W) binary mask or label map.
    """
    shown, style = _display(image)
    mask = np.asarray(mask)
    if mask.shape != shown.shape[:2]:
        raise ValueError(
            f"mask shape {mask.shape} does not match image shape {shown.shape[:2]} for {title or path}"
        )
    is_label_map = mask.dtype != bool and mask.max(initial=0) > 1
    labels = mask.astype(np.int32) if is_label_map else label(mask > 0, connectivity=2)
    h, w = mask.shape
    fig = Figure(figsize=(6.0, 6.0 * h / w))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(shown, interpolation="nearest", **style)
    # Contours per particle inside its own bounding box: cheap, and touching particles keep separate outlines.
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        at_edge = r0 == 0 or c0 == 0 or r1 == h or c1 == w
        crop = np.pad(region.image, 1).astype(float)
        for contour in find_contours(crop, 0.5):
            ax.plot(
                contour[:, 1] + c0 - 1,
                contour[:, 0] + r0 - 1,
                color="#00c8ff" if at_edge else "#ff3030",
                lw=1.0,
            )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.text(
            4,
            4,
            title,
            color="white",
            va="top",
            fontsize=9,
            bbox={"facecolor": "black", "alpha": 0.5, "lw": 0},
        )
    # About one figure pixel per image pixel, capped so a 4k frame does not bloat the report.
    dpi = int(np.clip(w / 6.0, _DPI, _MAX_OVERLAY_PX / 6.0))
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    fig.clear()
    return path


def plot_grid(
    rows: Sequence[Sequence[np.ndarray]],
    col_titles: Sequence[str],
    path: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
) -> Path:
    """Grid of sample images, e.g. one row per sample: real | rough mask | 1st gen | 2nd gen.

    Args:
        rows: images per row; every row has one image per column title.
        col_titles: column headings.
        path: PNG to write.
        row_titles: optional label per row.

    Shape:
        each image: (H, W) grey or (H, W, 3) RGB; sizes may differ between cells.
    """
    n_cols = len(col_titles)
    if not rows or n_cols == 0:
        raise ValueError("plot_grid needs at least one row and one column title")
    for i, row in enumerate(rows):
        if len(row) != n_cols:
            raise ValueError(f"plot_grid row {i} has {len(row)} images but there are {n_cols} column titles")
    if row_titles is not None and len(row_titles) != len(rows):
        raise ValueError(f"plot_grid got {len(row_titles)} row titles for {len(rows)} rows")
    fig = Figure(figsize=(2.2 * n_cols, 2.2 * len(rows) + 0.3))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            shown, style = _display(image)
            ax = axes[i, j]
            ax.imshow(shown, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
