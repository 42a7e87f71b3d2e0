"""Storage errors and the path / ``s3://`` URI helpers that every storage module builds on.

This holds no I/O: :mod:`tgan_ray.io.s3` (the S3 client) and :mod:`tgan_ray.io.storage` (file operations) both
import from here, and :mod:`tgan_ray.io.storage` passes these names on to its callers.

    is_s3("s3://em-data/stack1/")             # True
    split_s3("s3://em-data/stack1/a.tif")     # ("em-data", "stack1/a.tif")
    join("s3://em-data/runs", "r1", "masks")  # "s3://em-data/runs/r1/masks"
"""

from __future__ import annotations

import os


class StorageError(RuntimeError):
    """A storage operation failed; the one-line message names the URI (never the credentials)."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist."""


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` URIs (also ``s3a://``/``s3n://`` as Spark writes them)."""
    return str(uri).lower().startswith(("s3://", "s3a://", "s3n://"))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b.tif`` -> ``("bucket", "a/b.tif")``; the key may be empty.

    Raises:
        StorageError: not an s3:// URI or no bucket name.
    """
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    rest = str(uri).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"S3 URI has no bucket name: {uri}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts under a local folder or an S3 prefix, with exactly one ``/`` between parts."""
    base = str(base)
    if not is_s3(base):
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p and p.strip("/")]
    return "/".join(pieces)
