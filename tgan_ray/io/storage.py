"""One storage layer for local paths and ``s3://`` URIs (AWS S3, MinIO, Ceph, moto): read, write, list, copy.

Every function takes a plain path or an ``s3://bucket/key`` URI and an optional :class:`StorageConfig`
(endpoint, region). Credentials come only from the standard AWS chain (env, profile, instance role) and never
appear in an error message. The S3 client and its error messages live in :mod:`tgan_ray.io.s3`; the errors and
URI helpers (:func:`is_s3`, :func:`join`, ...) in :mod:`tgan_ray.io.uris`, and are passed on from here so that
callers need one namespace (``from tgan_ray.io import storage as st``).

    check_access("s3://em-data/stack1/", cfg.storage)   # fail in seconds, with one clear line
    for uri in list_files("s3://em-data/stack1/", cfg.storage, exts=["tif", "dm4"]):
        raw = read_bytes(uri, cfg.storage)
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tgan_ray.config import StorageConfig
from tgan_ray.io.s3 import (
    is_not_found,
    is_object,
    pyarrow_filesystem,
    s3_client,
    to_storage_error,
    translate_s3_errors,
)
from tgan_ray.io.uris import StorageError, StorageNotFoundError, is_s3, join, split_s3
from tgan_ray.messages import one_line

__all__ = [
    "StorageError",
    "StorageNotFoundError",
    "cache_root",
    "check_access",
    "download_to",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "list_sizes",
    "pyarrow_filesystem",
    "read_bytes",
    "split_s3",
    "upload_file",
    "write_bytes",
]

_GLOB_CHARS = "*?["


# ---------------------------------------------------------------------------------------------- read / write


def read_bytes(uri: str | os.PathLike, storage: StorageConfig | None = None) -> bytes:
    """The whole content of a local file or an S3 object.

    Raises:
        StorageNotFoundError: no such file, object or bucket.
        StorageError: any other failure (permissions, endpoint), naming the URI.
    """
    uri = str(uri)
    if not is_s3(uri):
        try:
            with open(uri, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StorageNotFoundError(f"no such file: {uri}") from None
        except IsADirectoryError:
            raise StorageError(f"is a folder, not a file: {uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from None
    bucket, key = split_s3(uri)
    with translate_s3_errors(uri, storage):
        return s3_client(storage).get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` atomically: readers see the old file or the new one, never half of it.

    Local files go to a temporary name in the same folder, then ``os.replace``; S3 ``put_object`` is atomic.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with translate_s3_errors(uri, storage):
            s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data)
        return
    _atomic_local_write(uri, lambda f: f.write(data))


def _atomic_local_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def exists(uri: str | os.PathLike, storage: StorageConfig | None = None) -> bool:
    """True if the file/folder exists; for S3, an object with this key or any object under ``key/``."""
    uri = str(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    client = s3_client(storage)
    with translate_s3_errors(uri, storage):
        if not key:  # the bucket itself, which may be empty
            try:
                client.head_bucket(Bucket=bucket)
                return True
            except Exception as exc:
                if is_not_found(exc):
                    return False
                raise
        if not key.endswith("/") and is_object(client, bucket, key):
            return True
        return (
            client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1).get("KeyCount", 0)
            > 0
        )


def download_to(
    uri: str | os.PathLike, local_path: str | os.PathLike, storage: StorageConfig | None = None
) -> str:
    """Copy a local file or S3 object to ``local_path`` (atomically); returns ``local_path``."""
    uri, local_path = str(uri), str(local_path)
    if not is_s3(uri):
        if not os.path.isfile(uri):
            raise StorageNotFoundError(f"no such file: {uri}")
        _atomic_local_write(local_path, lambda f: _copy_into(uri, f))
        return local_path
    bucket, key = split_s3(uri)
    client = s3_client(storage)

    def fetch(f) -> None:
        with translate_s3_errors(uri, storage):
            client.download_fileobj(bucket, key, f)

    _atomic_local_write(local_path, fetch)
    return local_path


def _copy_into(src: str, dst_file) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst_file)


def upload_file(
    local_path: str | os.PathLike, uri: str | os.PathLike, storage: StorageConfig | None = None
) -> str:
    """Copy a local file to a local path or S3 URI (multipart for large files); returns ``uri``."""
    local_path, uri = str(local_path), str(uri)
    if not os.path.isfile(local_path):
        raise StorageNotFoundError(f"no such file: {local_path}")
    if not is_s3(uri):
        _atomic_local_write(uri, lambda f: _copy_into(local_path, f))
        return uri
    bucket, key = split_s3(uri)
    from boto3.exceptions import S3UploadFailedError

    try:
        with translate_s3_errors(uri, storage):
            s3_client(storage).upload_file(local_path, bucket, key)
    except S3UploadFailedError as exc:  # boto3's transfer manager wraps the client error
        cause = exc.__cause__ or exc.__context__
        raise (to_storage_error(cause, uri, storage) if cause else StorageError(one_line(exc, 200))) from None
    return uri


# ---------------------------------------------------------------------------------------------- listing


def _normalise_exts(exts: Iterable[str] | None) -> tuple[str, ...] | None:
    if exts is None:
        return None
    return tuple("." + e.lower().lstrip(".") for e in exts)


def _has_ext(name: str, exts: tuple[str, ...] | None) -> bool:
    return exts is None or name.lower().endswith(exts)


def list_files(
    spec: str | os.PathLike,
    storage: StorageConfig | None = None,
    exts: Iterable[str] | None = None,
    recursive: bool = False,
    page_size: int = 1000,
) -> list[str]:
    """Files named by a folder, a glob (``/data/*.tif``), a single file, or an S3 prefix / glob.

    Args:
        spec: local folder, local glob, local file, ``s3://bucket/prefix`` (a folder) or ``s3://bucket/p/*.tif``.
        storage: S3 endpoint and region.
        exts: keep only these extensions (``["tif", ".png"]``, case-insensitive); None keeps all files.
        recursive: also list subfolders (folders and S3 prefixes); local globs may use ``**`` instead.
        page_size: S3 keys per list request (the listing paginates; small values are for tests).

    Returns:
        Sorted paths or URIs; empty if a folder, prefix or glob holds no matching files.

    Raises:
        StorageNotFoundError: a local folder/file that does not exist, or a missing bucket.
    """
    spec = str(spec)
    wanted = _normalise_exts(exts)
    if is_s3(spec):
        return _list_s3(spec, storage, wanted, recursive, page_size)
    if any(c in spec for c in _GLOB_CHARS):
        found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(spec):
        if recursive:
            found = [os.path.join(root, n) for root, _, names in os.walk(spec) for n in names]
        else:
            found = [e.path for e in os.scandir(spec) if e.is_file()]
    elif os.path.isfile(spec):
        found = [spec]
    else:
        raise StorageNotFoundError(f"no such folder or file: {spec}")
    # Skip dotfiles: macOS '._x.tif' resource forks look like images but are not.
    return sorted(p for p in found if _has_ext(p, wanted) and not os.path.basename(p).startswith("."))


def _list_s3(
    spec: str, storage: StorageConfig | None, wanted: tuple[str, ...] | None, recursive: bool, page_size: int
) -> list[str]:
    bucket, key = split_s3(spec)
    scheme = spec.split("://", 1)[0]
    pattern = None
    if any(c in key for c in _GLOB_CHARS):
        pattern = key
        first_glob = min(key.index(c) for c in _GLOB_CHARS if c in key)
        prefix = key[: key.rfind("/", 0, first_glob) + 1]
        recursive = True  # segments are matched below, so a glob lists everything under its fixed prefix
    else:
        prefix = key.rstrip("/") + "/" if key else ""
    client = s3_client(storage)
    with translate_s3_errors(spec, storage):
        if pattern is None and key and not key.endswith("/") and is_object(client, bucket, key):
            return [spec] if _has_ext(key, wanted) else []
        kwargs = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
        if not recursive:
            kwargs["Delimiter"] = "/"
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(**kwargs)
            for obj in page.get("Contents", [])
        ]
    # Skip folder markers and dotfiles, as for local folders.
    keys = [
        k
        for k in keys
        if not k.rsplit("/", 1)[-1].startswith(".") and not k.endswith("/") and _has_ext(k, wanted)
    ]
    if pattern is not None:
        keys = [k for k in keys if _match_segments(k, pattern)]
    return sorted(f"{scheme}://{bucket}/{k}" for k in keys)


def list_sizes(prefix: str, storage: StorageConfig | None = None) -> dict[str, int]:
    """Every object under the S3 ``prefix`` (a folder), by path relative to it, with its size in bytes."""
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    with translate_s3_errors(prefix, storage):
        pages = s3_client(storage).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        return {
            obj["Key"][len(key) :]: int(obj["Size"])
            for page in pages
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        }


def cache_root() -> Path:
    """Local copies of remote things (models, S3 run folders): ``$TGAN_CACHE_DIR``, else ``~/.cache/tgan-ray``."""
    return Path(os.environ.get("TGAN_CACHE_DIR", Path.home() / ".cache" / "tgan-ray"))


def _match_segments(key: str, pattern: str) -> bool:
    # Match folder by folder so '*' stops at '/', as a local glob does (fnmatch alone would cross folders).
    key_parts, pattern_parts = key.split("/"), pattern.split("/")
    return len(key_parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(k, p) for k, p in zip(key_parts, pattern_parts, strict=True)
    )


# ---------------------------------------------------------------------------------------------- early checks


def check_access(uri: str | os.PathLike, storage: StorageConfig | None = None) -> None:
    """Fail early, in seconds, if ``uri`` cannot be used: endpoint, credentials and bucket for S3.

    A local path passes if it exists or its nearest existing parent is a writable folder.

    Raises:
        StorageError: one line saying which of endpoint / credentials / bucket / folder is wrong.
    """
    uri = str(uri)
    if not is_s3(uri):
        if os.path.exists(uri):
            return
        parent = os.path.dirname(os.path.abspath(uri))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise StorageError(f"cannot create {uri}: {parent} is not a writable folder")
        return
    bucket, key = split_s3(uri)
    with translate_s3_errors(uri, storage):
        # A GET (not HEAD) so that S3 returns an error code in the body: NoSuchBucket vs InvalidAccessKeyId.
        s3_client(storage).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
