"""Pseudo-labels of real frames: the rough segmenter's confident particles, with what it is unsure of left out.

NPsSegNet trained on virtual pairs alone never sees a real frame, and virtual images at a CPU budget miss much of
the real support's texture. So it also trains on crops of the real stack, labelled without a person:

- particle: a particle the classical segmenter keeps at its normal (precision-first) confidence;
- unsure (left out of the loss): anything it finds only at its loosest setting (a faint or touching particle,
  or support texture), and a band of ``band_px`` on each side of a confident particle's edge (the classical
  edge is a contrast threshold, not a boundary a person would draw);
- background: everything else.

The network then learns what particles and support look like in the real frames, decides the unsure regions
itself, and takes its boundaries from the virtual pairs, whose masks are exact.

    label = pseudo_label(confident_mask, candidate_mask)
    write_pseudo_label(path, label); label = read_pseudo_label(path)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

IGNORE = 255  # label value left out of the segmenter's loss (smp losses' ignore_index)
_PNG_UNSURE = (
    127  # on disk: 0 background, 127 unsure, 255 particle (a "> 127" mask reader sees the particles)
)


def pseudo_label(confident: np.ndarray, candidates: np.ndarray, band_px: int = 1) -> np.ndarray:
    """uint8 label image: 0 background, 1 particle, :data:`IGNORE` unsure.

    Args:
        confident: Particles kept at the rough segmenter's normal confidence (bool, H x W).
        candidates: Everything it finds at its loosest setting (bool, H x W; a superset in practice).
        band_px: Half-width of the unsure band around each confident edge, px (0: none).
    """
    confident, candidates = np.asarray(confident, bool), np.asarray(candidates, bool)
    if confident.shape != candidates.shape:
        raise ValueError(
            f"confident mask {confident.shape} and candidates {candidates.shape} differ in shape"
        )
    label = confident.astype(np.uint8)
    unsure = candidates & ~confident
    if band_px > 0 and confident.any():
        ring = ndi.generate_binary_structure(2, 1)
        grown = ndi.binary_dilation(confident, ring, iterations=band_px)
        shrunk = ndi.binary_erosion(confident, ring, iterations=band_px)
        unsure |= grown & ~shrunk
    label[unsure] = IGNORE
    return label


def write_pseudo_label(path: str | Path, label: np.ndarray) -> None:
    """Save a pseudo-label as an 8-bit PNG, atomically (0 background, 127 unsure, 255 particle)."""
    from tgan_ray.io import write_png

    write_png(path, np.where(label == IGNORE, _PNG_UNSURE, np.where(label > 0, 255, 0)).astype(np.uint8))


def read_pseudo_label(path: str | Path) -> np.ndarray:
    """The label image :func:`write_pseudo_label` saved (0, 1, :data:`IGNORE`)."""
    from PIL import Image

    png = np.asarray(Image.open(path))
    label = (png > _PNG_UNSURE).astype(np.uint8)
    label[(png > 0) & (png <= _PNG_UNSURE)] = IGNORE
    return label
