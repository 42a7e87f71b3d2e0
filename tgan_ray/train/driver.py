"""``train_stage``: run one trainable step as a Ray Train TorchTrainer (DDP over ``ray.num_workers`` workers).

    result = train_stage("pix2pix", cfg.pix2pix, {"train_images": ..., "train_masks": ..., ...}, cfg, run_dir)
    result.checkpoint_path   # best checkpoint by its score (KID for GANs, validation MIoU for NPsSegNet)

The same call runs in-process (``num_workers=0``), on 2 gloo CPU workers, or on N GPUs across nodes.
Running it again with the same run folder resumes from the stage's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from tgan_ray.config import Config, StorageConfig
from tgan_ray.tracking import Tracker
from tgan_ray.train.plumbing import CHECKPOINT_MODEL
from tgan_ray.train.stages import STAGES
from tgan_ray.train.worker import train_loop_per_worker


@dataclass
class StageResult:
    """What a finished stage leaves behind."""

    stage: str
    checkpoint_path: str  # best checkpoint folder (local path or s3:// URI)
    metrics: dict[str, Any]  # the metrics reported with that checkpoint
    storage_uri: str  # where Ray Train kept this stage's checkpoints
    latest_checkpoint_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> str:
        from tgan_ray.io.storage import join

        return join(self.checkpoint_path, CHECKPOINT_MODEL)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "checkpoint_path": self.checkpoint_path,
            "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, (int, float, str))},
            "storage_uri": self.storage_uri,
            "latest_checkpoint_path": self.latest_checkpoint_path,
        }


def _storage(cfg: Config, run_dir: str | Path) -> tuple[str, Any]:
    """Ray Train storage: ``ray.storage_path`` or ``<run>/ray``; S3 through a pyarrow filesystem."""
    path = cfg.ray.storage_path or f"{str(run_dir).rstrip('/')}/ray"
    if path.startswith("s3://"):
        from tgan_ray.io.s3 import pyarrow_filesystem

        return path[len("s3://") :], pyarrow_filesystem(cfg.storage)
    return str(Path(path).resolve()), None


def with_worker_cpus(cfg: Config, reserved: float = 0.0, trials: int = 1) -> Config:
    """``cfg`` with ``ray.cpus_per_worker`` resolved (:func:`~tgan_ray.runtime.worker_cpus`) for ``trials``
    stages at once. The workers ask Ray for that many CPUs and run one torch thread per CPU Ray gives them."""
    from tgan_ray.runtime import worker_cpus

    if cfg.ray.cpus_per_worker is not None:
        return cfg
    cpus = max(0.25, worker_cpus(cfg.ray, reserved) / max(1, trials))
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"cpus_per_worker": cpus})})


def build_trainer(
    stage: str,
    loop_config: dict[str, Any],
    cfg: Config,
    name: str,
    storage_path: str,
    fs=None,
    callbacks: list | None = None,
):
    """One TorchTrainer builder, shared by ``train_stage`` and Tune trials."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tgan_ray.runtime import use_gpu

    gpu = use_gpu(cfg.ray)
    resources = {"CPU": with_worker_cpus(cfg).ray.cpus_per_worker}
    if gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=gpu,
            resources_per_worker=resources if cfg.ray.num_workers > 0 else None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.ray.num_to_keep,
                checkpoint_score_attribute="score",
                checkpoint_score_order=STAGES[stage].mode,
            ),
            callbacks=callbacks,
        ),
    )


# Where rank 0's progress events go: None prints them as lines on the worker (Ray streams them to the driver).
_PROGRESS_SINK = None


@contextlib.contextmanager
def progress_to(sink):
    """Within the block, each stage's progress events (:func:`tgan_ray.terminal.progress_line` lists their
    keys) come back through a Ray queue and go to ``sink`` on the driver, then ``{"stage", "kind": "end"}``:
    they reach the terminal even when workers' output does not (``init_ray(log_to_driver=False)``)."""
    global _PROGRESS_SINK
    before, _PROGRESS_SINK = _PROGRESS_SINK, sink
    try:
        yield
    finally:
        _PROGRESS_SINK = before


