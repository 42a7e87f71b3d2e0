"""Ray Data plumbing that ``generate`` (steps 4-6 at scale) and ``segment`` (step 8 at scale) share: model actor
pools and their resources, model files handed to actors, and the settings a re-run into the same output must keep.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from tgan_ray.config import Config, StorageConfig
from tgan_ray.io import storage as st

# Tasks that only move bytes (read, PNG encode, write) take little CPU; the model actors take what config says.
IO_TASK_CPUS = 0.25


class ScaleOutError(ValueError):
    """A generate / segment request that cannot run: the one-line message names the file or setting."""


def actor_pool_options(cfg: Config, free_cpus: float) -> dict[str, Any]:
    """``map_batches`` keyword arguments for a model actor pool: GPUs when used, else fractional CPUs.

    Args:
        cfg: ``scale_out`` and ``ray`` settings.
        free_cpus: CPUs the job's tasks (read, sample, write) need beside the actors.

    Raises:
        ScaleOutError: on a local Ray instance, actors that would take every CPU (nothing left to read and
            write) or GPUs it does not have: the job would wait forever.
    """
    import ray

    from tgan_ray.runtime import cluster_address, use_gpu

    so = cfg.scale_out
    resources = ray.cluster_resources()
    total = resources.get("CPU", 0)
    is_local = not cluster_address(cfg.ray)
    cpus = so.cpus_per_actor
    # None: locally, the actors share every CPU the reading and writing tasks leave; on a cluster, 1 each.
    if cpus is None:
        cpus = max(0.25, (total - free_cpus) / so.actors) if is_local else 1.0
    options: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=so.actors), "num_cpus": cpus}
    if use_gpu(cfg.ray):
        options["num_gpus"] = so.gpus_per_actor
        if is_local and resources.get("GPU", 0) < so.gpus_per_actor:
            raise ScaleOutError(
                f"ray.use_gpu={cfg.ray.use_gpu} but this Ray instance has {resources.get('GPU', 0):g} GPU(s) for "
                f"scale_out.gpus_per_actor={so.gpus_per_actor}; set ray.use_gpu=no or auto"
            )
    if is_local and so.actors * cpus > total - free_cpus:
        raise ScaleOutError(
            f"scale_out.actors={so.actors} x scale_out.cpus_per_actor={so.cpus_per_actor} leaves less than "
            f"{free_cpus:g} CPU for reading and writing on this {total:g}-CPU Ray instance; "
            "lower scale_out.actors or scale_out.cpus_per_actor"
        )
    return options


def device_for(cfg: Config) -> str:
    from tgan_ray.runtime import use_gpu

    return "cuda" if use_gpu(cfg.ray) else "cpu"


def read_model(uri: str, storage: StorageConfig | None, what: str) -> bytes:
    """A model file's bytes, read on the driver (local or S3): a missing file fails here, before any Ray work,
    with one line naming it. ``ray.put`` them so that actors on any node can load the model."""
    try:
        return st.read_bytes(uri, storage)
    except st.StorageNotFoundError:
        raise ScaleOutError(f"{what} not found: {uri}") from None


def local_copy(ref: Any, suffix: str) -> str:
    """Write ``data`` (bytes, or an object-store reference to them) to a temporary file; the caller deletes it."""
    if not isinstance(ref, bytes):
        import ray

        ref = ray.get(ref)
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="tgan-model-")
    with os.fdopen(fd, "wb") as f:
        f.write(ref)
    return path


def check_settings(
    out: str, settings: dict[str, Any], sources: dict[str, Any], storage: StorageConfig | None, name: str
) -> None:
    """A re-run into the same ``out`` must use the same settings, or its new files would not match the old
    ones. The settings are kept in ``<out>/<name>``; ``sources`` (the paths) are recorded, not compared.

    Raises:
        ScaleOutError: ``out`` was filled with other settings; names them.
    """
    uri = st.join(out, name)
    if st.exists(uri, storage):
        try:
            before = json.loads(st.read_bytes(uri, storage))
        except json.JSONDecodeError:
            before = None
        if isinstance(before, dict):
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            if changed:
                raise ScaleOutError(
                    f"{out} holds outputs made with other settings ({', '.join(changed)}); "
                    "use a new output, or the same settings to complete it"
                )
            return
    st.write_bytes(uri, json.dumps({**settings, "sources": sources}, indent=2).encode(), storage)
