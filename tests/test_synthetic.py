"""Synthetic EM stacks: exact masks, requested size statistics, contrast, difficulty and the files on disk."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import regionprops

from tgan_ray.data.synthetic import SynthConfig, make_image, make_stack, render_layers, synth_config

# Everything that is not the particles themselves switched off: flat support, no blur, no noise.
NOISELESS = dict(
    snr=None,
    dose=None,
    read_noise=0.0,
    probe_blur=0.0,
    defocus_blur=0.0,
    support_thickness_var=0.0,
    support_texture=0.0,
    fringe_strength=0.0,
)


@pytest.mark.parametrize("modality", ["haadf", "bf-tem"])
@pytest.mark.parametrize("jitter", [0.0, 1.5])
def test_mask_is_exactly_the_rendered_particles(modality, jitter):
    cfg = SynthConfig(
        modality=modality, size=192, scan_jitter=jitter, clustering=0.5, count=(20, 30), **NOISELESS
    )
    image, mask, labels = make_image(cfg, rng=3)
    background = np.median(image)
    # On a flat support without blur/noise, particle pixels are exactly those that differ from the support.
    rendered = image > background + 1e-6 if modality == "haadf" else image < background - 1e-6
    np.testing.assert_array_equal(mask, rendered)
    np.testing.assert_array_equal(mask, labels > 0)
    n = render_layers(cfg, rng=3).info["n_particles"]
    assert n > 5
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.arange(1, n + 1))


def test_same_seed_same_image_and_dtypes():
    cfg = SynthConfig(size=96)
    a, b = make_image(cfg, rng=7), make_image(cfg, rng=7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    image, mask, labels = a
    assert image.dtype == np.float32 and mask.dtype == bool and labels.dtype == np.int32
    assert image.shape == mask.shape == labels.shape == (96, 96)
    assert 0 <= image.min() and image.max() <= 1
    assert not np.array_equal(make_image(cfg, rng=8)[1], mask)


@pytest.mark.parametrize(
    "kw",
    [
        dict(mean_diameter_nm=6.0, sigma_log=0.3, pixel_size_nm=0.5),
        dict(mean_diameter_nm=12.0, sigma_log=0.4, pixel_size_nm=1.0, density=4.0),
    ],
)
def test_diameters_follow_requested_lognormal(kw):
    cfg = SynthConfig(size=384, clustering=0.0, **kw)
    diameters = []
    for seed in range(3):
        labels = make_image(cfg, rng=seed)[2]
        for region in regionprops(labels):
            r0, c0, r1, c1 = region.bbox
            if r0 > 0 and c0 > 0 and r1 < cfg.size and c1 < cfg.size:  # clipped particles are not full size
                diameters.append(region.equivalent_diameter_area * cfg.pixel_size_nm)
    d = np.array(diameters)
    assert len(d) > 60
    assert d.mean() == pytest.approx(kw["mean_diameter_nm"], rel=0.1)
    assert np.log(d).std() == pytest.approx(kw["sigma_log"], abs=0.08)


def test_density_sets_particle_count():
    sparse = SynthConfig(size=256, density=4.0, clustering=0.0)
    dense = SynthConfig(size=256, density=16.0, clustering=0.0)
    n_sparse = np.mean([make_image(sparse, rng=s)[2].max() for s in range(3)])
    n_dense = np.mean([make_image(dense, rng=s)[2].max() for s in range(3)])
    expected = 16.0 * (256 * 0.5 / 100) ** 2  # particles per 100x100 nm^2 times the frame area
    assert n_dense == pytest.approx(expected, rel=0.25)
    assert n_dense > 3 * n_sparse


def test_count_range_overrides_density():
    labels = make_image(SynthConfig(size=256, count=(10, 10), density=100.0), rng=0)[2]
    assert labels.max() == 10


def _local_contrast(image, mask):
    """Mean particle intensity minus the mean of the ring of support around each particle."""
    ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1)
    return image[mask].mean() - image[ring].mean()


def test_haadf_particles_bright_and_bf_tem_particles_dark():
    haadf = make_image(synth_config("default", modality="haadf", size=256), rng=1)
    bf = make_image(synth_config("default", modality="bf-tem", size=256), rng=1)
    assert _local_contrast(*haadf[:2]) > 0.1
    assert _local_contrast(*bf[:2]) < -0.1


def test_bf_tem_has_bright_fresnel_fringe_outside_edges():
    cfg = SynthConfig(modality="bf-tem", size=256, **{**NOISELESS, "fringe_strength": 0.15})
    image, mask, _ = make_image(cfg, rng=2)
    fringe = ndimage.binary_dilation(mask, iterations=2) & ~mask
    far = ~ndimage.binary_dilation(mask, iterations=12)
    assert image[fringe].mean() > image[far].mean() + 0.01


def test_haadf_centre_brighter_than_edge():
    cfg = SynthConfig(size=256, **NOISELESS)
    image, mask, _ = make_image(cfg, rng=4)
    core = ndimage.binary_erosion(mask, iterations=3)
    rim = mask & ~ndimage.binary_erosion(mask, iterations=1)
    assert image[core].mean() > image[rim].mean() + 0.05


@pytest.mark.parametrize("snr", [2.0, 8.0])
def test_snr_is_what_was_asked(snr):
    layers = render_layers(SynthConfig(size=256, snr=snr), rng=0)
    noise = (layers.image - layers.clean)[layers.mask]
    contrast = np.abs(layers.clean - layers.support)[layers.mask].mean()
    assert contrast / noise.std() == pytest.approx(snr, rel=0.15)


def _otsu_iou(image, mask, bright=True):
    t = threshold_otsu(image)
    pred = image > t if bright else image < t
    return (pred & mask).sum() / (pred | mask).sum()


def test_global_otsu_fails_on_hard_haadf_but_not_on_easy():
    # Measured at size 384, seeds 0-3: easy ~0.76-0.80, hard ~0.06-0.14.
    easy = [_otsu_iou(*make_image(synth_config("easy", size=384), rng=s)[:2]) for s in range(4)]
    hard = [_otsu_iou(*make_image(synth_config("hard", size=384), rng=s)[:2]) for s in range(4)]
    assert np.median(easy) > 0.7
    assert np.median(hard) < 0.3


def test_make_stack_writes_images_masks_and_calibration(tmp_path):
    out = make_stack(
        tmp_path / "stack", n=3, modality="bf-tem", size=64, seed=5, hard=True, pixel_size_nm=0.8
    )
    names = sorted(p.stem for p in (out / "images").glob("*.png"))
    assert names == ["bf-tem_000", "bf-tem_001", "bf-tem_002"]
    meta = json.loads((out / "pixel_size.json").read_text())
    assert meta["pixel_size_nm"] == 0.8
    assert meta["settings"]["modality"] == "bf-tem" and meta["preset"] == "hard"
    assert meta["settings"]["snr"] == synth_config("hard").snr
    for name in names:
        image = np.asarray(Image.open(out / "images" / f"{name}.png"))
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        labels = np.asarray(Image.open(out / "labels" / f"{name}.png"))
        assert image.dtype == np.uint16 and image.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, labels > 0)
        assert meta["images"][name]["n_particles"] == labels.max()
    assert not list(out.rglob("*.tmp"))
    # Same seed, same stack; images differ from one another.
    again = make_stack(
        tmp_path / "again", n=3, modality="bf-tem", size=64, seed=5, hard=True, pixel_size_nm=0.8
    )
    first = (out / "images" / "bf-tem_000.png").read_bytes()
    assert first == (again / "images" / "bf-tem_000.png").read_bytes()
    assert first != (out / "images" / "bf-tem_001.png").read_bytes()


def test_make_stack_8_bit(tmp_path):
    out = make_stack(tmp_path, n=1, size=48, bit_depth=8)
    assert np.asarray(Image.open(out / "images" / "haadf_000.png")).dtype == np.uint8


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(modality="sem"), "modality"),
        (dict(clustering=1.5), "clustering"),
        (dict(size=8), "size"),
        (dict(snr=0.0), "snr"),
    ],
)
def test_bad_settings_name_the_field(kw, words):
    with pytest.raises(ValueError, match=words):
        SynthConfig(**kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="easy, default, hard"):
        synth_config("extreme")
