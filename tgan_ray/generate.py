"""Steps 4-6 at scale: a virtual labelled dataset of N (image, mask) pairs, sharded with Ray Data.

    result = generate_dataset("run/round1/prior.json", p2p_model, cyc_model, 100_000, "s3://em/virtual", cfg)
    result = generate_from_run("runs/r1", 10_000, "runs/r1/virtual-10k", cfg)

Ray Data plan (streaming: memory stays bounded whatever N; the tasks and the actor are in
:mod:`tgan_ray.generate_actor`)::

    range(n) -> sample masks (tasks, masks_per_task a block; indices already written are dropped)
             -> GeneratorActor (actor pool: pix2pix -> 1st generation -> CycleGAN -> 2nd generation)
             -> write PNGs (tasks, through the storage layer; each object atomic)
             -> driver: small rows -> manifest.parquet (written last: the commit)

Output::

    <out>/images/0000042.png   the image (2nd generation; the 1st when there is no CycleGAN)
    <out>/masks/0000042.png    its mask (0/255)
    <out>/gen1/0000042.png     1st generation (write_gen1=True)
    <out>/generate.json        settings of the dataset (a re-run must match them)
    <out>/manifest.parquet     index, image, mask, seed[, gen1]: relative paths, one row per pair

Mask i is ``sample_capped_mask_at(prior, image_size, seed, i, prior.max_empty_fraction)``: reproducible from
(seed, i) alone, so a re-run with the same ``out`` writes only the pairs whose two PNGs are missing, and never
duplicates one. The pipeline's own steps 4 and 6 (``tgan run``) call :func:`generate_dataset` too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tgan_ray.config import Config, StorageConfig
from tgan_ray.generate_actor import GeneratorActor, pair_paths, sample_masks, write_pairs
from tgan_ray.io import storage as st
from tgan_ray.manifest import round_step, step_rounds
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

SAMPLE_TASK_CPUS = 0.5  # sampling masks from the prior: light, beside the model actors
# ray.data.range's read tasks take Ray Data's default of 1 CPU (range() has no num_cpus): an actor pool that
# leaves less than that free waits forever for input.
RANGE_READ_CPUS = 1.0
_PAIR_NAME = re.compile(r"^(\d{7})\.png$")


@dataclass
class GenerateResult:
    """What :func:`generate_dataset` left in ``out``."""

    out: str
    manifest: str  # URI of manifest.parquet
    count: int  # pairs the manifest lists (= n)
    generated: int  # pairs written by this call
    reused: int  # pairs found complete in ``out`` and kept
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 2)}


def check_generator(data: bytes, uri: str) -> None:
    """Load a generator checkpoint once on the driver, so a wrong file fails before any Ray work."""
    from tgan_ray.inference import load_generator

    path = local_copy(data, ".pt")
    try:
        load_generator(path, "cpu")
    except Exception as exc:  # noqa: BLE001 - torch.load and load_state_dict fail in many ways
        raise ScaleOutError(
            one_line(f"{uri} is not a usable generator checkpoint: {exc}").replace(path, uri)
        ) from None
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------- driver


def _written(out: str, folder: str, storage: StorageConfig | None) -> set[int]:
    """Indices with a PNG in ``<out>/<folder>/`` (one listing)."""
    try:
        files = st.list_files(st.join(out, folder), storage, exts=["png"])
    except st.StorageNotFoundError:
        return set()
    found = (_PAIR_NAME.match(f.replace("\\", "/").rsplit("/", 1)[-1]) for f in files)
    return {int(m.group(1)) for m in found if m}


def _load_prior(data: bytes, prior_path: str):
    from tgan_ray.masks.prior import MorphologyPrior

    try:
        prior = MorphologyPrior.from_dict(json.loads(data))
        getattr(
            prior, "cluster_sigma", None
        )  # calibrate (cached) once here, not again in every sampling task
        return prior
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ScaleOutError(f"{prior_path} is not a morphology prior (not its JSON)") from None
    except ValueError as exc:
        raise ScaleOutError(f"{prior_path}: {exc}") from None


def _write_manifest(
    out: str, indices: np.ndarray, seed: int, with_gen1: bool, storage: StorageConfig | None
) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    indices = np.sort(indices)
    paths = [pair_paths(i) for i in indices.tolist()]
    columns = {
        "index": pa.array(indices, pa.int64()),
        "image": pa.array([p["image"] for p in paths], pa.string()),
        "mask": pa.array([p["mask"] for p in paths], pa.string()),
        "seed": pa.array(np.full(len(indices), seed, dtype=np.int64)),
    }
    if with_gen1:
        columns["gen1"] = pa.array([p["gen1"] for p in paths], pa.string())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    uri = st.join(out, "manifest.parquet")
    st.write_bytes(uri, sink.getvalue().to_pybytes(), storage)
    return uri


@dataclass
class _Inputs:
    """The prior and the generator checkpoints of a dataset, read and checked on the driver."""

    prior: Any  # MorphologyPrior, calibrated
    prior_bytes: bytes
    pix2pix_bytes: bytes
    cyclegan_bytes: bytes | None  # None: a pix2pix-only dataset


def _read_inputs(
    out: str,
    prior_path: str | os.PathLike,
    pix2pix_model: str | os.PathLike,
    cyclegan_model: str | os.PathLike | None,
    storage: StorageConfig | None,
) -> _Inputs:
    """Check ``out`` and read the prior and models, so that a bad one fails before any Ray work."""
    st.check_access(out, storage)
    for uri in (prior_path, pix2pix_model, cyclegan_model):
        if uri is not None and st.is_s3(uri):
            st.check_access(str(uri), storage)
    prior_bytes = read_model(str(prior_path), storage, "morphology prior")
    prior = _load_prior(prior_bytes, str(prior_path))
    p2p_bytes = read_model(str(pix2pix_model), storage, "pix2pix model")
    cyc_bytes = None if cyclegan_model is None else read_model(str(cyclegan_model), storage, "CycleGAN model")
    check_generator(p2p_bytes, str(pix2pix_model))
    if cyc_bytes is not None:
        check_generator(cyc_bytes, str(cyclegan_model))
    return _Inputs(prior, prior_bytes, p2p_bytes, cyc_bytes)


def _dataset_settings(inputs: _Inputs, seed: int, cfg: Config) -> dict[str, Any]:
    """What a re-run into the same ``out`` must keep (``generate.json``)."""
    # Content hashes, not paths: the same files moved elsewhere may complete a dataset, retrained ones may not.
    return {
        "seed": seed,
        "image_size": cfg.data.image_size,
        "border_policy": cfg.prior.border_policy,
        "max_empty_fraction": cfg.prior.max_empty_fraction,
        "prior_sha256": hashlib.sha256(inputs.prior_bytes).hexdigest(),
        "pix2pix_sha256": hashlib.sha256(inputs.pix2pix_bytes).hexdigest(),
        "cyclegan_sha256": None
        if inputs.cyclegan_bytes is None
        else hashlib.sha256(inputs.cyclegan_bytes).hexdigest(),
    }


def _pairs_done(out: str, n: int, write_gen1: bool, storage: StorageConfig | None) -> set[int]:
    """Indices below ``n`` whose files are all in ``out`` already: a re-run keeps them."""
    done = _written(out, "images", storage) & _written(out, "masks", storage)
    if write_gen1:
        done &= _written(out, "gen1", storage)
    return {i for i in done if i < n}


def _generate_missing(
    inputs: _Inputs, n: int, done: set[int], out: str, seed: int, write_gen1: bool, cfg: Config
) -> np.ndarray:
    """Run the Ray Data job that samples, generates and writes the pairs not in ``done``; their indices."""
    from tgan_ray.runtime import init_ray

    ray = init_ray(cfg.ray)
    pool = actor_pool_options(cfg, free_cpus=RANGE_READ_CPUS)
    p2p_ref = ray.put(inputs.pix2pix_bytes)
    cyc_ref = None if inputs.cyclegan_bytes is None else ray.put(inputs.cyclegan_bytes)
    per_task = cfg.scale_out.masks_per_task
    ds = ray.data.range(n, override_num_blocks=max(1, math.ceil(n / per_task)))
    ds = ds.map_batches(
        sample_masks,
        batch_size=per_task,
        num_cpus=SAMPLE_TASK_CPUS,
        fn_kwargs={
            "prior": inputs.prior,
            "size": cfg.data.image_size,
            "seed": seed,
            "border_policy": cfg.prior.border_policy,
            "max_empty_fraction": cfg.prior.max_empty_fraction,
            "done": np.fromiter(sorted(done), dtype=np.int64, count=len(done)),
        },
    )
    ds = ds.map_batches(
        GeneratorActor,
        batch_size=cfg.scale_out.batch_size,
        fn_constructor_kwargs={
            "pix2pix_ref": [p2p_ref],
            "cyclegan_ref": [cyc_ref] if cyc_ref else None,
            "device": device_for(cfg),
            "batch_size": cfg.scale_out.batch_size,
            "seed": seed,
        },
        **pool,
    )
    ds = ds.map_batches(
        write_pairs,
        batch_size=cfg.scale_out.batch_size,
        num_cpus=IO_TASK_CPUS,
        fn_kwargs={"out": out, "storage": cfg.storage, "seed": seed, "write_gen1": write_gen1},
    )
    new = [b["index"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    return np.concatenate(new) if new else np.zeros(0, np.int64)


def generate_dataset(
    prior_path: str | os.PathLike,
    pix2pix_model: str | os.PathLike,
    cyclegan_model: str | os.PathLike | None,
    n: int,
    out: str | os.PathLike,
    cfg: Config,
    seed: int | None = None,
    write_gen1: bool = False,
) -> GenerateResult:
    """Generate (or complete) a virtual labelled dataset of ``n`` pairs with Ray Data.

    Args:
        prior_path: morphology prior (``prior.json`` of a run; local or s3://).
        pix2pix_model: the pix2pix stage's ``model.pt`` (mask -> 1st generation).
        cyclegan_model: the CycleGAN stage's ``model.pt`` (1st -> 2nd generation); None: the images are the
            1st generation.
        n: pairs wanted; indices 0..n-1.
        out: local folder or ``s3://bucket/prefix``.
        cfg: ``scale_out`` (batch size, actors, CPUs/GPUs per actor, masks per task), ``data.image_size``,
            ``prior`` (border policy, ``max_empty_fraction``), ``storage`` and ``ray``.
        seed: seed of the masks; None: ``cfg.data.seed``.
        write_gen1: also keep the 1st generation under ``gen1/`` (with a CycleGAN only).

    Returns:
        :class:`GenerateResult`; ``<out>/manifest.parquet`` lists all ``n`` pairs.

    A pair is a function of (seed, index) and the models: a re-run writes the same mask, and the same image
    within one grey level (each generator pass has the same batch size, so on one machine it is bit-identical;
    CPU kernels of another build or instruction set may round a pixel the other way).

    Raises:
        StorageError: ``out`` (bucket, credentials, endpoint) is unusable; raised before any Ray work.
        ScaleOutError: a missing model or prior, ``n`` < 1, settings that differ from an earlier run into
            ``out``, or an actor pool that cannot fit the local Ray instance.
    """
    start = time.monotonic()
    out, storage = str(out).rstrip("/") if st.is_s3(out) else str(out), cfg.storage
    if n < 1:
        raise ScaleOutError(f"n={n}: ask for at least one pair")
    seed = cfg.data.seed if seed is None else int(seed)
    write_gen1 = write_gen1 and cyclegan_model is not None
    inputs = _read_inputs(out, prior_path, pix2pix_model, cyclegan_model, storage)
    sources = {
        "prior": str(prior_path),
        "pix2pix": str(pix2pix_model),
        "cyclegan": cyclegan_model and str(cyclegan_model),
    }
    check_settings(out, _dataset_settings(inputs, seed, cfg), sources, storage, "generate.json")
    done = _pairs_done(out, n, write_gen1, storage)
    todo = n - len(done)
    if todo:
        new_indices = _generate_missing(inputs, n, done, out, seed, write_gen1, cfg)
    else:
        new_indices = np.zeros(0, np.int64)

    indices = np.union1d(np.fromiter(done, dtype=np.int64, count=len(done)), new_indices)
    if len(indices) != n:  # cannot happen unless a worker dropped rows; never commit a short manifest
        raise ScaleOutError(f"generated {len(indices)} of {n} pairs in {out}; run again to complete it")
    manifest = _write_manifest(out, indices, seed, write_gen1, storage)
    return GenerateResult(out, manifest, n, int(len(new_indices)), len(done), time.monotonic() - start)


# ---------------------------------------------------------------------------------------------- from a run


def stage_model_uri(checkpoint_path: str, cfg: Config) -> str:
    """``model.pt`` of a stage checkpoint; Ray Train records S3 checkpoints as ``bucket/prefix``."""
    path = str(checkpoint_path)
    if not st.is_s3(path) and not os.path.exists(path) and st.is_s3(cfg.ray.storage_path or ""):
        path = "s3://" + path.lstrip("/")
    return st.join(path, "model.pt")


def find_run_models(run_dir: str | os.PathLike, cfg: Config) -> dict[str, str]:
    """The last finished round's prior and best pix2pix / CycleGAN models of a pipeline run.

    Args:
        run_dir: the run folder, local or ``s3://`` (``tgan run --out s3://...``).

    Returns:
        ``{"round", "prior", "pix2pix", "cyclegan"}`` (paths or URIs).

    Raises:
        ScaleOutError: no run manifest, or no round with both GAN stages finished.
    """
    run = str(run_dir).rstrip("/") if st.is_s3(run_dir) else str(run_dir)
    path = st.join(run, "manifest.json")
    try:
        steps = json.loads(st.read_bytes(path, cfg.storage)).get("steps", {})
    except st.StorageNotFoundError:
        raise ScaleOutError(f"not a pipeline run folder (no manifest.json): {run}") from None
    except json.JSONDecodeError as exc:
        raise ScaleOutError(f"run manifest {path} is corrupt ({exc.msg})") from None
    for r in step_rounds(steps, "cyclegan"):
        p2p, cyc = steps.get(round_step(r, "pix2pix"), {}), steps.get(round_step(r, "cyclegan"), {})
        if p2p.get("status") == "done" and cyc.get("status") == "done":
            return {
                "round": r,
                "prior": st.join(run, f"round{r}", "prior.json"),
                "pix2pix": stage_model_uri(p2p["outputs"]["checkpoint_path"], cfg),
                "cyclegan": stage_model_uri(cyc["outputs"]["checkpoint_path"], cfg),
            }
    raise ScaleOutError(f"run {run} has no round with pix2pix and CycleGAN both finished")


def generate_from_run(
    run_dir: str | os.PathLike,
    n: int,
    out: str | os.PathLike,
    cfg: Config,
    seed: int | None = None,
    write_gen1: bool = False,
) -> GenerateResult:
    """:func:`generate_dataset` with the prior and best GANs of a pipeline run's last finished round."""
    found = find_run_models(run_dir, cfg)
    return generate_dataset(
        found["prior"], found["pix2pix"], found["cyclegan"], n, out, cfg, seed, write_gen1
    )
