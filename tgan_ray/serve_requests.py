"""Request plumbing of the segmentation endpoint: schemas, one-line JSON errors, upload limits, the deadline.

:class:`UploadGuard` is ASGI middleware on the service's FastAPI app. It runs in the replica before FastAPI parses
the body (multipart uploads are parsed by Starlette with python-multipart into an ``UploadFile``), so:

- an upload over ``serve.max_upload_bytes`` gets 413 without being read (Content-Length) or as soon as the count
  of arriving bytes passes the limit (chunked uploads);
- a raw body (``curl --data-binary``, which labels it ``application/x-www-form-urlencoded``) is never parsed as a
  form: only ``multipart/form-data`` is; anything else reaches the route as the image itself;
- a request that has not answered within ``serve.request_timeout_s`` is cancelled and gets 504 with a JSON
  detail and ``Retry-After``. The forward pass already running in its thread finishes; the replica lives on.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ErrorBody",
    "ModelInfo",
    "RequestError",
    "SegmentResult",
    "UploadGuard",
    "bad_parameters",
    "error_response",
    "http_error",
    "json_records",
    "mask_png",
    "safe_name",
]


class RequestError(Exception):
    """A bad request: ``status`` is the HTTP status, the message one line for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": " ".join(str(reason).split())[:300]}, status_code=status, headers=headers)


def safe_name(name: str | None) -> str:
    """A display name for messages and the table; only its extension ever steers decoding."""
    base = os.path.basename(str(name or "").replace("\\", "/"))
    base = "".join(c for c in base if c.isprintable())[:120]
    return base or "upload"


def json_records(df) -> list[dict[str, Any]]:
    # pandas' own writer turns NaN into null and numpy scalars into JSON numbers in one C pass.
    return json.loads(df.to_json(orient="records"))


def mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ModelInfo(BaseModel):
    name: str
    version: str
    uri: str
    run_id: str | None = None
    training_run: str | None = None
    arch: str
    tile_size: int
    resize_mode: str
    device: str
    meta: dict[str, Any] = {}


class SegmentResult(BaseModel):
    image: str
    shape: list[int]
    pixel_size_nm: float | None
    pixel_size_from: str
    particles: list[dict[str, Any]]
    summary: dict[str, Any]
    model: dict[str, str]
    timing_ms: dict[str, float]
    batch_size: int


class ErrorBody(BaseModel):
    detail: str


async def bad_parameters(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI answers 422 with a nested list; clients here get 400 and one line naming the parameter.
    first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body")) or "request"
    return error_response(400, f"{where}: {first.get('msg', 'invalid')}")


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # E.g. a malformed multipart body: FastAPI's 400 names no cause; add the parser's one line.
    detail, cause = str(exc.detail), exc.__cause__
    if cause is not None and str(cause):
        detail = f"{detail}: {cause}"
    if exc.status_code == 400 and "multipart" not in detail.lower():
        detail = f"malformed upload: {detail}"
    return error_response(exc.status_code, detail, exc.headers)


def _is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


class UploadGuard:
    """Size limit, raw-body routing and deadline for POSTs to the paths ending in ``path_suffix``.

    Args:
        app: the ASGI app.
        limits: returns ``(max_upload_bytes, request_timeout_s, retry_after_s)``; called per request, so the
            values can come from the replica's config, which exists only once the replica has started.
        path_suffix: the guarded route (other routes, e.g. health checks, pass through untouched).
    """

    def __init__(
        self, app: ASGIApp, limits: Callable[[], tuple[int, float, float]], path_suffix: str = "/segment"
    ):
        self.app = app
        self.limits = limits
        self.path_suffix = path_suffix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").endswith(self.path_suffix):
            return await self.app(scope, receive, send)
        limit, deadline, retry_after = self.limits()
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await error_response(400, f"bad Content-Length header {declared[:40]!r}")(
                    scope, receive, send
                )
            if int(declared) > limit:
                reason = f"upload of {int(declared)} bytes exceeds serve.max_upload_bytes={limit}"
                return await error_response(413, reason)(scope, receive, send)
        if not _is_multipart(headers.get("content-type", "")):
            # Only multipart/form-data is a form here; any other body is the image, whatever its label says.
            raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*raw, (b"content-type", b"application/octet-stream")]}

        received = 0
        too_large = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # chunked uploads carry no Content-Length: count what arrives
                    too_large = True
                    raise RequestError(413, f"upload exceeds serve.max_upload_bytes={limit}")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:  # whatever the parser made of the cut-off body, the answer is 413 (sent below)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, counted_receive, guarded_send), deadline)
        except asyncio.TimeoutError:
            if not started:
                reason = (
                    f"request not answered within serve.request_timeout_s={deadline:g} s (server busy, or a "
                    "frame too large for the deadline); retry later"
                )
                retry = {"Retry-After": str(math.ceil(retry_after))}
                await error_response(504, reason, retry)(scope, receive, send)
            return
        except RequestError:  # raised by counted_receive where nothing upstream turned it into a response
            if not too_large:
                raise
        if too_large and not started:
            await error_response(413, f"upload exceeds serve.max_upload_bytes={limit}")(scope, receive, send)
