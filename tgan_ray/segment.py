"""Step 8 at scale: segment a whole EM stack (local or S3) with a trained NPsSegNet, sharded with Ray Data.

    result = segment_stack("runs/r1/round1/npssegnet.pt", "s3://em/in-situ-2026/", "s3://em/seg/run7", cfg)

Ray Data plan (streaming: memory stays bounded whatever the stack size)::

    read_binary_files(stack) -> SegmentActor (actor pool: decode, normalise, sliding-window NPsSegNet,
                                write the mask, measure its particles) -> driver: one small row per image

Output::

    <out>/masks/<stem>.png     mask at the frame's original resolution (0/255); ``masks_dir`` puts them elsewhere
    <out>/masks/<stem>.tif     the same mask, and masks/labels/<stem>.tif its particles (instance labels), as
                               ImageJ TIFFs calibrated in nm (Fiji, napari)
    <out>/particles.parquet    every particle (image = stem, source, pixel_size_nm, sizes in nm or px)
    <out>/summary.json         PSD of the whole stack, and one PSD summary per image
    <out>/segment.json         model hash and settings (a re-run into the same out must match them)
    <out>/images.parquet       one row per image: source, status, reason, particle counts, pixel size, mask
                               (written last: the commit)

A corrupt object becomes a row with ``status='error'`` and its reason; it never stops the job. A re-run with the
same ``out`` does not segment again the images whose mask exists ('reused': their particles are re-measured
from the mask, which is cheap). Storage is checked before any Ray work; credentials are never printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import Config, DataConfig, SegmenterConfig, StorageConfig
from tgan_ray.io import storage as st
from tgan_ray.messages import one_line
from tgan_ray.scale_out import (
    IO_TASK_CPUS,
    ScaleOutError,
    actor_pool_options,
    check_settings,
    device_for,
    local_copy,
    read_model,
)

STATUS_SEGMENTED, STATUS_REUSED, STATUS_ERROR = "segmented", "reused", "error"
IMAGE_COLUMNS = (
    "image", "source", "status", "reason", "mask", "pixel_size_nm", "unit", "height", "width",
    "particle_count", "border_count", "uncertainty",
)  # fmt: skip


@dataclass
class SegmentResult:
    """What :func:`segment_stack` left in ``out``."""

    out: str
    masks: str  # folder or prefix of the masks
    images: int  # images listed in the stack
    segmented: int  # segmented by this call
    reused: int  # masks found in ``out`` and re-measured
    errors: list[tuple[str, str]]  # (source, reason) of the images that could not be read or segmented
    particles: int  # rows of particles.parquet
    summary: dict[str, Any]  # summary.json
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "images": self.images,
            "segmented": self.segmented,
            "reused": self.reused,
            "errors": [list(e) for e in self.errors],
            "particles": self.particles,
            "masks": self.masks,
            "particles_table": st.join(self.out, "particles.parquet"),
            "images_table": st.join(self.out, "images.parquet"),
            "summary_json": st.join(self.out, "summary.json"),
            "seconds": round(self.seconds, 2),
        }


def unique_stems(uris: list[str]) -> dict[str, str]:
    """File stem of each URI, made unique in list order (``a.png``, ``a.tif`` -> ``a``, ``a_``)."""
    stems, seen = {}, set()
    for uri in uris:
        stem = Path(uri.replace("\\", "/").rsplit("/", 1)[-1]).stem
        while stem in seen:
            stem += "_"
        seen.add(stem)
        stems[uri] = stem
    return stems


def _error_row(stem: str, uri: str, reason: str) -> dict[str, Any]:
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
        rough: instead of a model, the classical segmenter: ``{"config": cfg.rough as a dict, "contrast",
            "radii"}`` with the stack's contrast and candidate particle radii (:func:`rough_stack_settings`).
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

        use_actor_cpus()
        self.segmenter = None
        self.frame_scales = frame_scales or {}
        if rough is not None:
            self.rough = rough_segment_fn(rough)
        else:
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
        item: dict[str, Any] = {"row": _error_row(stem, uri, ""), "image": None, "mask": None}
        em = item["em"] = decode_image(data, uri)
        item["mask_uri"] = st.join(self.masks_dir, f"{stem}.png")
        item["mask"] = self._reuse(item["mask_uri"], em.data.shape) if stem in self.done else None
        if item["mask"] is None:
            d = self.data_cfg
            item["image"] = d.normalize(em.data)
        return item

    def _segment(self, items: list[dict[str, Any]]) -> None:
        """Masks (and the network's uncertainty on them) of the frames read in this batch, in one go."""
        from tgan_ray.analysis.selfcheck import uncertainty

        todo = [it for it in items if it["image"] is not None]
        if self.segmenter is None:
            for it in todo:
                it["mask"], it["row"]["uncertainty"] = self.rough(it["image"]), np.nan
            return
        scales = [self.frame_scales.get(it["row"]["image"]) for it in todo]
        probabilities = self.segmenter.probabilities([it["image"] for it in todo], scales)
        for it, probability, scale in zip(todo, probabilities, scales, strict=True):
            it["mask"] = self.segmenter.to_mask(probability, scale=scale)
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
        return _error_row(stem, uri, one_line(getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"))

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
        for i, it in zip(pending, items, strict=True):
            rows[i] = it.get("error") or self._each(self._finish, it)

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
        keys = rows[0] if rows else _error_row("", "", "")
        return {key: np.array([r[key] for r in rows], dtype=_ROW_DTYPES.get(key, object)) for key in keys}


def rough_segment_fn(rough: dict[str, Any]):
    """``image -> mask`` of the classical segmenter at the stack's contrast and radii (see SegmentActor)."""
    from functools import partial

    from tgan_ray.config import RoughMaskConfig
    from tgan_ray.masks import ClassicalSegmenter

    c = RoughMaskConfig.model_validate(rough["config"])
    segmenter = ClassicalSegmenter(c.particle_contrast, c.min_particle_px, c.confidence)
    return partial(segmenter.segment, radius=rough["radii"], contrast=rough["contrast"])


# Frames read on the driver to fix the rough segmenter's one contrast and scale for the whole stack.
ROUGH_SAMPLE_FRAMES = 8


def rough_stack_settings(uris: list[str], cfg: Config) -> dict[str, Any]:
    """The classical segmenter's settings for a stack: its config, one contrast and the candidate particle radii
    (px; each frame takes the best) estimated on up to ``ROUGH_SAMPLE_FRAMES`` frames spread over the stack
    (unreadable ones are skipped).

    Raises:
        ScaleOutError: none of the sampled frames could be read.
    """
    from tgan_ray.io import decode_image
    from tgan_ray.masks import ClassicalSegmenter

    if cfg.rough.method != "classical":
        raise ScaleOutError(f"--rough runs the classical segmenter; rough.method is {cfg.rough.method!r}")
    picks = sorted({round(i) for i in np.linspace(0, len(uris) - 1, min(len(uris), ROUGH_SAMPLE_FRAMES))})
    frames, d = [], cfg.data
    for i in picks:
        try:
            em = decode_image(st.read_bytes(uris[i], cfg.storage), uris[i])
        except st.StorageError:
            raise
        except Exception:  # noqa: BLE001 - an unreadable frame is reported by the actors, with its reason
            continue
        frames.append(d.normalize(em.data))
    if not frames:
        raise ScaleOutError(f"none of the {len(picks)} frames sampled from the stack could be read")
    r = cfg.rough
    segmenter = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
    contrast, radii = segmenter.stack_radii(frames)
    return {"config": r.model_dump(mode="json"), "contrast": contrast, "radii": [round(x, 3) for x in radii]}


# ---------------------------------------------------------------------------------------------- driver


def _particle_schema():
    import pyarrow as pa

    floats = "centroid_x centroid_y area equivalent_diameter major_axis minor_axis eccentricity circularity"
    floats = floats.split() + ["solidity"]
    return pa.schema(
        [("image", pa.string()), ("particle_id", pa.int64())]
        + [(c, pa.float64()) for c in floats]
        + [
            ("touches_border", pa.bool_()),
            ("unit", pa.string()),
            ("source", pa.string()),
            ("pixel_size_nm", pa.float64()),
        ]
    )


class _ParticleSink:
    """Streams particle tables into one local Parquet file; published to ``out`` at the end."""

    def __init__(self):
        import pyarrow.parquet as pq

        self.schema = _particle_schema()
        fd, self.path = tempfile.mkstemp(suffix=".parquet", prefix="tgan-particles-")
        os.close(fd)
        self.writer = pq.ParquetWriter(self.path, self.schema)
        self.rows, self.closed = 0, False

    def add(self, ipc: bytes, source: str, pixel_size_nm: float | None) -> None:
        import pyarrow as pa

        table = pa.ipc.open_stream(ipc).read_all()
        n = table.num_rows
        table = table.append_column("source", pa.array([source] * n, pa.string()))
        table = table.append_column("pixel_size_nm", pa.array([pixel_size_nm] * n, pa.float64()))
        self.writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += n

    def close(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True


def _stack_summary(particles_path: str, images: list[str]) -> dict[str, Any]:
    """PSD of the whole stack, read back with only the columns it needs (memory: a few floats a particle)."""
    import pyarrow.parquet as pq

    from tgan_ray.analysis import psd_summary

    columns = (
        "image equivalent_diameter touches_border circularity eccentricity solidity minor_axis major_axis"
    )
    columns = columns.split() + ["unit"]
    df = pq.read_table(particles_path, columns=columns).to_pandas()
    units = sorted(set(df["unit"])) if len(df) else []
    if len(units) > 1:  # some frames calibrated, some not: a PSD must not mix nm and px
        nm = df["unit"] == "nm"
        summary = psd_summary(df[nm], images=sorted(set(df.loc[nm, "image"])))
        summary["note"] = (
            "frames without a pixel size (px) are left out of this nm summary; set data.pixel_size_nm"
        )
        return summary
    return psd_summary(df, images=images)


def _write_outputs(
    out: str, storage: StorageConfig | None, sink: _ParticleSink, rows: list[dict], per_image: dict[str, Any]
) -> dict[str, Any]:
    import pandas as pd

    ok = [r["image"] for r in rows if r["status"] != STATUS_ERROR]
    summary = {
        "stack": _stack_summary(sink.path, ok),
        "images": {
            "total": len(rows),
            "segmented": sum(r["status"] == STATUS_SEGMENTED for r in rows),
            "reused": sum(r["status"] == STATUS_REUSED for r in rows),
            "errors": sum(r["status"] == STATUS_ERROR for r in rows),
        },
        "per_image": per_image,
    }
    st.upload_file(sink.path, st.join(out, "particles.parquet"), storage)
    st.write_bytes(
        st.join(out, "summary.json"), json.dumps(summary, indent=2, allow_nan=False).encode(), storage
    )
    table = pd.DataFrame(rows, columns=list(IMAGE_COLUMNS)).sort_values("source", kind="stable")
    st.write_bytes(st.join(out, "images.parquet"), table.to_parquet(index=False), storage)  # the commit
    return summary


def _model_data_cfg(data: bytes, model: str, cfg: Config) -> DataConfig:
    """Check the checkpoint on the driver (before any Ray work) and return the data settings to segment with:
    the working scale it was trained at (its metadata), normalisation and pixel size from ``cfg``."""
    from tgan_ray.models.npssegnet import load_segmenter

    path = local_copy(data, ".pt")
    try:
        _, meta = load_segmenter(path)
    except ValueError as exc:
        raise ValueError(str(exc).replace(path, model)) from None
    finally:
        os.unlink(path)
    if not isinstance(meta.get("data"), dict):
        return cfg.data
    trained = DataConfig.from_saved(meta["data"])
    return cfg.data.model_copy(
        update={k: getattr(trained, k) for k in ("image_size", "resize_mode", "scale")}
    )


def segment_stack(
    model: str | os.PathLike | None,
    images: str | os.PathLike,
    out: str | os.PathLike,
    cfg: Config,
    recursive: bool = False,
    masks_dir: str | os.PathLike | None = None,
    fallback_pixel_size_nm: float | None = None,
    rough: bool = False,
    frame_scales: dict[str, float] | None = None,
) -> SegmentResult:
    """Segment every image of a stack with Ray Data and write masks, particle table and PSD summaries.

    Args:
        model: NPsSegNet checkpoint (``npssegnet.pt`` of a run, or a segmenter stage's ``model.pt``), local
            or s3://; None with ``rough``.
        images: the stack: a folder, a glob or an ``s3://bucket/prefix``.
        out: output folder or ``s3://bucket/prefix``.
        cfg: ``scale_out`` (actors, batch size, CPUs/GPUs per actor), ``segmenter`` (tile overlap, tiles per
            pass), ``data`` (normalisation, ``pixel_size_nm`` override), ``storage`` and ``ray``.
        recursive: also take images below subfolders / deeper prefixes.
        masks_dir: where the masks go (a folder or ``s3://`` prefix); None: ``<out>/masks``. The pipeline keeps
            them at ``<run>/masks``, beside its own report.
        fallback_pixel_size_nm: pixel size (nm) of frames that neither ``data.pixel_size_nm`` nor the file
            calibrates (the pipeline's stack-wide ``pixel_size.json``); None: those frames are measured in px.
        rough: segment with the classical, training-free segmenter of step 2 (``cfg.rough``) instead of a
            model, at one contrast and particle scale for the whole stack: the baseline a label-free model has
            to beat. Same outputs.
        frame_scales: stem -> working scale, for frames taken at another magnification than the model's
            (the pipeline's step 1 measures them); the others use the checkpoint's scale.

    Returns:
        :class:`SegmentResult`.

    Raises:
        StorageError: a missing bucket, rejected credentials or an unreachable endpoint, before any Ray work.
        StackError: the stack holds no EM images.
        ValueError: the checkpoint is missing or not a segmenter (ScaleOutError: missing, or ``out`` holds
            masks made with another model or other settings).
    """
    from tgan_ray.io import list_stack
    from tgan_ray.runtime import init_ray

    start = time.monotonic()
    if rough == (model is not None):
        raise ScaleOutError("segment with a model or with the rough segmenter (--rough), not both or neither")
    images, out, storage = str(images), str(out), cfg.storage
    model = None if model is None else str(model)
    if st.is_s3(out):
        out = out.rstrip("/")
    masks_dir = st.join(out, "masks") if masks_dir is None else str(masks_dir).rstrip("/")
    for uri in (images, model):
        if uri is not None and st.is_s3(uri):
            st.check_access(uri, storage)
    st.check_access(out, storage)
    st.check_access(masks_dir, storage)
    uris = list_stack(images, storage, recursive=recursive)
    stems = unique_stems(uris)
    try:
        masks = st.list_files(masks_dir, storage, exts=["png"])
    except st.StorageNotFoundError:
        masks = []
    done = {Path(m.replace("\\", "/").rsplit("/", 1)[-1]).stem for m in masks} & set(stems.values())

    if rough:
        rough_settings, model_bytes, data_cfg = rough_stack_settings(uris, cfg), None, cfg.data
        segmenter = {"rough": rough_settings}
    else:
        rough_settings, model_bytes = None, read_model(model, storage, "segmenter checkpoint")
        data_cfg = _model_data_cfg(model_bytes, model, cfg)
        segmenter = {"model_sha256": hashlib.sha256(model_bytes).hexdigest()}
    # Masks found in out are reused: they must come from this model at these settings.
    d, sg = data_cfg, cfg.segmenter
    settings = {
        **segmenter,
        "image_size": d.image_size,
        "resize_mode": d.resize_mode,
        "scale": d.scale,
        "norm_low_percentile": d.norm_low_percentile,
        "norm_high_percentile": d.norm_high_percentile,
        "tile_overlap": sg.tile_overlap,
    }
    if frame_scales:
        settings["frame_scales"] = dict(sorted(frame_scales.items()))
    sources = {"model": model or "rough", "images": images, "masks": masks_dir}
    check_settings(out, settings, sources, storage, "segment.json")

    ray = init_ray(cfg.ray)
    # The classical segmenter is numpy and scipy: its actors take CPUs only.
    pool_cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"use_gpu": "no"})}) if rough else cfg
    pool = actor_pool_options(pool_cfg, free_cpus=IO_TASK_CPUS)
    model_ref = None if model_bytes is None else ray.put(model_bytes)
    del model_bytes
    s3 = st.is_s3(images)
    # pyarrow wants bucket/key paths with an S3 filesystem; actors rebuild the URIs with the scheme.
    paths = [u.split("://", 1)[1] for u in uris] if s3 else [os.path.abspath(u) for u in uris]
    renamed = {u if s3 else os.path.abspath(u): s for u, s in stems.items() if Path(u).stem != s}
    ds = ray.data.read_binary_files(
        paths,
        include_paths=True,
        filesystem=st.pyarrow_filesystem(storage) if s3 else None,
        ignore_missing_paths=True,
        num_cpus=IO_TASK_CPUS,
    )
    ds = ds.map_batches(
        SegmentActor,
        batch_size=cfg.scale_out.batch_size,
        fn_constructor_kwargs={
            "model_ref": [model_ref],
            "data_cfg": data_cfg,
            "seg_cfg": cfg.segmenter,
            "device": device_for(pool_cfg),
            "masks_dir": masks_dir,
            "storage": storage,
            "scheme": uris[0].split("://", 1)[0] if s3 else None,
            "stems": renamed,
            "done": done,
            "fallback_pixel_size_nm": fallback_pixel_size_nm,
            "rough": rough_settings,
            "frame_scales": frame_scales,
        },
        **pool,
    )

    sink, rows, per_image = _ParticleSink(), [], {}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in range(len(batch["source"])):
                row = {c: batch[c][k] for c in IMAGE_COLUMNS}
                pixel = None if row["pixel_size_nm"] != row["pixel_size_nm"] else float(row["pixel_size_nm"])
                row["pixel_size_nm"] = pixel
                if row["status"] != STATUS_ERROR:
                    sink.add(batch["particles"][k], row["source"], pixel)
                    per_image[row["image"]] = json.loads(batch["summary"][k])
                rows.append(row)
        seen = {r["source"] for r in rows}
        # read_binary_files drops an object that vanished after the listing (ignore_missing_paths).
        for u in uris:
            if (u if s3 else os.path.abspath(u)) not in seen:
                row = _error_row(stems[u], u, "object disappeared before it could be read")
                rows.append({c: row[c] for c in IMAGE_COLUMNS} | {"pixel_size_nm": None})
        sink.close()
        summary = _write_outputs(out, storage, sink, rows, per_image)
    finally:
        sink.close()
        os.unlink(sink.path)
    errors = [(r["source"], r["reason"]) for r in rows if r["status"] == STATUS_ERROR]
    return SegmentResult(
        out=out,
        masks=masks_dir,
        images=len(uris),
        segmented=summary["images"]["segmented"],
        reused=summary["images"]["reused"],
        errors=errors,
        particles=sink.rows,
        summary=summary,
        seconds=time.monotonic() - start,
    )
