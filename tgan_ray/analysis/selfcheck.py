"""Can this run's label-free masks be trusted? A user has no labels, so the run checks itself with what it has.

Signals (each recorded in ``summary.json`` under ``self_check`` and shown in the report):

- **step 2's particles**: do the rough masks look like particles at all? Enough of them per frame, a size near
  the working scale the stack was rescaled to, and a contrast against a ring of support well above that of the
  same shapes moved onto the support. A prior made of support texture (or of one particle) poisons every later
  step. (Not against the pixel noise: a 60 px BF-TEM particle 2.6x the noise std below its support is beyond
  doubt, because its mean is over thousands of pixels; the support's own blobs are the rival explanation.)
- **agreement with the rough segmenter**, on held-out frames, both ways. (a) Found: the classical segmenter is
  precision-first, so almost every particle it is sure of is real; label-free masks that miss most of them are
  likely worse than the rough ones, whatever else they find. A confident particle counts as found when one
  label-free particle matches it at IoU >= 0.3, the benchmark's detection criterion for boxes: the two segmenters
  draw a particle's edge differently by design (step 2 grows it to 30% of its peak), and at IoU 0.5 runs that beat
  the rough masks by 0.03-0.18 F1 "missed" 26-39% of them. (b) Supported: the share of label-free particles under
  which the classical segmenter, at its loosest, sees a candidate blob; particles with no contrast evidence at all
  are likely false (a run whose precision collapsed had 30% supported; runs better than rough, 90-97%).
  Either below one half warns. (docs/quality.md, "The self-check against the benchmark", has the measurements.)
- **realism of the virtual data**: KID of the images the segmenter trained on against real crops (recorded; no
  fixed threshold means the same on every detector).
- **per-image uncertainty**: the share of a frame's marked pixels the segmenter is unsure of (0.2 < p < 0.8);
  the frames to check by eye come first.

The verdict is ``ok`` or ``check``; with ``check``, ``warning`` is one line for the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.measure import label, regionprops

# A label-free run that finds fewer than this share of the rough segmenter's confident particles, or whose
# particles have a classical candidate under them less often than this, is flagged: "most of them".
MIN_CONFIDENT_RECALL = 0.5
MIN_SUPPORTED = 0.5
# NPsSegNet's probability above which a pixel is a candidate: a later round's pseudo-labels call p 0.2-0.5 unsure.
CANDIDATE_PROBABILITY = 0.2
# Step 2: fewest particles per frame, size band around the working scale, least contrast-to-noise ratio.
MIN_PARTICLES_PER_FRAME = 2.0
SIZE_BAND = (0.5, 2.0)
MIN_CONTRAST_TO_SUPPORT = 3.0
# How many random moves of each frame's particle shapes onto the support make the reference contrasts.
SUPPORT_SHIFTS = 8
# IoU at which a label-free particle finds a confident one (the benchmark's detection criterion for boxes).
MATCH_IOU = 0.3


def support_contrast(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast (inside minus ring) of the mask's particle shapes moved at random onto the support.

    Each move rolls the whole label map by a random offset; only shapes that land clear of every particle and its
    ring count. The spread of these values is what support texture alone gives a particle-shaped region.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    from tgan_ray.masks.consistency import RING_PX

    labels = label(mask)
    if labels.max() == 0:
        return np.zeros(0, np.float32)
    occupied = ndi.binary_dilation(mask, iterations=RING_PX)
    values = []
    for dy, dx in rng.integers(0, mask.shape, size=(SUPPORT_SHIFTS, 2)):
        moved = np.roll(labels, (dy, dx), axis=(0, 1))
        moved[np.isin(moved, np.unique(moved[occupied]))] = 0
        index = np.unique(moved[moved > 0])
        if not index.size:
            continue
        ring = np.where(occupied | (moved > 0), 0, expand_labels(moved, RING_PX))
        with np.errstate(invalid="ignore", divide="ignore"):  # a shape with no free ring gives NaN: dropped
            c = np.asarray(ndi.mean(image, moved, index)) - np.asarray(ndi.mean(image, ring, index))
        values.append(c[np.isfinite(c)])
    return np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)


def rough_plausibility(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], expected_diameter_px: float | None
) -> dict:
    """Whether step 2's particles look like particles (images and masks at the working scale)."""
    from tgan_ray.masks.consistency import particle_contrast

    counts = [int(label(m).max()) for m in masks]
    diameters = np.concatenate(
        [[p.equivalent_diameter_area for p in regionprops(label(m))] for m in masks] or [[]]
    )
    contrast = np.concatenate([np.abs(particle_contrast(i, m > 0)[0]) for i, m in zip(images, masks)] or [[]])
    contrast = contrast[np.isfinite(contrast)]
    rng = np.random.default_rng(0)
    support = np.concatenate([support_contrast(i, m > 0, rng) for i, m in zip(images, masks)] or [[]])
    spread = 1.4826 * float(np.median(np.abs(support - np.median(support)))) if len(support) > 4 else None
    out = {
        "particles_per_frame": float(np.mean(counts)) if counts else 0.0,
        "median_diameter_px": float(np.median(diameters)) if len(diameters) else None,
        "expected_diameter_px": expected_diameter_px,
        "contrast_to_support": (
            float(np.median(contrast) / max(spread, 1e-6)) if len(contrast) and spread is not None else None
        ),
    }
    reasons = []
    if out["particles_per_frame"] < MIN_PARTICLES_PER_FRAME:
        reasons.append(f"step 2 found {sum(counts)} particle(s) in {len(counts)} frame(s)")
    if out["median_diameter_px"] and expected_diameter_px:
        ratio = out["median_diameter_px"] / expected_diameter_px
        if not SIZE_BAND[0] <= ratio <= SIZE_BAND[1]:
            reasons.append(
                f"step 2's particles are {out['median_diameter_px']:.1f} px across where the stack's blobs are "
                f"{expected_diameter_px:.1f} px"
            )
    if out["contrast_to_support"] is not None and out["contrast_to_support"] < MIN_CONTRAST_TO_SUPPORT:
        reasons.append(
            f"step 2's particles stand out from their support only {out['contrast_to_support']:.1f}x as much as "
            "patches of support of their shape do (support texture?)"
        )
    return out | {"ok": not reasons, "reasons": reasons}


