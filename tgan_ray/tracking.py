"""MLflow tracking: one parent run per pipeline run, a child run per stage or trial, logged from rank 0 only.

With no tracking server configured, runs go to a sqlite store inside the run folder (MLflow 3 refuses the old
``./mlruns`` file store). Every call is a no-op when tracking is disabled, so loops never branch on it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import TrackingConfig


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str | os.PathLike | None) -> str | None:
    """Config, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<run_dir>/mlflow.db``; None if disabled."""
    if not cfg.enabled:
        return None
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if run_dir is None or str(run_dir).startswith("s3://"):
        # sqlite needs a local file: an S3 run folder keeps its store beside the working directory.
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def _quiet_mlflow() -> None:
    import logging

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")


class Tracker:
    """A thin handle on one MLflow run; every method is a no-op without a tracking URI.

    Args:
        uri: MLflow tracking URI (None disables tracking).
        experiment: experiment name.
        run_id: attach to this existing run (workers log into the run the driver created).
    """

    def __init__(self, uri: str | None, experiment: str = "tgan-ray", run_id: str | None = None):
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self._client = None
        if uri:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):
            # Keep artefacts beside the sqlite store, not in ./mlruns of whatever folder the process runs in.
            artifacts = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
        try:
            return self._client.create_experiment(self.experiment, artifact_location=artifacts)
        except Exception:  # created meanwhile by another process
            return self._client.get_experiment_by_name(self.experiment).experiment_id

    def start_child(self, name: str, tags: dict[str, str] | None = None) -> Tracker:
        """Create a run (a child of this one if this one is a run) and return a tracker bound to it."""
        if self._client is None:
            return Tracker(None)
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if self.run_id:
            all_tags["mlflow.parentRunId"] = self.run_id
        run = self._client.create_run(self._experiment_id(), tags=all_tags, run_name=name)
        return Tracker(self.uri, self.experiment, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k.replace("@", "_"), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating)) and np.isfinite(v)
        ]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_image(self, image: np.ndarray, name: str) -> None:
        if self.enabled:
            self._client.log_image(self.run_id, image, artifact_file=name)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            if Path(path).is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._client.set_terminated(self.run_id, status)

    def register_model(
        self, checkpoint_path: str | os.PathLike, name: str, metrics: dict | None = None
    ) -> str | None:
        """Log a checkpoint file as an artifact and register it as a model version; returns the version."""
        if not self.enabled:
            return None
        self.log_artifact(checkpoint_path, "model")
        source = f"runs:/{self.run_id}/model/{Path(checkpoint_path).name}"
        try:
            self._client.create_registered_model(name)
        except Exception:
            pass  # already registered
        version = self._client.create_model_version(name, source, run_id=self.run_id)
        for k, v in (metrics or {}).items():
            self._client.set_model_version_tag(name, version.version, k, str(v))
        return version.version
