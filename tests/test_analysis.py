"""Particle table, PSD summary, plots and the HTML report on synthetic masks made here."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk, ellipse
from skimage.measure import label

from tgan_ray.analysis import (
    measure_particles,
    plot_grid,
    plot_overlay,
    plot_psd,
    plot_shapes,
    psd_summary,
    split_touching,
    write_particles_csv,
    write_particles_parquet,
    write_report,
    write_summary,
)
from tgan_ray.analysis.particles import PARTICLE_COLUMNS, typical_radius_px

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _discs(centres, radius, shape=(128, 128)):
    mask = np.zeros(shape, bool)
    for c in centres:
        mask[disk(c, radius, shape=shape)] = True
    return mask


@pytest.mark.parametrize("radius", [5, 12])
def test_split_touching_separates_two_touching_discs(radius):
    # Centres 2r - 1 apart: skimage discs exclude the rim, so 2r apart would leave a gap.
    mask = _discs([(64, 64 - radius), (64, 63 + radius)], radius)
    assert label(mask, return_num=True)[1] == 1  # really one connected blob
    labels = split_touching(mask)
    assert labels.max() == 2
    # Each half holds one disc: the split runs through the contact point.
    assert labels[64, 64 - radius] != labels[64, 63 + radius]
    assert set(np.unique(labels[mask])) == {1, 2}


@pytest.mark.parametrize("rotation", [0.0, 0.6, math.pi / 2])
def test_split_touching_keeps_an_ellipse_whole(rotation):
    mask = np.zeros((128, 128), bool)
    mask[ellipse(64, 64, 10, 36, shape=mask.shape, rotation=rotation)] = True
    assert split_touching(mask).max() == 1


def test_typical_radius_follows_single_particles():
    mask = _discs([(30, 30), (30, 45), (90, 90)], 8)  # a touching pair and a single disc
    assert typical_radius_px(mask) == pytest.approx(8, abs=1)
    assert split_touching(mask).max() == 3


def test_measure_particles_nm_and_border_flag():
    mask = _discs([(64, 64)], 20)
    mask[disk((0, 10), 6, shape=mask.shape)] = True  # cut by the top edge
    df = measure_particles(mask, "img.tif", pixel_size_nm=0.5)
    assert list(df.columns) == list(PARTICLE_COLUMNS)
    assert len(df) == 2 and set(df["unit"]) == {"nm"}
    inner = df[~df.touches_border].iloc[0]
    assert df.touches_border.sum() == 1
    # Radius 20 px at 0.5 nm/px: diameter 20 nm, area π·10² nm².
    assert inner.equivalent_diameter == pytest.approx(20.0, rel=0.02)
    assert inner.area == pytest.approx(math.pi * 100, rel=0.03)
    assert inner.major_axis == pytest.approx(20.0, rel=0.05) and inner.minor_axis == pytest.approx(
        20.0, rel=0.05
    )
    assert inner.centroid_x == pytest.approx(64) and inner.centroid_y == pytest.approx(64)
    assert inner.circularity > 0.9 and inner.eccentricity < 0.2 and inner.solidity > 0.95
    assert inner.image == "img.tif"
    px = measure_particles(mask, "img.tif")
    assert set(px["unit"]) == {"px"}
    assert px[~px.touches_border].equivalent_diameter.iloc[0] == pytest.approx(40.0, rel=0.02)


def test_measure_particles_splits_and_rejects_bad_input():
    mask = _discs([(64, 52), (64, 74)], 12)
    assert len(measure_particles(mask, "a")) == 2
    assert len(measure_particles(mask, "a", split=False)) == 1
    empty = measure_particles(np.zeros((16, 16), bool), "empty.png", pixel_size_nm=1.0)
    assert empty.empty and list(empty.columns) == list(PARTICLE_COLUMNS)
    with pytest.raises(ValueError, match="pixel_size_nm.*bad.tif"):
        measure_particles(mask, "bad.tif", pixel_size_nm=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        measure_particles(np.zeros((2, 8, 8)), "x")


def _table(diameters, unit="nm", image="a.tif", border=None):
    d = np.asarray(diameters, float)
    n = d.size
    return pd.DataFrame(
        {
            "image": [image] * n,
            "particle_id": np.arange(1, n + 1),
            "centroid_x": np.zeros(n),
            "centroid_y": np.zeros(n),
            "area": np.pi * d**2 / 4,
            "equivalent_diameter": d,
            "major_axis": d * 1.1,
            "minor_axis": d * 0.9,
            "eccentricity": np.full(n, 0.4),
            "circularity": np.full(n, 0.9),
            "solidity": np.full(n, 0.97),
            "touches_border": np.zeros(n, bool) if border is None else border,
            "unit": [unit] * n,
        }
    )


def test_psd_summary_recovers_lognormal():
    rng = np.random.default_rng(0)
    mu, sigma = math.log(5.0), 0.3
    d = rng.lognormal(mu, sigma, 3000)
    border = np.zeros(d.size, bool)
    border[:100] = True
    s = psd_summary(_table(d, border=border), images=["a.tif", "b.tif"])
    assert s["count"] == 2900 and s["border_count"] == 100 and s["unit"] == "nm"
    assert s["lognormal"]["mu"] == pytest.approx(mu, abs=0.03)
    assert s["lognormal"]["sigma"] == pytest.approx(sigma, abs=0.02)
    assert s["d50"] == pytest.approx(5.0, rel=0.05) and s["median"] == s["d50"]
    assert s["dispersion"] == pytest.approx(math.sqrt(math.exp(sigma**2) - 1), rel=0.1)
    assert s["d10"] < s["d50"] < s["d90"]
    assert s["per_image"] == {
        "a.tif": {"count": 2900, "border_count": 100},
        "b.tif": {"count": 0, "border_count": 0},
    }
    assert s["shape"]["axis_ratio_median"] == pytest.approx(0.9 / 1.1)


@pytest.mark.parametrize("diameters", [[], [7.5]])
def test_psd_summary_without_nan_for_tiny_samples(diameters, tmp_path):
    s = psd_summary(_table(diameters))
    assert s["count"] == len(diameters)
    assert s["sd"] is None and s["dispersion"] is None and s["lognormal"] is None
    if diameters:
        assert s["mean"] == s["d10"] == s["d90"] == 7.5
    else:
        assert s["mean"] is None and s["unit"] is None
    json.dumps(s, allow_nan=False)  # raises on NaN
    out = write_summary(s, tmp_path / "psd.json")
    assert json.loads(out.read_text())["count"] == len(diameters)


def test_psd_summary_rejects_mixed_units_and_bad_tables():
    mixed = pd.concat([_table([1.0, 2.0]), _table([3.0], unit="px", image="b")])
    with pytest.raises(ValueError, match="mixes units"):
        psd_summary(mixed)
    with pytest.raises(KeyError, match="equivalent_diameter"):
        psd_summary(pd.DataFrame({"image": [], "touches_border": []}))


def test_write_summary_turns_nan_into_null(tmp_path):
    path = write_summary({"x": float("nan"), "y": np.float32(2.0), "z": [np.int64(3)]}, tmp_path / "s.json")
    assert json.loads(path.read_text()) == {"x": None, "y": 2.0, "z": [3]}


@pytest.fixture()
def sample(tmp_path):
    rng = np.random.default_rng(1)
    centres = [(20 + 30 * i, 20 + 30 * j) for i in range(4) for j in range(4)]
    mask = np.zeros((128, 128), bool)
    for c in centres:
        mask[disk(c, rng.uniform(5, 10), shape=mask.shape)] = True
    image = rng.normal(0.2, 0.05, mask.shape) + 0.6 * mask
    df = measure_particles(mask, "sample.tif", pixel_size_nm=0.25)
    return image, mask, df, psd_summary(df)


def test_plots_write_pngs(sample, tmp_path):
    image, mask, df, summary = sample
    paths = [
        plot_psd(df, summary, tmp_path / "psd.png"),
        plot_shapes(df, tmp_path / "shapes.png"),
        plot_overlay(image, split_touching(mask), tmp_path / "overlay.png", "sample.tif"),
        plot_grid(
            [[image, mask, image, image]] * 2,
            ["real", "rough mask", "1st gen", "2nd gen"],
            tmp_path / "g.png",
        ),
    ]
    empty = measure_particles(np.zeros((8, 8), bool), "e")
    paths += [
        plot_psd(empty, psd_summary(empty), tmp_path / "e1.png"),
        plot_shapes(empty, tmp_path / "e2.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, p
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="row 1"):
        plot_grid([[image, image], [image]], ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="mask shape"):
        plot_overlay(image, mask[:10], tmp_path / "bad.png")


def test_report_is_self_contained(sample, tmp_path):
    image, mask, df, summary = sample
    figures = {
        "Size distribution": plot_psd(df, summary, tmp_path / "psd.png"),
        "Shapes": plot_shapes(df, tmp_path / "shapes.png"),
        "Overlay": plot_overlay(image, mask, tmp_path / "ov.png"),
    }
    stage = pd.DataFrame({"stage": ["segmenter"], "val/miou": [0.91]})
    tables = {"Stage metrics": stage, "Particles": df}
    out = write_report(tmp_path / "run", "Pt <on> C", summary, figures, tables, {"pixel size (nm)": 0.25})
    text = out.read_text()
    assert out.name == "report.html"
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', text)) == 3
    assert not re.search(r"https?://", text) and "<link" not in text and "<script" not in text
    assert "Pt &lt;on&gt; C" in text  # title escaped
    assert "equivalent_diameter (nm)" in text and "area (nm²)" in text  # units in the particle table
    assert "val/miou" in text and "sample.tif" in text and "Particles per image" in text
    low, high = summary["intervals"]["mean"]["low"], summary["intervals"]["mean"]["high"]
    assert f"95% CI {low:.3g}–{high:.3g}" in text  # the mean's bootstrap interval on its card
    csv = write_particles_csv(df, tmp_path / "run" / "particles.csv")
    assert pd.read_csv(csv).shape == df.shape
    parquet = write_particles_parquet(df, tmp_path / "run" / "particles.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), df)
    with pytest.raises(FileNotFoundError, match="Missing"):
        write_report(tmp_path, "t", summary, {"Missing": tmp_path / "nope.png"})
