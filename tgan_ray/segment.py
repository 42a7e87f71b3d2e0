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

from tgan_ray.config import Config, DataConfig, StorageConfig
from tgan_ray.io import storage as st
from tgan_ray.scale_out import (
    IO_TASK_CPUS,
    ScaleOutError,
    actor_pool_options,
    check_settings,
    device_for,
    local_copy,
    read_model,
)
from tgan_ray.segment_actor import STATUS_ERROR, STATUS_REUSED, STATUS_SEGMENTED, SegmentActor, error_row

IMAGE_COLUMNS = (
    "image", "source", "status", "reason", "mask", "pixel_size_nm", "unit", "height", "width",
    "particle_count", "border_count", "uncertainty", "lead",
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
        if cfg.segmenter.merge_rough and cfg.rough.method == "classical":
            try:
                rough_settings = segmenter["merge_rough"] = rough_stack_settings(uris, cfg)
            except ScaleOutError:  # no frame readable: the actors report each one; nothing to merge
                pass
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
                row = error_row(stems[u], u, "object disappeared before it could be read")
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
