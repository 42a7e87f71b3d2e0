"""The Ray Data actor of ``tgan segment`` (:func:`tgan_ray.segment.segment_stack`): bytes of a frame -> mask ->
particle table, one row per image. Also runs in-process, without Ray (tests, one-off frames)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import DataConfig, SegmenterConfig, StorageConfig
from tgan_ray.io import storage as st
from tgan_ray.messages import one_line
from tgan_ray.scale_out import local_copy

STATUS_SEGMENTED, STATUS_REUSED, STATUS_ERROR = "segmented", "reused", "error"


def error_row(stem: str, uri: str, reason: str) -> dict[str, Any]:
    return {
        "image": stem,
        "source": uri,
        "status": STATUS_ERROR,
        "reason": reason,
        "mask": "",
        "pixel_size_nm": np.nan,
        "unit": "",
        "height": 0,
        "width": 0,
        "particle_count": 0,
        "border_count": 0,
        "uncertainty": np.nan,
        "lead": "",
        "particles": b"",
        "summary": "",
    }


# Pixels of the frames an actor segments together (16 frames of 2048 px): their tiles share forward passes.
BATCH_PIXELS = 16 * 2048 * 2048

# Numeric columns keep a numeric dtype through Arrow; strings and bytes travel as object arrays.
_ROW_DTYPES = {"pixel_size_nm": np.float64, "uncertainty": np.float64} | dict.fromkeys(
    ("height", "width", "particle_count", "border_count"), np.int64
)


def _particles_ipc(df) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    table = pa.Table.from_pandas(df, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class SegmentActor:
    """Ray Data actor: bytes of a frame -> mask (written to ``out``) -> particle table, one row per image.

    The segmenter is loaded once per actor. Per-image failures (corrupt, truncated, not an image) become an
    ``error`` row; a storage failure while writing a mask is not the image's fault and fails the job.

    Args:
        model_ref: object-store reference to the NPsSegNet checkpoint's bytes, or None with ``rough``.
        data_cfg: working scale (from the checkpoint), normalisation percentiles, pixel size override.
        seg_cfg: tile overlap, tiles per forward pass.
        device: "cpu" or "cuda".
        masks_dir: folder or s3:// prefix of the masks.
        storage: S3 endpoint and region.
        scheme: "s3" (or s3a...) when Ray's paths are ``bucket/key``; None for local paths.
        stems: source URI -> unique stem.
        done: stems whose mask already exists in ``masks_dir``.
        fallback_pixel_size_nm: pixel size of frames that neither the config nor the file calibrates.
        rough: the classical segmenter: ``{"config": cfg.rough as a dict, "contrast", "radii"}`` with the stack's
            contrast and candidate particle radii (:func:`rough_stack_settings`). Instead of a model, or with one
            (``segmenter.merge_rough``): its particles that touch none of the model's are added.
        frame_scales: stem -> working scale of frames taken at another magnification than the model's scale.
    """

    def __init__(
        self,
        model_ref: list,
        data_cfg: DataConfig,
        seg_cfg: SegmenterConfig,
        device: str,
        masks_dir: str,
        storage: StorageConfig | None,
        scheme: str | None,
        stems: dict[str, str],
        done: set[str],
        fallback_pixel_size_nm: float | None = None,
        rough: dict[str, Any] | None = None,
        frame_scales: dict[str, float] | None = None,
    ):
        from tgan_ray.runtime import use_actor_cpus

        threads = self.threads = use_actor_cpus()
        self.segmenter = None
        self.frame_scales = frame_scales or {}
        # With a model: the rough masks to merge, and with segmenter.merge_candidates the loose candidates too.
        self.candidates = model_ref[0] is not None and seg_cfg.merge_candidates
        self.rough = None if rough is None else rough_segment_fn(rough, threads, self.candidates)
        if model_ref[0] is not None:
            from tgan_ray.inference import Segmenter

            path = local_copy(model_ref[0], ".pt")
            try:
                self.segmenter = Segmenter(path, data_cfg, seg_cfg, device)
            finally:
                os.unlink(path)
        self.data_cfg, self.masks_dir, self.storage = data_cfg, masks_dir, storage
        self.scheme, self.stems, self.done = scheme, stems, done
        self.fallback_pixel_size_nm = fallback_pixel_size_nm

    def _reuse(self, mask_uri: str, shape: tuple[int, ...]) -> np.ndarray | None:
        from tgan_ray.io import read_mask_png

        try:
            mask = read_mask_png(mask_uri, self.storage)
        except Exception:  # noqa: BLE001 - an unreadable old mask is simply made again
            return None
        return mask if mask.shape == shape else None

    def _read(self, uri: str, data: bytes) -> dict[str, Any]:
        """Decode and normalise one frame, or find its mask from before: ``{row, em, image | None, mask}``."""
        from tgan_ray.io import decode_image

        stem = self.stems.get(uri) or Path(uri.rsplit("/", 1)[-1]).stem
        item: dict[str, Any] = {"row": error_row(stem, uri, ""), "image": None, "mask": None}
        em = item["em"] = decode_image(data, uri)
        item["mask_uri"] = st.join(self.masks_dir, f"{stem}.png")
        item["mask"] = self._reuse(item["mask_uri"], em.data.shape) if stem in self.done else None
        if item["mask"] is None:
            d = self.data_cfg
            item["image"] = d.normalize(em.data)
        return item

    def _segment(self, items: list[dict[str, Any]]) -> None:
        """Masks (and the network's uncertainty on them) of the frames read in this batch, in one go."""
        from tgan_ray.analysis.selfcheck import LEAD_ROUGH, tandem_mask, uncertainty
        from tgan_ray.masks.classical import MIN_FRAME_PX

        todo = [it for it in items if it["image"] is not None]
        if self.segmenter is None:
            for it, mask in zip(todo, self.rough([it["image"] for it in todo]), strict=True):
                it["mask"], it["row"]["uncertainty"], it["row"]["lead"] = mask, np.nan, LEAD_ROUGH
            return
        scales = [self.frame_scales.get(it["row"]["image"]) for it in todo]
        probabilities = self.segmenter.probabilities([it["image"] for it in todo], scales)
        # segmenter.merge_rough: with the rough segmenter's masks, the network leading unless it misses most of the
        # rough particles (a frame too small for the classical segmenter keeps the network's mask). The rough
        # particles also set the frame's faint bar (Segmenter.drop_faint). segmenter.merge_candidates: plus the
        # loose rough candidates NPsSegNet also marks.
        roughs: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(todo)
        if self.rough is not None:
            fit = [i for i, it in enumerate(todo) if min(it["image"].shape) >= MIN_FRAME_PX]
            for i, out in zip(fit, self.rough([todo[i]["image"] for i in fit]), strict=True):
                roughs[i] = out if self.candidates else (out, None)
        for it, probability, scale, both in zip(todo, probabilities, scales, roughs, strict=True):
            rough, candidates = both or (None, None)
            it["mask"], it["row"]["lead"] = tandem_mask(
                self.segmenter, probability, it["image"], scale, rough, candidates
            )
            it["row"]["uncertainty"] = uncertainty(probability)

    def _finish(self, item: dict[str, Any]) -> dict[str, Any]:
        """Write the mask, split touching particles and measure them: the frame's row of the images table."""
        from tgan_ray.analysis import measure_particles, psd_summary, split_touching
        from tgan_ray.io import write_mask_png
        from tgan_ray.io.tiff import write_mask_tiffs

        row, em, mask, mask_uri = item["row"], item["em"], item["mask"], item["mask_uri"]
        stem = row["image"]
        if item["image"] is not None:
            write_mask_png(mask_uri, mask, self.storage)
            row["status"] = STATUS_SEGMENTED
        else:
            row["status"] = STATUS_REUSED
        pixel = self.data_cfg.pixel_size_nm or em.pixel_size_nm or self.fallback_pixel_size_nm
        labels = split_touching(mask)
        write_mask_tiffs(self.masks_dir, stem, mask, labels, pixel, self.storage)
        particles = measure_particles(labels, stem, pixel)
        summary = psd_summary(particles, images=[stem])
        summary.pop("per_image", None)
        row.update(
            mask=mask_uri,
            pixel_size_nm=np.nan if pixel is None else float(pixel),
            unit="px" if pixel is None else "nm",
            height=mask.shape[0],
            width=mask.shape[1],
            particle_count=summary["count"],
            border_count=summary["border_count"],
            particles=_particles_ipc(particles),
            summary=json.dumps(summary, allow_nan=False),
        )
        return row

    def _error(self, uri: str, exc: Exception) -> dict[str, Any]:
        stem = self.stems.get(uri) or Path(uri.rsplit("/", 1)[-1]).stem
        return error_row(stem, uri, one_line(getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"))

    def _each(self, fn, item_or_uri, *args) -> dict[str, Any] | None:
        """``fn(item_or_uri, *args)``, or the image's error row: one bad frame must not stop a stack of thousands.

        A storage failure is not the image's fault and fails the job.
        """
        try:
            return fn(item_or_uri, *args)
        except st.StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            uri = item_or_uri if isinstance(item_or_uri, str) else item_or_uri["row"]["source"]
            return self._error(uri, exc)

    def _flush(self, rows: list[dict[str, Any]], pending: list[int]) -> None:
        """Segment the frames read at ``rows[pending]`` together, then replace each by its finished row."""
        if not pending:
            return
        items = [rows[i] for i in pending]
        try:  # the frames go through the network together
            self._segment(items)
        except st.StorageError:
            raise
        except Exception:  # noqa: BLE001 - e.g. one frame too large for memory: the others still get masks
            for it in items:
                if it["image"] is not None:
                    it["error"] = self._each(lambda x: self._segment([x]), it)
        # splitting, measuring and writing: scipy, scikit-image and zlib release the GIL, so frames share the cores
        with ThreadPoolExecutor(self.threads) as pool:
            finished = pool.map(lambda it: it.get("error") or self._each(self._finish, it), items)
            for i, row in zip(pending, finished, strict=True):
                rows[i] = row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []  # per image: the frame read (a dict with "em"), then its row
        pending, pixels = [], 0
        for data, path in zip(batch["bytes"], batch["path"], strict=True):
            uri = f"{self.scheme}://{path}" if self.scheme else str(path)
            rows.append(self._each(self._read, uri, bytes(data)))
            if "em" in rows[-1]:
                pending.append(len(rows) - 1)
                pixels += rows[-1]["em"].data.size
            if pixels >= BATCH_PIXELS:  # frames held at once stay bounded whatever scale_out.batch_size is
                self._flush(rows, pending)
                pending, pixels = [], 0
        self._flush(rows, pending)
        keys = rows[0] if rows else error_row("", "", "")
        return {key: np.array([r[key] for r in rows], dtype=_ROW_DTYPES.get(key, object)) for key in keys}


def rough_segment_fn(rough: dict[str, Any], threads: int | None = None, candidates: bool = False):
    """``images -> masks`` of the classical segmenter at the stack's contrast and radii (see SegmentActor), the
    frames of a batch sharing ``threads`` threads (None: every CPU of this process). ``candidates``:
    ``images -> [(mask, candidates)]`` (:meth:`~tgan_ray.masks.ClassicalSegmenter.segment_with_candidates`)."""
    from functools import partial

    from tgan_ray.config import RoughMaskConfig
    from tgan_ray.masks import ClassicalSegmenter

    c = RoughMaskConfig.model_validate(rough["config"])
    segmenter = ClassicalSegmenter(c.particle_contrast, c.min_particle_px, c.confidence, threads)
    method = segmenter.segment_with_candidates if candidates else segmenter.segment_many
    return partial(method, radii=rough["radii"], contrast=rough["contrast"])
