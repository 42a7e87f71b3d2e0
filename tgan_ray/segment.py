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
import os
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
from tgan_ray.segment_actor import STATUS_ERROR, SegmentActor, error_row
from tgan_ray.segment_outputs import IMAGE_COLUMNS, ParticleSink, collect_rows, write_outputs


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


@dataclass
class _SegmenterPlan:
    """The segmenter of a stack, checked on the driver before any Ray work."""

    identity: dict[str, Any]  # model_sha256 (and merge_rough), or rough: segment.json keeps it
    data_cfg: DataConfig  # working scale and normalisation to segment at
    rough: dict[str, Any] | None  # rough_stack_settings: the segmenter, or merged with the model's masks
    model_bytes: bytes | None  # the checkpoint; None with --rough, and once it is in the object store


def _check_storage(
    images: str, model: str | None, out: str, masks_dir: str, storage: StorageConfig | None
) -> None:
    """Fail on a missing bucket, rejected credentials or an unreachable endpoint before any Ray work."""
    for uri in (images, model):
        if uri is not None and st.is_s3(uri):
            st.check_access(uri, storage)
    st.check_access(out, storage)
    st.check_access(masks_dir, storage)


def _masks_done(masks_dir: str, stems: dict[str, str], storage: StorageConfig | None) -> set[str]:
    """Stems of the stack whose mask is in ``masks_dir`` already: a re-run re-measures them."""
    try:
        masks = st.list_files(masks_dir, storage, exts=["png"])
    except st.StorageNotFoundError:
        masks = []
    return {Path(m.replace("\\", "/").rsplit("/", 1)[-1]).stem for m in masks} & set(stems.values())


def _plan_segmenter(model: str | None, uris: list[str], cfg: Config, rough: bool) -> _SegmenterPlan:
    """The rough segmenter's stack settings, or the checked model (with the rough settings to merge)."""
    if rough:
        rough_settings = rough_stack_settings(uris, cfg)
        return _SegmenterPlan({"rough": rough_settings}, cfg.data, rough_settings, None)
    model_bytes = read_model(model, cfg.storage, "segmenter checkpoint")
    data_cfg = _model_data_cfg(model_bytes, model, cfg)
    plan = _SegmenterPlan(
        {"model_sha256": hashlib.sha256(model_bytes).hexdigest()}, data_cfg, None, model_bytes
    )
    if cfg.segmenter.merge_rough and cfg.rough.method == "classical":
        try:
            plan.rough = plan.identity["merge_rough"] = rough_stack_settings(uris, cfg)
            if cfg.segmenter.merge_candidates:
                plan.identity["merge_candidates"] = True
        except ScaleOutError:  # no frame readable: the actors report each one; nothing to merge
            pass
    return plan


def _segment_settings(
    plan: _SegmenterPlan, cfg: Config, frame_scales: dict[str, float] | None
) -> dict[str, Any]:
    """What a re-run into the same ``out`` must keep (``segment.json``)."""
    d, sg = plan.data_cfg, cfg.segmenter
    settings = {
        **plan.identity,
        "image_size": d.image_size,
        "resize_mode": d.resize_mode,
        "scale": d.scale,
        "norm_low_percentile": d.norm_low_percentile,
        "norm_high_percentile": d.norm_high_percentile,
        "tile_overlap": sg.tile_overlap,
    }
    if frame_scales:
        settings["frame_scales"] = dict(sorted(frame_scales.items()))
    return settings


def _reported_source(uri: str, s3: bool) -> str:
    """The ``source`` an actor reports for ``uri``: Ray reads local files by their absolute path."""
    return uri if s3 else os.path.abspath(uri)


