"""Where a run folder lives: a local folder, or an ``s3://`` prefix with a local working copy.

    folder = RunFolder("s3://bucket/runs/r1", cfg.storage)
    folder.pull()          # fill the working copy from S3 (a resume on any machine)
    ...                    # steps write into folder.local; Ray workers write to folder.uri("round1/virtual")
    folder.push()          # after each step: upload what changed, manifest.json last

An S3 run folder is the record, so a multi-node run (a KubeRay RayJob) needs no shared volume. The driver works in
a local copy, ``$TGAN_CACHE_DIR/runs/<bucket>/<prefix>`` (default ``~/.cache/tgan-ray``). What Ray workers write on
other nodes goes to S3 directly (Train checkpoints under ``ray/``, the generated pairs, step 8's masks and tables)
and the copy then fetches it, so every step reads local files as it does for a local run folder. The manifest is
uploaded last: on S3 it never names a file that is not there, and a crash costs at most the step it stopped in.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from tgan_ray.config import StorageConfig
from tgan_ray.io import storage as st

MANIFEST = "manifest.json"
# Ray Train's checkpoints stay on S3: later steps read the few models they need from there.
_REMOTE_ONLY = ("ray/",)
# Rewritten in place by every step, often at the same size (SQLite pages): always fetched, never judged by size.
_BOOKKEEPING = (MANIFEST, "mlflow.db")


def working_copy(uri: str) -> Path:
    """The local copy of the S3 run folder ``uri``: the same path for the same URI, on every run."""
    bucket, key = st.split_s3(uri)
    return st.cache_root() / "runs" / bucket / key.strip("/")


class RunFolder:
    """A run folder: ``local`` is where the steps read and write; ``remote`` the S3 prefix, or None."""

    def __init__(self, out: str | os.PathLike, storage: StorageConfig | None = None):
        self.storage = storage
        self.remote = str(out).rstrip("/") if st.is_s3(out) else None
        self.local = working_copy(self.remote) if self.remote else Path(out)
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) now on S3

    def __str__(self) -> str:
        return self.remote or str(self.local)

    def uri(self, *parts: str) -> str:
        """Where Ray workers write ``parts``: the S3 URI, or the local path."""
        return st.join(self.remote, *parts) if self.remote else str(self.local.joinpath(*parts))

    def pull(self, sub: str = "") -> None:
        """Fetch the objects under ``sub`` that the copy lacks or holds at another size (all but ``ray/``)."""
        if not self.remote:
            return
        prefix = st.join(self.remote, sub) if sub else self.remote
        for rel, size in st.list_sizes(prefix, self.storage).items():
            rel = f"{sub.strip('/')}/{rel}" if sub else rel
            if rel.startswith(_REMOTE_ONLY):
                continue
            path = self.local / rel
            if rel in _BOOKKEEPING or not path.is_file() or path.stat().st_size != size:
                st.download_to(st.join(self.remote, rel), path, self.storage)
            stat = path.stat()
            self._sent[rel] = (stat.st_size, stat.st_mtime_ns)
        if not sub:
            self._relocate_manifest()

    def push(self) -> None:
        """Upload the files that changed since the last push or pull; the manifest last."""
        if not self.remote:
            return
        changed = []
        for root, _, names in os.walk(self.local):
            for name in names:
                if name.startswith("."):  # temporary files of atomic writes
                    continue
                path = Path(root) / name
                rel = path.relative_to(self.local).as_posix()
                stat = path.stat()
                if self._sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    changed.append((rel, path, stat))
        changed.sort(key=lambda item: item[0] == MANIFEST)
        for rel, path, stat in changed:
            st.upload_file(path, st.join(self.remote, rel), self.storage)
            self._sent[rel] = (stat.st_size, stat.st_mtime_ns)

    def to_local(self, obj: Any, sub: str) -> Any:
        """``obj`` (a step's outputs) with the S3 URIs under ``sub``, which :meth:`pull` fetched, made local."""
        if not self.remote:
            return obj
        prefix = st.join(self.remote, sub)
        if isinstance(obj, str) and (obj == prefix or obj.startswith(prefix + "/")):
            return str(self.local / sub) + obj[len(prefix) :]
        if isinstance(obj, dict):
            return {k: self.to_local(v, sub) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.to_local(v, sub) for v in obj]
        return obj

    def _relocate_manifest(self) -> None:
        """A copy made on another machine (another home folder) names its files there: rename them here, in the
        manifest and in the MLflow store's artifact locations."""
        path = self.local / MANIFEST
        if not path.is_file():
            return
        text = path.read_text()
        written_in = json.loads(text).get("working_copy")
        if not written_in or written_in == str(self.local):
            return
        moved = text.replace(json.dumps(written_in)[1:-1], json.dumps(str(self.local))[1:-1])
        if (self.local / "mlflow.db").is_file():
            _relocate_mlflow(self.local / "mlflow.db", Path(written_in).as_uri(), self.local.as_uri())
        st.write_bytes(path, moved.encode(), self.storage)  # last: a failure above retries on the next pull


def _relocate_mlflow(db: Path, old: str, new: str) -> None:
    """Point MLflow's artifact locations (``file://`` URIs in its SQLite store) at the new working copy.

    MLflow has no API to move an experiment's artifact location, so the two columns that hold it are updated.
    """
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con, con:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (old, new))
