"""Model URIs: a local checkpoint, ``s3://bucket/key`` or ``models:/<name>/<version|latest>`` / ``models:/<name>@alias``.

    path = resolve_model_uri("models:/npssegnet/3", cfg)     # a local file, downloaded once into a cache

Used by ``tgan serve``, ``tgan segment`` and ``tgan run --seed-model`` alike.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tgan_ray.config import Config

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


@dataclass
class ModelSource:
    """Where a served checkpoint came from.

    Attributes:
        uri: what the user gave (a path, ``s3://`` URI or ``models:/name/version``).
        path: the local checkpoint file.
        name: registered model name, else the file's stem.
        version: registry version, else ``sha256:<12 hex>`` of the file (so two files never look alike).
        run_id: MLflow run that produced the registered version, if any.
    """

    uri: str
    path: str
    name: str
    version: str
    run_id: str | None = None


def _default_cache_dir() -> Path:
    from tgan_ray.io.storage import cache_root

    return cache_root() / "models"


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tracking_uri(cfg: Config, uri: str) -> str:
    tracking = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        raise ValueError(
            f"{uri}: a models:/ URI needs the MLflow registry: set tracking.tracking_uri "
            "(e.g. --set tracking.tracking_uri=sqlite:////abs/run/mlflow.db) or MLFLOW_TRACKING_URI"
        )
    return tracking


def _registry_version(uri: str, cfg: Config) -> tuple[str, str, str, str, str | None]:
    """``models:/name/<version|latest>`` or ``models:/name@alias`` -> (tracking, name, version, source, run_id)."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise ValueError(
            f"bad model URI {uri!r}: write models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>"
        )
    tracking = _tracking_uri(cfg, uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ValueError(f"{uri}: registered model {name!r} has no versions in {tracking}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{uri}: not found in the MLflow registry at {tracking}: {first[:200]}") from None
    return tracking, name, str(mv.version), mv.source, mv.run_id


def resolve_model(
    uri: str | os.PathLike, cfg: Config | None = None, cache_dir: str | os.PathLike | None = None
) -> ModelSource:
    """Find or fetch a segmenter checkpoint and say where it came from.

    Args:
        uri: a local checkpoint, an ``s3://`` URI (endpoint from ``cfg.storage``) or an MLflow registry URI
            ``models:/<name>/<version>`` / ``models:/<name>/latest`` / ``models:/<name>@<alias>`` (tracking
            server from ``cfg.tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI``).
        cfg: the config (storage and tracking settings).
        cache_dir: where fetched checkpoints are kept (default ``~/.cache/tgan-ray/models``). Registry versions
            are immutable, so a cached one is reused; an S3 object is fetched again each time (it may change).

    Returns:
        A :class:`ModelSource` whose ``path`` is a local file.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a malformed or unknown ``models:/`` URI.
        StorageError: S3 problems.
    """
    cfg = cfg or Config()
    uri = str(uri)
    cache = Path(cache_dir) if cache_dir else _default_cache_dir()
    if uri.startswith("models:/"):
        tracking, name, version, source, run_id = _registry_version(uri, cfg)
        key = hashlib.sha1(f"{tracking}|{name}|{version}".encode()).hexdigest()[:16]
        dst = cache / key
        found = sorted(p for p in dst.glob("**/*") if p.is_file()) if dst.is_dir() else []
        if not found:
            import mlflow.artifacts

            tmp = cache / f".{key}.tmp-{os.getpid()}"
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking)
            try:
                os.replace(tmp, dst)  # atomic: a concurrent replica sees all of it or none
            except OSError:  # another process won the race; its copy is as good
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            found = sorted(p for p in dst.glob("**/*") if p.is_file())
        if len(found) != 1:
            raise ValueError(
                f"{uri}: expected one checkpoint file in its artifact {source}, found {len(found)}"
            )
        return ModelSource(uri, str(found[0]), name, version, run_id)

    from tgan_ray.io.storage import download_to, is_s3

    if is_s3(uri):
        key = hashlib.sha1(uri.encode()).hexdigest()[:16]
        path = download_to(uri, cache / key / os.path.basename(uri.rstrip("/")), cfg.storage)
    else:
        path = os.path.abspath(os.path.expanduser(uri))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"segmenter checkpoint not found: {uri}")
    return ModelSource(uri, path, Path(path).stem, f"sha256:{_sha256(path)[:12]}")


def resolve_model_uri(
    uri: str | os.PathLike, cfg: Config | None = None, cache_dir: str | os.PathLike | None = None
) -> str:
    """The local checkpoint path for a path, ``s3://`` or ``models:/`` URI (see :func:`resolve_model`)."""
    return resolve_model(uri, cfg, cache_dir).path


# ---------------------------------------------------------------------------------------------- request parsing
