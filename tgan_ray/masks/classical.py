"""Step 2's default rough segmenter: training-free, tuned for precision over recall.

The morphology prior wants particles that are surely particles, not every bright speck of support texture.
:class:`ClassicalSegmenter` detects them against a top-hat background, keeps the plausible ones, and chooses the
particle scale per frame or per stack. Every length scales with the particle radius it estimates from the image
itself, so no pixel size is wired in:

    seg = ClassicalSegmenter(particle_contrast="auto")
    mask = seg.segment(image)                # bool, same shape; touching particles kept 1 px apart
    radius_px = seg.estimate_scale(image)

The radius and contrast come from :mod:`tgan_ray.masks.scale_space`; the detected labels are split, grown to
their edges and brought back to full resolution by :mod:`tgan_ray.masks.particle_labels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from skimage.morphology import disk, opening
from skimage.segmentation import relabel_sequential
from skimage.transform import resize

from tgan_ray.io import normalize_intensity
from tgan_ray.masks.particle_labels import (
    cut_touching,
    grow_to_edges,
    labelled_stat,
    split_particles,
    upsample_labels,
)
from tgan_ray.masks.scale_space import (
    Contrast,
    bright_radius,
    distinct,
    log_significance,
    pick_contrast,
    scan,
    shrink,
)

_WORK_RADIUS_PX = 6.0  # segmentation runs on a copy shrunk until particles are about this radius

# Smallest frame side the scale-space analysis works on, px.
MIN_FRAME_PX = 16
# Fewer particles than this in a frame say too little about their size (particle_diameter).
MIN_MEASURED_PARTICLES = 5
# How far below a frame's own blob-scan radius a stack candidate may lie and still win on count alone: about the
# spread of one frame's particle sizes (p10 to p90 of the equivalent radius of the shared real frames' boxes: median
# 2.2x, 1.5-3.6x).
SMALLER_THAN_SCAN = 2.5


class _Pick(NamedTuple):
    """A frame's pick (:meth:`ClassicalSegmenter.pick_radius`) and the frame as its scan normalised it."""

    radius: float
    labels: np.ndarray
    frame: np.ndarray  # normalised, particles bright (ClassicalSegmenter._analyse)
    contrast: Contrast


