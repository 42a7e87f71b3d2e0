"""Label images of the rough segmenter's particles: split, grown to their edges, and made into masks.

After :class:`tgan_ray.masks.classical.ClassicalSegmenter` has detected its particles on a shrunk working copy,
these steps shape them: touching particles are split at the known particle radius, each particle is grown from its
strict-threshold core out to its true edge, the labels go back to full resolution with smooth edges, and a saved
0/1 mask keeps touching particles 1 px apart (:func:`cut_touching`, also used for SAM's and the pipeline's masks).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels, watershed
from skimage.transform import resize


def labelled_stat(stat, values: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``stat(values, labels, index)`` (an ndi label statistic: mean, maximum, ...) over the labelled pixels only.

    The same sums in the same order, so the same numbers; but particles and their rings cover a few percent of a
    frame, and ndi passes over (for maximum: sorts) every pixel (2048 px frame: 0.4 s -> 0.01 s). NaN for every
    index when nothing is labelled, as ndi's mean gives.
    """
    inside = labels > 0
    if not inside.any():
        return np.full(len(index), np.nan)
    return np.asarray(stat(values[inside], labels[inside], index))


def inside_distance(mask: np.ndarray, blobs: np.ndarray | None = None) -> np.ndarray:
    """``ndi.distance_transform_edt(mask)``, the same numbers, computed blob by blob in each blob's box grown by 1 px.

    A blob pixel's nearest background pixel always lies in that box: on a monotone path from the pixel to any
    background pixel (8- or 4-connected, as the blobs are), the first pixel off the blob is background, touches the
    blob and is no farther. Particles cover a few percent of a frame, so the boxes hold far fewer pixels than the
    frame (a 2048 px PtW frame's mask: 0.4-0.6 s -> 0.03 s).

    Args:
        mask: (H, W) bool.
        blobs: the mask's connected components (any connectivity), where the caller has them; None labels them.
    """
    mask = np.asarray(mask, bool)
    if mask.all() or not mask.any():
        return ndi.distance_transform_edt(mask)
    if blobs is None:
        blobs, _ = ndi.label(mask, structure=np.ones((3, 3)))
    distance = np.zeros(mask.shape)
    for i, box in enumerate(ndi.find_objects(blobs), start=1):
        if box is None:  # a label with no pixels
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        own = blobs[grown] == i
        distance[grown][own] = ndi.distance_transform_edt(mask[grown])[own]
    return distance


def expand_labels_near(labels: np.ndarray, distance: int) -> np.ndarray:
    """skimage's ``expand_labels(labels, distance)``, run on the box of each group of particles within reach of one
    another instead of over the whole frame. A pixel within ``distance`` of a particle lies in that particle's
    group, with every particle as near, so it gets the same label (bit for bit on random masks, tests/test_rough.py)
    in half the time: on a 2048 px frame with particles on a few percent of it, the whole-frame distance transform
    is mostly spent far from any.
    """
    near = ndi.binary_dilation(labels > 0, disk_footprint(distance + 1))
    groups, _ = ndi.label(near, structure=np.ones((3, 3)))
    expanded = np.zeros_like(labels)
    for i, box in enumerate(ndi.find_objects(groups), start=1):
        own = groups[box] == i
        expanded[box][own] = expand_labels(labels[box], distance)[own]
    return expanded


def disk_footprint(radius: float) -> np.ndarray:
    """Offsets within ``radius`` of the centre: a dilation by it marks the pixels at most ``radius`` from an object,
    as a distance transform's ``<= radius`` does, without computing every pixel's distance (2048 px: 0.3 -> 0.05 s).
    Not skimage's ``disk``, which takes an integer radius."""
    k = int(np.floor(radius))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return yy**2 + xx**2 <= radius**2


def cut_touching(labels: np.ndarray) -> np.ndarray:
    """Boolean mask with a 1-px gap wherever two labels touch, so a saved 0/1 mask keeps them apart."""
    return (labels > 0) & ~(ndi.maximum_filter(labels, size=3) > labels)


def split_particles(binary: np.ndarray, r: float, min_area: float) -> np.ndarray:
    """Fill holes, drop specks, and split touching particles by a watershed on the distance map.

    Not :func:`tgan_ray.analysis.split_touching`, which has to guess the particle size from the mask itself: here
    the candidate radius ``r`` is known, so the seeds' spacing and the speck size follow it.
    """
    binary = ndi.binary_fill_holes(binary)
    blobs, _ = ndi.label(binary)
    small = np.bincount(blobs.ravel()) < max(min_area, np.pi * (0.35 * r) ** 2, 2)
    small[0] = True
    binary = ~small[blobs]
    distance = inside_distance(binary, np.where(binary, blobs, 0))
    # One seed per local maximum of the (lightly smoothed) distance map within 0.7 r: every object gets its
    # global maximum, and two particles joined by a neck get one each.
    smooth = ndi.gaussian_filter(distance, 0.5)
    size = 2 * max(2, int(0.7 * r)) + 1
    markers, _ = ndi.label((smooth == ndi.maximum_filter(smooth, size=size)) & binary)
    return watershed(-distance, markers, mask=binary)


def grow_to_edges(
    labels: np.ndarray, raw: np.ndarray, r: float, edge_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Grow each detected particle out to where its contrast falls to ``edge_fraction`` of its peak.

    The detection threshold is strict (precision first), so it cuts particles at their bright core; sizes then
    come out small. Each particle floods (watershed on the contrast, never past 0.5 r nor into a neighbour) over
    the pixels above its own edge level.

    Returns:
        (labels, edge score: > 0 inside a particle, for the upsampling's sub-pixel edges).
    """
    n = int(labels.max())
    if n == 0:
        return labels, np.full_like(raw, -1.0)
    level = np.zeros(n + 1)
    level[1:] = edge_fraction * labelled_stat(ndi.maximum, raw, labels, np.arange(1, n + 1))
    near = ndi.binary_dilation(labels > 0, disk_footprint(0.5 * r))
    grown = watershed(-raw, labels, mask=(near & (raw > level[1:].min())) | (labels > 0))
    grown = np.where((raw >= level[grown]) | (labels > 0), grown, 0)
    edge = level[ndi.grey_dilation(grown, size=3)]
    score = np.where(edge > 0, raw - edge, -1.0)
    score[labels > 0] = np.maximum(score[labels > 0], 1e-6)
    return grown, score


def upsample_labels(labels: np.ndarray, score: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Labels from a shrunk copy back to full resolution, with smooth (bilinear) rather than blocky edges."""
    h, w = shape
    up_score = resize(score, [n * factor for n in score.shape], order=1)[:h, :w]
    up_labels = np.kron(labels, np.ones((factor, factor), labels.dtype))[:h, :w]
    grown = ndi.grey_dilation(up_labels, size=2 * factor + 1)  # reach the bilinear edge beyond the blocks
    up_labels = np.where(up_labels > 0, up_labels, grown)
    return np.where(up_score > 0, up_labels, 0)
