"""The S3 client: endpoint, region and credentials, the cached boto3 / pyarrow clients, and S3 errors.

Credentials come only from the standard AWS chain (env, profile, instance role) and never appear in an error
message: :func:`translate_s3_errors` turns any botocore failure into one :class:`StorageError` line that says
what to fix (endpoint, credentials, bucket, permissions). :mod:`tgan_ray.io.storage` builds the file
operations on top of this.

    client = s3_client(cfg.storage)
    with translate_s3_errors("s3://em-data/a.tif", cfg.storage):
        client.head_object(Bucket="em-data", Key="a.tif")
"""

from __future__ import annotations

import contextlib
import functools
import os
from urllib.parse import urlparse

from tgan_ray.config import StorageConfig
from tgan_ray.io.uris import StorageError, StorageNotFoundError, split_s3
from tgan_ray.messages import one_line

# Short timeouts and two attempts: a wrong endpoint must fail in seconds, not after botocore's default minutes.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 2
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


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


def to_storage_error(exc: Exception, uri: str, storage: StorageConfig | None) -> StorageError:
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
def translate_s3_errors(uri: str, storage: StorageConfig | None):
    """Re-raise any botocore error inside the block as one StorageError line naming ``uri``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise to_storage_error(exc, uri, storage) from None


def is_not_found(exc: Exception) -> bool:
    """True if a botocore error is a 404 (``404``, ``NoSuchKey``, ``NotFound``): no such key or bucket."""
    return getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def is_object(client, bucket: str, key: str) -> bool:
    """True if ``key`` is an object in ``bucket``, False if not; any other client error is raised."""
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if is_not_found(exc):
            return False
        raise