def _as_frame(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < MIN_FRAME_PX:
        raise ValueError(
            f"rough segmenter needs a 2-D frame of at least {MIN_FRAME_PX}x{MIN_FRAME_PX} px, got shape {image.shape}"
        )
    return normalize_intensity(image)


# A particle's edge: where its contrast above the support falls to this fraction of its peak.
# - bright (HAADF): intensity follows projected thickness; a sphere's falls to 50% at 0.87 R (a half-maximum
#   contour undersizes diameters by 13%) and to 30% at 0.95 R. On synthetic stacks 0.3 brings the mask area to
#   0.92-1.04x the truth (was 0.68-0.88x).
# - dark (BF-TEM): diffraction and absorption contrast saturate within a few nm of crystal, so a particle is a
#   flat-bottomed dip, a blurred step, whose true edge is at half its depth. 0.3 grew the masks of the real
#   tem-sintering frames 21% too wide in diameter; 0.5 left them 6% wide (MIoU 0.857 -> 0.890).
EDGE_FRACTION = {"bright": 0.3, "dark": 0.5}


def sized_count(labels: np.ndarray, radius: float) -> int:
    """Particles of ``labels`` whose equivalent radius is within 2x of ``radius`` either way."""
    area = np.bincount(labels.ravel())[1:]
    size = np.sqrt(area[area > 0] / np.pi)
    return int(np.sum((size > 0.5 * radius) & (size < 2 * radius)))


class ClassicalSegmenter:
    """Training-free rough segmenter: scale-space particle size, top-hat background, threshold, plausibility.

    Pipeline (every length in units of the estimated particle radius r, no pixel size wired in):
    robust normalisation -> flip dark particles -> r = significance-weighted median radius of LoG scale-space
    blobs -> shrink the frame until r ~ 6 px -> Gaussian denoise (0.25 r; before the top-hat, whose opening is
    biased low by noise) -> white top-hat with a disk of 2.5 r -> Otsu threshold scaled by ``confidence``,
    never below a noise floor -> fill holes -> drop objects under ``min_particle_px`` or (0.35 r)^2 pi ->
    split touching particles (distance watershed) -> keep objects that are convex, not streaks, significant
    in scale space at their own size, and brighter than a ring of background around them -> grow each to where
    its contrast falls to 30% (bright) or 50% (dark) of its peak (sizes, not the strict threshold, set the
    edge) -> full resolution.

    Args:
        particle_contrast: 'bright' (HAADF), 'dark' (BF-TEM) or 'auto' (decided per image).
        min_particle_px: Smallest particle area kept, px of the input frame.
        confidence: 0..1; higher keeps fewer, surer particles (stricter threshold, shape and contrast tests).
        threads: Threads for a frame's candidate radii (:meth:`pick_radius`); None: every CPU of this process.
    """

    def __init__(
        self,
        particle_contrast: Literal["auto", "bright", "dark"] = "auto",
        min_particle_px: int = 12,
        confidence: float = 0.5,
        threads: int | None = None,
    ):
        if particle_contrast not in ("auto", "bright", "dark"):
            raise ValueError(f"particle_contrast={particle_contrast!r}; choose auto, bright or dark")
        if not 0 <= confidence <= 1:
            raise ValueError(f"confidence={confidence} must lie in [0, 1]")
        self.particle_contrast = particle_contrast
        self.min_particle_px = int(min_particle_px)
        self.confidence = float(confidence)
        # pick_radius's blob scan and candidates are independent, and scipy's filters and scikit-image's watershed
        # release the GIL: threads use the cores one frame would leave idle (2048 px PtW frame, 2 cores: 14.9 -> 9.2 s)
        self.threads = threads or _usable_cpus()

    # -- analysis ------------------------------------------------------------------------------------------------
    def _analyse(self, image: np.ndarray, contrast: str | None, radius: float | None):
        """-> (frame in [0, 1] with bright particles, contrast, radius px); each blob scan runs at most once."""
        x = _as_frame(image)
        contrast = contrast or self.particle_contrast
        scans = {}
        if contrast == "auto":
            scans = scan(x, dark=True)
            contrast = pick_contrast(x, scans)
        if contrast not in ("bright", "dark"):
            raise ValueError(f"contrast={contrast!r}; choose auto, bright or dark")
        x = 1 - x if contrast == "dark" else x
        if radius:
            return x, contrast, float(radius)
        if contrast == "dark" and scans:  # dark blobs of x are the bright blobs of 1 - x
            return x, contrast, bright_radius(x, scans["dark"])
        return x, contrast, bright_radius(x, scans.get("bright"))

    def detect_contrast(self, image: np.ndarray) -> Contrast:
        """'bright' or 'dark': the polarity whose strongest blobs stand out more from their surroundings."""
        return self._analyse(image, "auto", radius=1.0)[1]

    def estimate_scale(self, image: np.ndarray, contrast: str | None = None) -> float:
        """Typical particle radius in px: significance-weighted median radius of the LoG scale-space blobs.

        Args:
            image: Frame (H, W), any intensity range.
            contrast: Overrides ``particle_contrast`` ('bright' / 'dark' / 'auto').
        """
        return self._analyse(image, contrast, None)[2]

    # -- segmentation --------------------------------------------------------------------------------------------
    def segment(
        self,
        image: np.ndarray,
        radius: float | Sequence[float] | None = None,
        contrast: str | None = None,
    ) -> np.ndarray:
        """Boolean particle mask, touching particles kept 1 px apart.

        Args:
            image: Frame (H, W), any intensity range.
            radius: Particle radius in px; candidate radii (a stack's, :meth:`stack_radii`), of which the frame
                takes the best (:meth:`pick_radius`); None estimates it (:meth:`estimate_scale`).
            contrast: Overrides ``particle_contrast``.

        Shape:
            (H, W) -> (H, W) bool.
        """
        if isinstance(radius, (list, tuple, np.ndarray)):
            return self.segment_many([image], radius, contrast)[0]
        return cut_touching(self.label(image, radius, contrast))

    def segment_many(
        self, images: Sequence[np.ndarray], radii: Sequence[float], contrast: str | None = None
    ) -> list[np.ndarray]:
        """:meth:`segment` of each frame at the best of the candidate ``radii``, the frames sharing the threads
        (:meth:`pick_radii`). Same masks as one frame at a time."""
        return [cut_touching(labels) for _, labels in self.pick_radii(images, radii, contrast)]

    def segment_with_candidates(
        self, images: Sequence[np.ndarray], radii: Sequence[float], contrast: str | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`segment_many`'s mask of each frame, and its candidates: what the segmenter finds at its loosest
        setting (confidence 0) at the radius the frame picked, the particles step 2's pseudo-labels call unsure.
        """
        loose = ClassicalSegmenter(self.particle_contrast, self.min_particle_px, 0.0, self.threads)
        picks = self._picks(images, radii, contrast)
        # each frame as its pick normalised it: the same labels as loose.label(image, radius)
        with ThreadPoolExecutor(self.threads) as pool:
            candidates = pool.map(
                lambda p: cut_touching(loose._label_frame(p.frame, p.contrast, p.radius)), picks
            )
            return [(cut_touching(p.labels), c) for p, c in zip(picks, candidates, strict=True)]

    def label(
        self,
        image: np.ndarray,
        radius: float | None = None,
        contrast: str | None = None,
        plausible_only: bool = True,
    ) -> np.ndarray:
        """Like :meth:`segment` but returns int32 labels, one per particle (0 = background).

        ``plausible_only=False`` keeps every object above the threshold, particle-like or not (candidates).
        """
        return self._label_frame(*self._analyse(image, contrast, radius), plausible_only)

    def _label_frame(
        self, x: np.ndarray, contrast: Contrast, radius: float, plausible_only: bool = True
    ) -> np.ndarray:
        """:meth:`label` of a frame already analysed (:meth:`_analyse`: normalised, particles bright)."""
        factor = max(1, int(radius / _WORK_RADIUS_PX))
        work, r = shrink(x, factor), radius / factor
        smooth = ndi.gaussian_filter(work, max(0.5, 0.25 * r))
        raw = smooth - _background(smooth, 2.5 * r)
        score = raw - self._threshold(raw)
        labels = split_particles(score > 0, r, min_area=self.min_particle_px / factor**2)
        if plausible_only:
            labels = self._plausible(labels, work, r)
        labels, score = grow_to_edges(labels, raw, r, EDGE_FRACTION[contrast])
        if factor > 1:
            labels = upsample_labels(labels, score, x.shape, factor)
        return labels.astype(np.int32)

    def stack_radii(self, images: Sequence[np.ndarray]) -> tuple[Contrast, list[float]]:
        """The stack's particle contrast (the frames' majority) and its candidate particle radii (px).

        The candidates are the frames' own blob-scan estimates, near-duplicates merged. Frames of one session
        mostly agree; a noisy or crowded frame's scan can lock onto noise, and a stack gathered from several
        magnifications holds several true scales: :meth:`pick_radius` then chooses per frame.
        """
        if not len(images):
            raise ValueError("stack_radii needs at least one image")
        with ThreadPoolExecutor(self.threads) as pool:  # the blob scans release the GIL, as in pick_radii
            analysed = list(pool.map(lambda image: self._analyse(image, None, None)[1:], images))
        contrasts = [c for c, _ in analysed]
        contrast = max(("bright", "dark"), key=contrasts.count)
        if self.particle_contrast == "auto":
            # frames that voted the other way were measured with the wrong polarity: measure them again
            analysed = [
                a if a[0] == contrast else (contrast, self.estimate_scale(im, contrast))
                for im, a in zip(images, analysed, strict=True)
            ]
        return contrast, distinct([r for _, r in analysed])

    def pick_radius(
        self, image: np.ndarray, radii: Sequence[float], contrast: str | None = None
    ) -> tuple[float, np.ndarray]:
        """The candidate radius at which this frame shows the most plausible particles of about that size.

        A wrong scale finds few particles: too small, the top-hat cuts real particles away and the plausibility
        tests reject the noise that is left; too large, neighbours merge and small particles blur away. But a
        frame has room for far more small objects than large ones, so the count leans small: on a big noisy
        frame, specks of noise or sub-nm clusters can outnumber the particles at a scale several times below
        theirs (faint Pd on thick silica, 2048 px: 62 specks at r = 4 against 15 particles at r = 13, where the
        frame's own blob scan says 13). A candidate more than ``SMALLER_THAN_SCAN`` times below the frame's own
        scan radius (:meth:`estimate_scale`) therefore wins only when no other shows ``MIN_MEASURED_PARTICLES``,
        and is only labelled then. Larger candidates are never ruled out: the scan errs low on crowded frames, and
        the count does not lean large.

        Returns:
            (radius, labels of the frame segmented at it).
        """
        return self.pick_radii([image], radii, contrast)[0]

    def pick_radii(
        self, images: Sequence[np.ndarray], radii: Sequence[float], contrast: str | None = None
    ) -> list[tuple[float, np.ndarray]]:
        """:meth:`pick_radius` of each frame. The frames' blob scans and candidates share one pool of threads,
        so both cores stay busy to the end of a batch; one frame alone leaves a core idle while its slowest
        candidate runs (scipy's filters and scikit-image's watershed release the GIL)."""
        return [(p.radius, p.labels) for p in self._picks(images, radii, contrast)]

    def _picks(
        self, images: Sequence[np.ndarray], radii: Sequence[float], contrast: str | None = None
    ) -> list[_Pick]:
        """:meth:`pick_radii`, each frame with the normalised copy and contrast its scan made (the candidates'
        and the loose pass's input, normalised once)."""
        radii = [float(r) for r in radii]
        with ThreadPoolExecutor(self.threads) as pool:
            # every scan first: a candidate's task waits for its frame's scan, which is then running or done
            own = [pool.submit(self._analyse, image, contrast, None) for image in images]

            def count(k: int, i: int, unless_ruled_out: bool = True) -> tuple[int, float, np.ndarray] | None:
                x, frame_contrast, scan_radius = own[k].result()
                if unless_ruled_out and radii[i] * SMALLER_THAN_SCAN < scan_radius:
                    return None
                labels = self._label_frame(x, frame_contrast, radii[i])
                return sized_count(labels, radii[i]), radii[i], labels

            tasks = [[pool.submit(count, k, i) for i in range(len(radii))] for k in range(len(images))]
            picks = []
            try:  # frame by frame, so that the losers' labels are freed as it goes
                for k in range(len(images)):
                    found = [task.result() for task in tasks[k]]
                    tasks[k] = []
                    trusted = [f for f in found if f is not None and f[0] >= MIN_MEASURED_PARTICLES]
                    if not trusted:  # the candidates the scan ruled out, now that no other finds enough
                        later = {i: pool.submit(count, k, i, False) for i, f in enumerate(found) if f is None}
                        found = [later[i].result() if i in later else f for i, f in enumerate(found)]
                    # max keeps the first of equal counts, in the order the radii were given
                    _, radius, labels = max(trusted or found, key=lambda f: f[0])
                    picks.append(_Pick(radius, labels, *own[k].result()[:2]))
            except BaseException:  # a frame that fails fails the batch: don't label the rest first
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            return picks

    def particle_diameter(
        self, image: np.ndarray, radii: Sequence[float], contrast: str | None = None
    ) -> float | None:
        """Median equivalent diameter (px) of the particles found at the frame's best candidate radius.

        A measurement of the particles, not the blob scan's guess: on a stack of one magnification it varies
        far less from frame to frame than :meth:`estimate_scale`. None when fewer than
        ``MIN_MEASURED_PARTICLES`` are found: too few to say what size this frame's particles are.
        """
        area = np.bincount(self.pick_radius(image, radii, contrast)[1].ravel())[1:]
        area = area[area > 0]
        if len(area) < MIN_MEASURED_PARTICLES:
            return None
        return float(np.median(2 * np.sqrt(area / np.pi)))

    def segment_stack(
        self, images: Sequence[np.ndarray], per: Literal["stack", "image"] = "stack"
    ) -> list[np.ndarray]:
        """Segment a stack: one contrast for the stack, each frame at the best of the stack's radii.

        ``per="image"`` estimates contrast and radius from each image alone.

        Returns:
            One bool mask per image.
        """
        if per not in ("stack", "image"):
            raise ValueError(f"per={per!r}; choose stack or image")
        if per == "image" or not len(images):
            return [self.segment(im) for im in images]
        contrast, radii = self.stack_radii(images)
        return self.segment_many(images, radii, contrast)

    def _threshold(self, score: np.ndarray) -> float:
        # Otsu splits particles from support; confidence 0.5 keeps it, 1 raises it by 40%. The floor keeps a
        # frame without particles from being split into its own texture.
        c = self.confidence
        med = float(np.median(score))
        mad = 1.4826 * float(np.median(np.abs(score - med))) + 1e-6
        otsu = float(threshold_otsu(score)) if np.ptp(score) > 0 else np.inf
        return max(otsu * (0.6 + 0.8 * c), med + (3 + 4 * c) * mad)

    def _plausible(self, labels: np.ndarray, work: np.ndarray, r: float) -> np.ndarray:
        """Keep objects that are convex, not streaks, and stand out from their surroundings (working scale)."""
        c = self.confidence
        n = int(labels.max())
        if n == 0:
            return labels
        index = np.arange(1, n + 1)
        seen = ndi.gaussian_filter(work, 0.35 * r)  # ring test at the particle scale, not the pixel scale
        width = max(2, int(round(0.75 * r)))
        ring = ndi.maximum_filter(labels, size=2 * width + 1) * (labels == 0)
        with np.errstate(invalid="ignore", divide="ignore"):  # a ring swallowed by neighbours: NaN, dropped
            inside = labelled_stat(ndi.mean, seen, labels, index)
            around = labelled_stat(ndi.mean, seen, ring, index)
            spread = labelled_stat(ndi.standard_deviation, seen, ring, index)
        keep = np.zeros(n + 1, bool)
        keep[1:] = (
            (_significance(work, labels, n, r) >= 3.0 + 2.0 * c)
            & (inside - around > (1.0 + 2.0 * c) * spread)
            & (_axis_ratio(labels, n) <= 3.5 - c)  # scan-line streaks are long and thin
        )
        for p in regionprops(labels * keep[labels]):
            keep[p.label] = p.solidity >= 0.75 + 0.15 * c  # clusters and support lumps are not convex
        return relabel_sequential(labels * keep[labels])[0]


# -- detection helpers, at the working scale -----------------------------------------------------------------
def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS has one, else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _background(image: np.ndarray, radius: float) -> np.ndarray:
    """Grey opening with a disk (the top-hat's background), on a copy shrunk so the disk is ~5 px, then upsampled.

    The background is smooth at the disk's scale, so the shrink costs no accuracy and keeps 2048^2 frames fast.
    """
    f = max(1, int(radius / 5))
    small = opening(shrink(image, f), disk(max(1, int(round(radius / f))), decomposition="sequence"))
    if f == 1:
        return small
    return resize(small, [n * f for n in small.shape], order=1)[: image.shape[0], : image.shape[1]]


def _significance(work: np.ndarray, labels: np.ndarray, n: int, r: float) -> np.ndarray:
    """Best LoG significance inside each object, over the scales near its own size (0.6-1.6x its radius)."""
    ys, xs = np.nonzero(labels)
    owner = labels[ys, xs]
    scales = r / np.sqrt(2) * 2 ** np.arange(-1.0, 2.0, 0.5)
    own_sigma = np.sqrt(np.bincount(owner, minlength=n + 1)[1:] / np.pi) / np.sqrt(2)
    own_sigma = np.clip(own_sigma, scales[0], scales[-1])  # objects beyond the range use its nearest end
    background = (ndi.maximum_filter(labels, size=3) == 0).astype(float)
    best = np.zeros(n)
    for s in scales:
        near = (s >= 0.6 * own_sigma) & (s <= 1.6 * own_sigma)
        if near.any():
            d, _, z = log_significance(work, s, background, min_sigma=1.0)  # a score: coarse is fine
            per_object = np.asarray(ndi.maximum(z[ys // d, xs // d], owner, np.arange(1, n + 1)))
            best = np.where(near, np.maximum(best, per_object), best)
    return best


def _axis_ratio(labels: np.ndarray, n: int) -> np.ndarray:
    """Major / minor axis of each label's inertia ellipse, each pixel a unit square (vectorised for speed)."""
    ys, xs = np.nonzero(labels)  # the labelled pixels only: the same sums, without the background's
    flat = labels[ys, xs]
    yy, xx = ys.astype(float), xs.astype(float)
    m = [np.bincount(flat, w, minlength=n + 1)[1:] for w in (None, yy, xx, yy * yy, xx * xx, yy * xx)]
    area = np.maximum(m[0], 1)
    cy, cx = m[1] / area, m[2] / area
    vyy, vxx, vxy = m[3] / area - cy**2 + 1 / 12, m[4] / area - cx**2 + 1 / 12, m[5] / area - cy * cx
    half_trace, det = (vyy + vxx) / 2, vyy * vxx - vxy**2
    root = np.sqrt(np.maximum(half_trace**2 - det, 0))
    return np.sqrt((half_trace + root) / np.maximum(half_trace - root, 1e-6))