def _run_segment_actors(
    uris: list[str],
    stems: dict[str, str],
    s3: bool,
    plan: _SegmenterPlan,
    cfg: Config,
    actor_kwargs: dict[str, Any],
):
    """Start Ray and plan the Ray Data job: read each frame's bytes, then the :class:`SegmentActor` pool.

    Args:
        s3: the stack is on S3 (Ray reads ``bucket/key`` paths through pyarrow's S3 filesystem).
        actor_kwargs: the actor's arguments that come from the caller as they are (``masks_dir``, ``done``,
            ``fallback_pixel_size_nm``, ``frame_scales``); the others are set here.

    Returns:
        The (lazy) dataset of the actors' rows, one per image read.
    """
    from tgan_ray.runtime import init_ray

    ray = init_ray(cfg.ray)
    # The classical segmenter is numpy and scipy: its actors take CPUs only.
    rough = plan.model_bytes is None  # --rough: no model
    pool_cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"use_gpu": "no"})}) if rough else cfg
    pool = actor_pool_options(pool_cfg, free_cpus=IO_TASK_CPUS)
    model_ref = None if rough else ray.put(plan.model_bytes)
    plan.model_bytes = None  # the object store holds it now; the driver need not, for the whole job
    # pyarrow wants bucket/key paths with an S3 filesystem; actors rebuild the URIs with the scheme.
    paths = [u.split("://", 1)[1] for u in uris] if s3 else [os.path.abspath(u) for u in uris]
    renamed = {_reported_source(u, s3): s for u, s in stems.items() if Path(u).stem != s}
    ds = ray.data.read_binary_files(
        paths,
        include_paths=True,
        filesystem=st.pyarrow_filesystem(cfg.storage) if s3 else None,
        ignore_missing_paths=True,
        num_cpus=IO_TASK_CPUS,
    )
    return ds.map_batches(
        SegmentActor,
        batch_size=cfg.scale_out.batch_size,
        fn_constructor_kwargs={
            **actor_kwargs,
            "model_ref": [model_ref],
            "data_cfg": plan.data_cfg,
            "seg_cfg": cfg.segmenter,
            "device": device_for(pool_cfg),
            "storage": cfg.storage,
            "scheme": uris[0].split("://", 1)[0] if s3 else None,
            "stems": renamed,
            "rough": plan.rough,
        },
        **pool,
    )


def _write_stack_outputs(
    ds, uris: list[str], stems: dict[str, str], s3: bool, out: str, storage: StorageConfig | None
) -> tuple[list[dict], dict[str, Any], int]:
    """Gather the actors' rows, their particles streamed to a local file, and write the tables to ``out``.

    Returns:
        (rows of images.parquet, summary.json, rows of particles.parquet).
    """
    sink = ParticleSink()
    try:
        rows, per_image = collect_rows(ds.iter_batches(batch_size=None, batch_format="numpy"), sink)
        seen = {r["source"] for r in rows}
        # read_binary_files drops an object that vanished after the listing (ignore_missing_paths).
        for u in uris:
            if _reported_source(u, s3) not in seen:
                row = error_row(stems[u], u, "object disappeared before it could be read")
                rows.append({c: row[c] for c in IMAGE_COLUMNS} | {"pixel_size_nm": None})
        sink.close()
        summary = write_outputs(out, storage, sink, rows, per_image)
    finally:
        sink.close()
        os.unlink(sink.path)
    return rows, summary, sink.rows


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

    start = time.monotonic()
    if rough == (model is not None):
        raise ScaleOutError("segment with a model or with the rough segmenter (--rough), not both or neither")
    images, out, storage = str(images), str(out), cfg.storage
    model = None if model is None else str(model)
    if st.is_s3(out):
        out = out.rstrip("/")
    masks_dir = st.join(out, "masks") if masks_dir is None else str(masks_dir).rstrip("/")
    _check_storage(images, model, out, masks_dir, storage)
    uris = list_stack(images, storage, recursive=recursive)
    stems = unique_stems(uris)
    done = _masks_done(masks_dir, stems, storage)
    plan = _plan_segmenter(model, uris, cfg, rough)
    # Masks found in out are reused: they must come from this model at these settings.
    sources = {"model": model or "rough", "images": images, "masks": masks_dir}
    check_settings(out, _segment_settings(plan, cfg, frame_scales), sources, storage, "segment.json")

    s3 = st.is_s3(images)
    actor_kwargs = {
        "masks_dir": masks_dir,
        "done": done,
        "fallback_pixel_size_nm": fallback_pixel_size_nm,
        "frame_scales": frame_scales,
    }
    ds = _run_segment_actors(uris, stems, s3, plan, cfg, actor_kwargs)
    rows, summary, particles = _write_stack_outputs(ds, uris, stems, s3, out, storage)
    errors = [(r["source"], r["reason"]) for r in rows if r["status"] == STATUS_ERROR]
    return SegmentResult(
        out=out,
        masks=masks_dir,
        images=len(uris),
        segmented=summary["images"]["segmented"],
        reused=summary["images"]["reused"],
        errors=errors,
        particles=particles,
        summary=summary,
        seconds=time.monotonic() - start,
    )