def label_free_particles(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Label-free masks split into particles as the particle table splits them (``split_touching``): the
    instance labels both agreement signals take, split once."""
    from tgan_ray.analysis.particles import split_touching

    return [split_touching(np.asarray(m) > 0) for m in masks]


def confident_recall(label_free: Sequence[np.ndarray], confident: Sequence[np.ndarray]) -> dict:
    """Share of the rough segmenter's confident particles that one label-free particle matches at IoU >= 0.3.

    Args:
        label_free: instance labels of the label-free particles (:func:`label_free_particles`).
        confident: the confident masks, already cut apart.
    """
    from tgan_ray.metrics.segmentation import instance_iou_matrix, match_by_iou

    found = total = 0
    per_image = []
    for lf, conf in zip(label_free, confident, strict=True):
        labels = label(conf)
        n = int(labels.max())
        hit = 0
        if n and lf.any():
            iou = instance_iou_matrix(labels, lf)
            hit = int(match_by_iou(iou, MATCH_IOU)[0].size)
        found, total = found + hit, total + n
        per_image.append(hit / n if n else None)
    return {
        "confident": total,
        "found": found,
        "recall": found / total if total else None,
        "per_image": per_image,
    }


def supported_share(label_free: Sequence[np.ndarray], candidates: Sequence[np.ndarray]) -> dict:
    """Share of the label-free particles (instance labels, :func:`label_free_particles`) that overlap a candidate
    blob of the classical segmenter at its loosest setting."""
    supported = total = 0
    for labels, cand in zip(label_free, candidates, strict=True):
        total += int(labels.max())
        supported += int(np.unique(labels[(labels > 0) & (np.asarray(cand) > 0)]).size)
    return {"particles": total, "supported": supported, "share": supported / total if total else None}


LEAD_NETWORK, LEAD_ROUGH = "NPsSegNet", "rough"


def merge_with_rough(network: np.ndarray, rough: np.ndarray) -> tuple[np.ndarray, str]:
    """One frame's masks from both segmenters (``segmenter.merge_rough``): one leads and keeps its outlines, the
    other adds its particles that touch none of the leader's.

    NPsSegNet leads unless, on this frame, it misses most of the rough segmenter's particles: the self-check's
    agreement signal (:func:`confident_recall`, :data:`MIN_CONFIDENT_RECALL`) taken per frame instead of per run.
    The rough segmenter is precision-first, so where the network finds under half of its particles the network
    is likely the worse of the two there (docs/quality.md, "Merged with the rough particles").

    Args:
        network: (H, W) bool, NPsSegNet's mask of the frame.
        rough: (H, W) bool, the rough segmenter's mask of the same frame (particles already cut apart).

    Returns:
        The merged (H, W) bool mask, and which segmenter led (:data:`LEAD_NETWORK` or :data:`LEAD_ROUGH`).
    """
    from tgan_ray.masks.consistency import unmasked_particles

    network, rough = np.asarray(network, bool), np.asarray(rough, bool)
    recall = confident_recall(label_free_particles([network]), [rough])["recall"]
    if recall is None or recall >= MIN_CONFIDENT_RECALL:
        return network | unmasked_particles(rough, network), LEAD_NETWORK
    return rough | unmasked_particles(network, rough), LEAD_ROUGH


def add_agreed_candidates(
    mask: np.ndarray,
    candidates: np.ndarray,
    probability: np.ndarray,
    threshold: float = CANDIDATE_PROBABILITY,
) -> np.ndarray:
    """``mask`` plus each particle both segmenters call a candidate (``segmenter.merge_candidates``): a blob of
    the rough segmenter at its loosest setting that touches none of the mask's particles and where NPsSegNet's
    probability passes ``threshold`` (the level at which a later round's pseudo-labels call a pixel unsure).

    Either signal alone is weak: on PtW the loose blobs hold 44% of the particles the merged masks miss, among
    ten times as many grains of support; the network's probability picks the real ones out of them
    (docs/quality.md, "Candidates both segmenters see").

    Args:
        mask: (H, W) bool, the frame's merged mask.
        candidates: (H, W) bool, the rough segmenter's blobs at confidence 0 (touching ones cut apart).
        probability: (H, W) NPsSegNet's particle probability of the frame.
    """
    from scipy import ndimage as ndi

    from tgan_ray.masks.consistency import unmasked_particles
    from tgan_ray.masks.particle_labels import labelled_stat

    blobs = label(unmasked_particles(candidates, mask))
    n = int(blobs.max())
    if n == 0:
        return mask
    keep = np.zeros(n + 1, bool)
    keep[1:] = labelled_stat(ndi.maximum, probability, blobs, np.arange(1, n + 1)) > threshold
    return mask | keep[blobs]


def tandem_mask(
    segmenter,
    probability: np.ndarray,
    image: np.ndarray,
    scale: float | None = None,
    rough: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """Step 8's mask of one frame from both segmenters: NPsSegNet's, its faint particles dropped against the bar
    ``rough``'s particles set (:meth:`~tgan_ray.inference.Segmenter.to_mask`), merged with ``rough``
    (:func:`merge_with_rough`) and with the ``candidates`` it also marks (:func:`add_agreed_candidates`).

    Args:
        segmenter: the :class:`~tgan_ray.inference.Segmenter` whose ``probability`` of ``image`` this is.
        scale: the frame's working scale (None: the model's); ``rough``, ``candidates``: (H, W) bool or None,
            which leaves that part out.

    Returns:
        The (H, W) bool mask, and which segmenter led (:data:`LEAD_NETWORK` or :data:`LEAD_ROUGH`).
    """
    mask = segmenter.to_mask(probability, scale=scale, image=image, rough=rough)
    lead = LEAD_NETWORK
    if rough is not None:
        mask, lead = merge_with_rough(mask, rough)
    if candidates is not None:
        mask = add_agreed_candidates(mask, candidates, probability)
    return mask, lead


def uncertainty(probability: np.ndarray, low: float = CANDIDATE_PROBABILITY, high: float = 0.8) -> float:
    """Share of the pixels a segmenter marks at all (p > low) that it is unsure of (low < p < high)."""
    marked = probability > low
    if not marked.any():
        return 0.0
    return float(np.mean(probability[marked] < high))


def verdict(
    plausibility: dict, agreement: dict, realism: dict | None = None, support: dict | None = None
) -> dict:
    """``{"verdict": "ok" | "check", "warning": one line or None, ...signals}``."""
    reasons = list(plausibility.get("reasons", []))
    recall = agreement.get("recall")
    if recall is not None and recall < MIN_CONFIDENT_RECALL:
        reasons.append(
            f"the label-free masks miss {1 - recall:.0%} of the {agreement['confident']} particles the rough "
            "segmenter is sure of"
        )
    share = (support or {}).get("share")
    if share is not None and share < MIN_SUPPORTED:
        reasons.append(
            f"{1 - share:.0%} of the {support['particles']} label-free particles have no classical candidate "
            "under them (false particles?)"
        )
    warning = None
    if reasons:
        warning = (
            "self-check: the label-free masks are likely worse than the rough ones ("
            + "; ".join(reasons)
            + "); compare with `tgan segment --rough`"
        )
    return {
        "verdict": "check" if reasons else "ok",
        "warning": warning,
        "step2": plausibility,
        "agreement": {k: v for k, v in agreement.items() if k != "per_image"},
        "support": support or {},
        "realism": realism or {},
    }
