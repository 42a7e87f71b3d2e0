"""Step 2: rough masks of subset 1 (paper: "any available segmenter"; only rough morphology is needed).

:func:`create_rough_segmenter` builds one from ``cfg.rough``: 'classical' is the training-free default
(:class:`tgan_ray.masks.classical.ClassicalSegmenter`); 'model' uses a trained NPsSegNet instead (how a HAADF
model seeds a BF-TEM run); 'sam' uses Segment Anything when it is installed. :func:`check_masks` stops a run whose
rough masks hold no particle at all, since the morphology prior would have nothing to learn from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from tgan_ray.config import RoughMaskConfig
from tgan_ray.masks.classical import ClassicalSegmenter
from tgan_ray.masks.particle_labels import cut_touching


class NoParticlesError(ValueError):
    """The rough masks hold no particle at all: nothing to learn a morphology from."""


class SamSegmenter:
    """Segment Anything's automatic mask generator, kept to particle-sized segments of the right contrast.

    Args:
        checkpoint: Local SAM weights; the model type (vit_h / vit_l / vit_b) is read from the file name.
        particle_contrast: 'bright', 'dark' or 'auto' (as :class:`ClassicalSegmenter` decides it).
        max_area_fraction: Segments larger than this fraction of the frame are support, not particles.
    """

    def __init__(self, checkpoint: str, particle_contrast: str = "auto", max_area_fraction: float = 0.01):
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        kind = next((k for k in ("vit_h", "vit_l", "vit_b") if k in str(checkpoint)), "vit_b")
        self.generator = SamAutomaticMaskGenerator(sam_model_registry[kind](checkpoint=str(checkpoint)))
        self.contrast = ClassicalSegmenter(particle_contrast)
        self.max_area_fraction = max_area_fraction

    def segment(self, image: np.ndarray) -> np.ndarray:
        x, _, _ = self.contrast._analyse(image, None, radius=1.0)  # oriented so particles are bright
        rgb = np.repeat((x * 255).astype(np.uint8)[..., None], 3, axis=2)
        labels = np.zeros(x.shape, np.int32)
        for i, seg in enumerate(sorted(self.generator.generate(rgb), key=lambda s: -s["area"]), start=1):
            m = seg["segmentation"]
            ring = ndi.binary_dilation(m, iterations=3) & ~m
            if seg["area"] <= self.max_area_fraction * x.size and ring.any() and x[m].mean() > x[ring].mean():
                labels[m] = i  # smaller segments, drawn last, win overlaps
        return cut_touching(labels)


def create_rough_segmenter(cfg: RoughMaskConfig, device: str = "cpu"):
    """Build the step-2 segmenter named by ``cfg.method``: an object with ``segment(image) -> bool mask``.

    Args:
        cfg: The ``rough`` config section.
        device: Torch device for 'model'.
    """
    if cfg.method == "classical":
        return ClassicalSegmenter(cfg.particle_contrast, cfg.min_particle_px, cfg.confidence)
    if cfg.method == "model":
        if not cfg.seed_model:
            raise ValueError(
                "rough.method=model needs rough.seed_model (an NPsSegNet checkpoint, --seed-model)"
            )
        from tgan_ray.inference import Segmenter  # the one sliding-window NPsSegNet (steps 8 and serve)

        return Segmenter(cfg.seed_model, device=device)
    if cfg.method == "sam":
        if not cfg.sam_checkpoint:
            raise ValueError("rough.method=sam needs rough.sam_checkpoint (local Segment Anything weights)")
        try:
            import segment_anything  # noqa: F401
        except ImportError:
            raise ImportError(
                "rough.method=sam needs Segment Anything: pip install segment-anything"
            ) from None
        return SamSegmenter(cfg.sam_checkpoint, cfg.particle_contrast)
    raise KeyError(f"unknown rough.method {cfg.method!r}; choose one of: classical, model, sam")


def check_masks(masks: Sequence[np.ndarray], sources: Sequence[str], hint: str | None = None) -> list[int]:
    """Particles per rough mask; raises :class:`NoParticlesError` when no mask holds any.

    Args:
        masks: Rough masks (bool or labels).
        sources: A name per mask (file stem or URI), for the message.
        hint: What to try, for the message (default: the classical segmenter's settings).

    Returns:
        The particle count of each mask.
    """
    counts = [int(ndi.label(np.asarray(m) > 0, structure=np.ones((3, 3)))[1]) for m in masks]
    if not any(counts):
        names = ", ".join(map(str, list(sources)[:5])) + (", ..." if len(sources) > 5 else "")
        hint = hint or "try --particle-contrast bright|dark, a lower rough.confidence, or a --seed-model"
        raise NoParticlesError(f"rough masks of {len(counts)} image(s) ({names}) hold no particles; {hint}")
    return counts
