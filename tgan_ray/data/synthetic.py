"""Synthetic EM stacks of supported nanoparticles with exact ground-truth masks.

The demo, the tests and the benchmarks need micrographs whose true masks are known to the pixel. This module
renders them from a small physical picture instead of drawing shapes on noise:

- particles are ellipses with rough boundaries, lognormal equivalent diameters (in nm), optionally clustered,
  placed without overlap (light touching allowed);
- **HAADF-STEM**: Z-contrast, so intensity grows with projected thickness. Particles are ellipsoids (the centre is
  brighter than the edge) on an amorphous support whose thickness varies smoothly over the frame, so the
  background is not flat and a single global threshold fails on the hard settings;
- **BF-TEM**: mass-thickness absorption (dark particles on a bright background) plus a Fresnel fringe, a bright
  ring just outside each edge (a difference of Gaussians of the particle mask);
- then probe blur and defocus (Gaussian), Poisson shot noise, Gaussian read noise and scan-line jitter.

The mask is exactly the set of pixels the particles were rendered on (before blur and noise); scan jitter is
applied to the sampling grid itself, so the mask stays exact in the image's own pixel frame. The particle
geometry (sizes, shapes, positions, rasterising) is in ``synthetic_particles.py``; this module holds the
settings, the imaging physics and the stack files.

    image, mask, labels = make_image(SynthConfig(modality="haadf", snr=3.0), rng=0)
    make_stack("demo_stack", n=8, modality="bf-tem", hard=True)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from .synthetic_particles import Particles, render_particles, sample_particles

Modality = Literal["haadf", "bf-tem"]
MODALITIES = ("haadf", "bf-tem")

# Overrides on the SynthConfig defaults. "hard": low SNR, thick and uneven support, defocus, more clustering.
PRESETS: dict[str, dict] = {
    "easy": {"snr": 12.0, "support_thickness_var": 0.15, "support_texture": 0.08, "defocus_blur": 0.0},
    "default": {},
    "hard": {
        "snr": 2.0,
        "support_thickness_var": 0.85,
        "support_texture": 0.3,
        "defocus_blur": 1.5,
        "clustering": 0.6,
        "scan_jitter": 0.6,
    },
}


@dataclass
class SynthConfig:
    """Settings of one synthetic micrograph. Lengths in nm unless the name says px.

    Attributes:
        modality: 'haadf' (bright particles, Z-contrast) or 'bf-tem' (dark particles, Fresnel fringes).
        size: Image side, px.
        pixel_size_nm: Calibration, nm per px.
        mean_diameter_nm: Mean equivalent-circle diameter of the lognormal size distribution.
        sigma_log: Shape of the lognormal (std of log diameter).
        density: Particles per 100x100 nm^2 of frame (ignored when ``count`` is set).
        count: Optional (min, max) particle count, drawn uniformly; overrides ``density``.
        clustering: Fraction of particles placed near cluster centres (0 = uniform, 1 = all clustered).
        axis_ratio_min: Smallest minor/major axis ratio of the ellipses.
        roughness: Relative amplitude of the boundary roughness (radial Fourier harmonics 2..5).
        snr: Mean particle contrast over noise std. Sets the dose (shot noise) so the image hits it; None uses
            ``dose``. Low (2) is hard, 10 is easy.
        particle_contrast: Peak signal of a mean-size particle (HAADF: added intensity; BF: absorption).
        support_thickness_var: Relative amplitude of the low-frequency support thickness field (0..~0.95).
        support_texture: Relative amplitude of the fine amorphous-support grain.
        defocus_blur: Gaussian sigma of defocus blur, px (0 = in focus).
        probe_blur: Gaussian sigma of the probe / point-spread function, px.
        fringe_strength: BF-TEM Fresnel fringe amplitude (ignored for HAADF).
        read_noise: Gaussian read-noise std, in image units (0..1).
        scan_jitter: Std of the per-row scan displacement, px.
        dose: Electrons per px for shot noise when ``snr`` is None; None disables shot noise.
        seed: Seed used when ``make_image`` gets no generator.
    """

    modality: Modality = "haadf"
    size: int = 512
    pixel_size_nm: float = 0.5
    mean_diameter_nm: float = 6.0
    sigma_log: float = 0.3
    density: float = 12.0
    count: tuple[int, int] | None = None
    clustering: float = 0.3
    axis_ratio_min: float = 0.7
    roughness: float = 0.05
    snr: float | None = 6.0
    particle_contrast: float = 0.5
    support_thickness_var: float = 0.35
    support_texture: float = 0.15
    defocus_blur: float = 0.0
    probe_blur: float = 0.8
    fringe_strength: float = 0.12
    read_noise: float = 0.01
    scan_jitter: float = 0.3
    dose: float | None = 200.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(
                f"SynthConfig.modality={self.modality!r}; choose one of: {', '.join(MODALITIES)}"
            )
        if self.size < 16:
            raise ValueError(f"SynthConfig.size={self.size} px is too small; use at least 16")
        for name in ("pixel_size_nm", "mean_diameter_nm", "particle_contrast"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)} must be > 0")
        if not 0 <= self.clustering <= 1:
            raise ValueError(f"SynthConfig.clustering={self.clustering} must be in [0, 1]")
        if not 0 < self.axis_ratio_min <= 1:
            raise ValueError(f"SynthConfig.axis_ratio_min={self.axis_ratio_min} must be in (0, 1]")
        if self.snr is not None and self.snr <= 0:
            raise ValueError(f"SynthConfig.snr={self.snr} must be > 0 (or None to use the dose)")
        if self.count is not None and not 0 <= self.count[0] <= self.count[1]:
            raise ValueError(f"SynthConfig.count={self.count} must be (min, max) with 0 <= min <= max")


def synth_config(preset: str = "default", **overrides) -> SynthConfig:
    """A :class:`SynthConfig` from a named preset ('easy', 'default', 'hard') plus field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return SynthConfig(**{**PRESETS[preset], **overrides})


