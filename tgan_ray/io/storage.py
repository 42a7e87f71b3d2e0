"""One storage layer for local paths and ``s3://`` URIs (AWS S3, MinIO, Ceph, moto).

Every function takes a plain path or an ``s3://bucket/key`` URI and an optional :class:`StorageConfig`
(endpoint, region). Credentials come only from the standard AWS chain (env, profile, instance role) and never
appear in an error message.

    check_access("s3://em-data/stack1/", cfg.storage)   # fail in seconds, with one clear line
    for uri in list_files("s3://em-data/stack1/", cfg.storage, exts=["tif", "dm4"]):
        raw = read_bytes(uri, cfg.storage)
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from tgan_ray.config import StorageConfig
from tgan_ray.messages import one_line

# Short timeouts and two attempts: a wrong endpoint must fail in seconds, not after botocore's default minutes.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 2
_GLOB_CHARS = "*?["
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


class StorageError(RuntimeError):
    """A storage operation failed; the one-line message names the URI (never the credentials)."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist."""


# ---------------------------------------------------------------------------------------------- URIs


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


# ---------------------------------------------------------------------------------------------- clients


def resolve_endpoint(storage: StorageConfig | None = None) -> str | None:
    """The S3 endpoint: config, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else None (AWS itself)."""
    endpoint = (storage.s3_endpoint_url if storage else None) or (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    )
    if endpoint and "://" not in endpoint:
        raise StorageError(
            f"S3 endpoint {endpoint!r} has no scheme: write http://{endpoint} or https://{endpoint}"
        )
    return endpoint


def resolve_region(storage: StorageConfig | None = None) -> str:
    """The S3 region: config, else ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, else us-east-1."""
    return (
        (storage.s3_region if storage else None)
        or os.environ.get("AWS_DEFAULT_REGION")
        or os.environ.get("AWS_REGION")
        or "us-east-1"
    )


def _credential_env() -> tuple[str | None, ...]:
    # Part of the client cache key, so a changed credential env (tests, key rotation) gets a fresh client.
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return tuple(os.environ.get(n) for n in names)


@functools.lru_cache(maxsize=16)
def _cached_client(endpoint: str | None, region: str, _creds: tuple):
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        # Custom endpoints (MinIO, Ceph, moto) rarely have wildcard DNS for virtual-hosted bucket names.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    # A fresh Session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client(storage: StorageConfig | None = None):
    """A boto3 S3 client for the configured endpoint and region (cached, thread-safe).

    Args:
        storage: endpoint and region; None uses the environment (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``).

    Returns:
        ``botocore`` S3 client with short connect timeouts and two attempts.
    """
    return _cached_client(resolve_endpoint(storage), resolve_region(storage), _credential_env())


def pyarrow_filesystem(storage: StorageConfig | None = None):
    """A ``pyarrow.fs.S3FileSystem`` on the same endpoint, region and credentials as :func:`s3_client`.

    Pass it as Ray Train's ``RunConfig(storage_filesystem=...)`` or to Ray Data readers (``filesystem=``),
    with paths written as ``bucket/key`` (no ``s3://``).
    """
    from pyarrow import fs

    kwargs: dict = {
        "region": resolve_region(storage),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    endpoint = resolve_endpoint(storage)
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    # boto3 resolves the whole credential chain (env, profile, SSO); pyarrow's own chain differs in places.
    import boto3

    creds = boto3.session.Session().get_credentials()
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    return fs.S3FileSystem(**kwargs)


def _endpoint_label(storage: StorageConfig | None) -> str:
    try:
        return resolve_endpoint(storage) or "AWS default endpoint"
    except StorageError:
        return "invalid endpoint"


def _s3_error(exc: Exception, uri: str, storage: StorageConfig | None) -> StorageError:
    """Turn a botocore exception into one StorageError line that says what to fix."""
    from botocore import exceptions as bx

    endpoint = _endpoint_label(storage)
    if isinstance(exc, bx.NoCredentialsError):
        return StorageError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile"
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        reason = "timed out" if isinstance(exc, bx.ConnectTimeoutError) else _connection_reason(exc)
        return StorageError(f"cannot reach S3 endpoint {endpoint}: {reason}")
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "")) or "unknown"
        bucket = split_s3(uri)[0]
        if code == "NoSuchBucket":
            return StorageNotFoundError(f"S3 bucket '{bucket}' does not exist (endpoint {endpoint})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageNotFoundError(f"no such S3 object: {uri}")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"S3 credentials rejected for {uri}: {code}")
        if code in ("AccessDenied", "403", "Forbidden"):
            return StorageError(f"S3 access denied for {uri}: {code} (check the IAM / bucket policy)")
        message = exc.response.get("Error", {}).get("Message", "")
        return StorageError(one_line(f"S3 error on {uri} (endpoint {endpoint}): {code} {message}", 200))
    if isinstance(exc, bx.BotoCoreError):
        return StorageError(one_line(f"S3 error on {uri} (endpoint {endpoint}): {exc}", 200))
    return StorageError(one_line(f"S3 error on {uri}: {type(exc).__name__}: {exc}", 200))


def _connection_reason(exc: Exception) -> str:
    text = str(exc).lower() + " " + str(getattr(exc, "kwargs", {}).get("error", "")).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or "resolve" in text:
        return "host name not found"
    if "timed out" in text or "timeout" in text:
        return "timed out"
    return "connection failed"


@contextlib.contextmanager
def _s3_errors(uri: str, storage: StorageConfig | None):
    """Re-raise any botocore error inside the block as one StorageError line naming ``uri``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(exc, uri, storage) from None


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def _is_object(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _is_missing(exc):
            return False
        raise


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
    with _s3_errors(uri, storage):
        return s3_client(storage).get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` atomically: readers see the old file or the new one, never half of it.

    Local files go to a temporary name in the same folder, then ``os.replace``; S3 ``put_object`` is atomic.
    """
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri, storage):
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
    with _s3_errors(uri, storage):
        if not key:  # the bucket itself, which may be empty
            try:
                client.head_bucket(Bucket=bucket)
                return True
            except Exception as exc:
                if _is_missing(exc):
                    return False
                raise
        if not key.endswith("/") and _is_object(client, bucket, key):
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
        with _s3_errors(uri, storage):
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
        with _s3_errors(uri, storage):
            s3_client(storage).upload_file(local_path, bucket, key)
    except S3UploadFailedError as exc:  # boto3's transfer manager wraps the client error
        cause = exc.__cause__ or exc.__context__
        raise (_s3_error(cause, uri, storage) if cause else StorageError(one_line(exc, 200))) from None
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
    with _s3_errors(spec, storage):
        if pattern is None and key and not key.endswith("/") and _is_object(client, bucket, key):
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
    with _s3_errors(prefix, storage):
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
    with _s3_errors(uri, storage):
        # A GET (not HEAD) so that S3 returns an error code in the body: NoSuchBucket vs InvalidAccessKeyId.
        s3_client(storage).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