@contextlib.contextmanager
def _progress_queue(loop_config: dict[str, Any]):
    if _PROGRESS_SINK is None:
        yield
        return
    from ray.util.queue import Empty, Queue

    sink, stop = _PROGRESS_SINK, threading.Event()
    queue = Queue(actor_options={"num_cpus": 0})  # no CPU: the workers have them all on a small machine
    loop_config["progress"] = queue

    def drain(block: bool) -> None:
        while True:
            try:
                sink(queue.get(block=block, timeout=0.5 if block else None))
            except Empty:
                return

    def pump() -> None:
        while not stop.is_set():
            drain(block=True)

    thread = threading.Thread(target=pump, name="tgan-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain(block=False)
        queue.shutdown()
        sink({"stage": loop_config["stage"], "kind": "end"})


def put_data(data: dict[str, Any]) -> dict[str, Any]:
    """Arrays go through the object store once, not pickled into every worker's config."""
    import ray

    return {k: ray.put(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in data.items()}


def train_stage(
    stage: str,
    stage_cfg: BaseModel,
    data: dict[str, np.ndarray],
    cfg: Config,
    run_dir: str | Path,
    tracker: Tracker | None = None,
    name: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> StageResult:
    """Train one stage on Ray Train and return its best checkpoint.

    Args:
        stage: "pix2pix", "cyclegan" or "segmenter".
        stage_cfg: that stage's config section.
        data: the stage's arrays (see ``stages.py``).
        cfg: the whole config (ray, tracking, seed).
        run_dir: the run folder; checkpoints go under ``<run>/ray/<name>`` unless ``ray.storage_path`` is set.
        tracker: the parent MLflow run; the stage logs into a child run of it.
        name: Ray Train run name (the same name resumes).
        extra_config: merged into the loop config (e.g. fault injection in tests).
    """
    from tgan_ray.runtime import init_ray

    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    init_ray(cfg.ray)
    name = name or stage
    storage_path, fs = _storage(cfg, run_dir)
    child = (tracker or Tracker(None)).start_child(name, tags={"stage": stage})
    child.log_params({f"{stage}.{k}": v for k, v in stage_cfg.model_dump(mode="json").items()})
    loop_config = {
        "stage": stage,
        "stage_cfg": stage_cfg.model_dump(mode="json"),
        "data": put_data(data),
        "ray": cfg.ray.model_dump(mode="json"),
        "seed": cfg.data.seed,
        "tracking": {
            "uri": child.uri,
            "experiment": child.experiment,
            "run_id": child.run_id,
            "sample_every": cfg.tracking.sample_every,
        },
        **(extra_config or {}),
    }
    try:
        with _progress_queue(loop_config):
            result = build_trainer(stage, loop_config, cfg, name, storage_path, fs).fit()
    except BaseException:
        child.end("FAILED")
        raise
    best = result.get_best_checkpoint("score", STAGES[stage].mode) or result.checkpoint
    if best is None:
        child.end("FAILED")
        raise RuntimeError(f"stage {stage} reported no checkpoint (storage {storage_path}/{name})")
    metrics = next((m for c, m in result.best_checkpoints if c.path == best.path), result.metrics or {})
    child.log_metrics({f"best/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    child.set_tags({"checkpoint": best.path})
    child.end()
    scheme = "s3://" if fs is not None else ""  # Ray records S3 checkpoints as bucket/prefix
    return StageResult(
        stage=stage,
        checkpoint_path=scheme + best.path,
        metrics=dict(metrics),
        storage_uri=f"{scheme}{storage_path}/{name}",
        latest_checkpoint_path=scheme + result.checkpoint.path if result.checkpoint else None,
        extra={"mlflow_run_id": child.run_id},
    )


def prune_checkpoints(stage: dict[str, Any], storage: StorageConfig | None = None) -> int:
    """Delete a finished stage's Ray Train checkpoints, all but its best model; returns the bytes freed.

    Once the pipeline records a stage done, a resumed run never trains it again, so the optimizer state and the
    other checkpoints are dead weight (200 MB per NPsSegNet checkpoint at the cpu preset). The best checkpoint's
    ``model.pt`` stays, because later steps and ``tgan generate`` read the GANs from it. Ray Train's checkpoint
    index goes too: a stage run again under this name starts afresh instead of looking for folders that are gone.
    Local folders and S3 alike, through one pyarrow filesystem.

    Args:
        stage: a :class:`StageResult` as a dict (``checkpoint_path``, ``storage_uri``).
        storage: the S3 endpoint of an ``s3://`` storage.
    """
    from pyarrow import fs as pafs

    from tgan_ray.io import storage as st

    root, best = stage.get("storage_uri"), stage.get("checkpoint_path")
    if not root or not best:
        return 0
    if st.is_s3(root):
        filesystem, root, best = st.pyarrow_filesystem(storage), root[len("s3://") :], best[len("s3://") :]
    else:
        filesystem, root, best = pafs.LocalFileSystem(), str(Path(root).resolve()), str(Path(best).resolve())
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return 0

    def files(folder: str) -> list:
        selector = pafs.FileSelector(folder, recursive=True)
        return [f for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File]

    freed = 0
    for entry in filesystem.get_file_info(pafs.FileSelector(root)):
        name = entry.base_name
        if entry.type == pafs.FileType.Directory and name.startswith("checkpoint_"):
            keep = entry.path.rstrip("/") == best.rstrip("/")
            gone = [f for f in files(entry.path) if not (keep and f.base_name == CHECKPOINT_MODEL)]
            freed += sum(f.size for f in gone)
            if keep:
                for f in gone:
                    filesystem.delete_file(f.path)
            else:
                filesystem.delete_dir(entry.path)
        elif entry.type == pafs.FileType.File and name.startswith("checkpoint_manager_snapshot"):
            freed += entry.size
            filesystem.delete_file(entry.path)
    return freed