@dataclass
class SynthLayers:
    """Every layer of one rendered micrograph (``make_image`` returns the first three).

    Shape:
        image, clean, support: (H, W) float32; mask: (H, W) bool; labels: (H, W) int32.
    """

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    clean: np.ndarray  # blurred, noise-free image
    support: np.ndarray  # the same, rendered without particles
    particles: Particles
    dose: float | None  # electrons per px actually used (None: no shot noise)
    info: dict = field(default_factory=dict)


def _smooth_field(rng: np.random.Generator, size: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """Sum of Gaussian-filtered white noise at several scales, scaled to max |value| = 1."""
    total = np.zeros((size, size))
    for s in sigmas:
        f = ndimage.gaussian_filter(rng.standard_normal((size, size)), s, mode="wrap")
        total += f / (f.std() + 1e-12)
    return total / (np.abs(total).max() + 1e-12)


def _jitter(img: np.ndarray, row_shift: np.ndarray) -> np.ndarray:
    """Resample each row at c + row_shift[r] (linear), as a jittery scan would."""
    rows, cols = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float64)
    return ndimage.map_coordinates(img, [rows, cols + row_shift[:, None]], order=1, mode="reflect")


def render_layers(cfg: SynthConfig, rng: np.random.Generator | int | None = None) -> SynthLayers:
    """Render one micrograph and keep every layer (for tests and benchmarks)."""
    rng = np.random.default_rng(cfg.seed if rng is None else rng)
    size = cfg.size
    particles = sample_particles(cfg, rng)
    row_shift = cfg.scan_jitter * rng.standard_normal(size) if cfg.scan_jitter > 0 else np.zeros(size)
    labels, thickness = render_particles(particles, size, row_shift)
    mask = labels > 0

    # Support: smooth thickness field (flake scale) times fine amorphous grain (~0.5-1.5 nm).
    low = _smooth_field(rng, size, (0.15 * size, 0.06 * size))
    grain_px = (0.4 / cfg.pixel_size_nm, 1.2 / cfg.pixel_size_nm)
    grain = _smooth_field(rng, size, grain_px) * 3.0  # ~unit std before the amplitude
    support_t = np.clip(1 + cfg.support_thickness_var * low, 0.03, None)
    support_t = _jitter(support_t * np.clip(1 + cfg.support_texture * grain, 0.2, None), row_shift)
    # A mean-size particle has peak relative thickness 1.
    rel_t = thickness / (cfg.mean_diameter_nm / cfg.pixel_size_nm)

    blur = float(np.hypot(cfg.probe_blur, cfg.defocus_blur))
    if cfg.modality == "haadf":
        support_img = 0.2 * support_t
        clean_img = support_img + cfg.particle_contrast * rel_t
    else:
        background = 0.9 * np.exp(-0.2 * support_t)
        support_img = background
        clean_img = background * np.exp(-cfg.particle_contrast * rel_t)
        # Fresnel fringe (under-focus): bright just outside the edge, dark just inside. Wider with defocus.
        m = mask.astype(np.float64)
        s1, s2 = 1.0 + 0.3 * cfg.defocus_blur, 2.5 + 0.6 * cfg.defocus_blur
        dog = ndimage.gaussian_filter(m, s2) - ndimage.gaussian_filter(m, s1)
        clean_img = clean_img + cfg.fringe_strength * dog / (np.abs(dog).max() + 1e-12)
    if blur > 0:
        clean_img = ndimage.gaussian_filter(clean_img, blur)
        support_img = ndimage.gaussian_filter(support_img, blur)
    # Keep the clean signal inside [0, 1] so the 8/16-bit files need no clipping.
    scale = max(1.0, float(np.percentile(clean_img, 99.95)) / 0.95)
    clean_img, support_img = clean_img / scale, support_img / scale

    contrast = float(np.abs(clean_img - support_img)[mask].mean()) if mask.any() else 0.1
    level = float(np.clip(clean_img[mask] if mask.any() else clean_img, 1e-3, None).mean())
    read = cfg.read_noise
    dose = cfg.dose
    if cfg.snr is not None:
        # Split the noise variance the SNR asks for between read noise (capped) and shot noise (via the dose).
        target_var = (contrast / cfg.snr) ** 2
        read = min(read, 0.5 * np.sqrt(target_var))
        dose = level / (target_var - read**2)
    noisy = np.clip(clean_img, 0, None)
    if dose is not None:
        noisy = rng.poisson(noisy * dose) / dose
    noisy = noisy + read * rng.standard_normal(noisy.shape)
    image = np.clip(noisy, 0, 1).astype(np.float32)
    info = {"n_particles": len(particles.centers), "contrast": contrast, "blur_px": blur, "dose": dose}
    return SynthLayers(
        image=image,
        mask=mask,
        labels=labels,
        clean=clean_img.astype(np.float32),
        support=support_img.astype(np.float32),
        particles=particles,
        dose=dose,
        info=info,
    )


def make_image(
    cfg: SynthConfig, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one synthetic micrograph with its exact masks.

    Args:
        cfg: Settings.
        rng: Generator or seed; None uses ``cfg.seed``.

    Returns:
        (image, mask, labels): image float32 in [0, 1]; mask bool (particle pixels); labels int32 (0 = support,
        i = particle i).

    Shape:
        all (cfg.size, cfg.size).
    """
    layers = render_layers(cfg, rng)
    return layers.image, layers.mask, layers.labels


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def make_stack(
    out_dir: str | os.PathLike,
    n: int = 8,
    modality: Modality = "haadf",
    size: int = 512,
    snr: float | None = None,
    seed: int = 0,
    hard: bool = False,
    bit_depth: Literal[8, 16] = 16,
    vary: float = 0.25,
    **kw,
) -> Path:
    """Write a synthetic stack: ``images/``, ``masks/`` (0/255), ``labels/`` (16-bit instance ids) and
    ``pixel_size.json`` (calibration plus every generator setting), each file atomically.

    Args:
        out_dir: Stack folder (created; existing files of the same names are replaced).
        n: Number of images.
        modality: 'haadf' or 'bf-tem'.
        size: Image side, px.
        snr: Signal-to-noise ratio; None keeps the preset's.
        seed: Seed of the whole stack.
        hard: Use the 'hard' preset (low SNR, thick uneven support, defocus, clustering).
        bit_depth: 8 or 16-bit image PNGs.
        vary: Relative image-to-image variation of density, support and clustering (a real stack is not uniform).
        **kw: Further :class:`SynthConfig` fields.

    Returns:
        The stack folder.
    """
    if n < 1:
        raise ValueError(f"make_stack n={n} must be >= 1")
    if bit_depth not in (8, 16):
        raise ValueError(f"make_stack bit_depth={bit_depth} must be 8 or 16")
    overrides = {"modality": modality, "size": size, "seed": seed, **kw}
    if snr is not None:
        overrides["snr"] = snr
    base = synth_config("hard" if hard else "default", **overrides)
    out = Path(out_dir)
    for sub in ("images", "masks", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    per_image = {}
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        rng = np.random.default_rng(child)
        wobble = 1 + vary * rng.uniform(-1, 1, 3)
        cfg = replace(
            base,
            density=base.density * wobble[0],
            support_thickness_var=float(min(0.95, base.support_thickness_var * wobble[1])),
            clustering=float(np.clip(base.clustering * wobble[2], 0, 1)),
        )
        image, mask, labels = make_image(cfg, rng)
        name = f"{modality}_{i:03d}"
        peak = 65535 if bit_depth == 16 else 255
        _save_png(
            np.round(image * peak).astype(np.uint16 if bit_depth == 16 else np.uint8),
            out / "images" / f"{name}.png",
        )
        _save_png((mask * 255).astype(np.uint8), out / "masks" / f"{name}.png")
        _save_png(labels.astype(np.uint16), out / "labels" / f"{name}.png")
        per_image[name] = {
            "density": cfg.density,
            "support_thickness_var": cfg.support_thickness_var,
            "clustering": cfg.clustering,
            "n_particles": int(labels.max()),
        }
    meta = {
        "pixel_size_nm": base.pixel_size_nm,
        "generator": "tgan_ray.data.synthetic",
        "preset": "hard" if hard else "default",
        "settings": asdict(base),
        "images": per_image,
    }
    tmp = out / ".pixel_size.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "pixel_size.json")
    return out
