"""The watch loop's HTTP side: the segmentation endpoint's URL, one frame's upload, and what a failure means.

:func:`post_frame` sends one frame and sorts every failure into :class:`RetryLater` (the endpoint is down or
overloaded: connection errors, timeouts, HTTP 408, 425, 429, 500, 502, 503, 504; it carries the server's
``Retry-After``, read by :func:`retry_after_s`) or :class:`FrameRejected` (any other error status, or a reply that is
not a segmentation result: never retried). The backoff between retries is the poll loop's, in :mod:`tgan_ray.watch`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FrameRejected", "RetryLater", "post_frame", "retry_after_s", "segment_url"]

_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class RetryLater(Exception):
    """The endpoint could not take the frame now; try again later (``after_s``: the server's Retry-After)."""

    def __init__(self, reason: str, after_s: float | None = None):
        super().__init__(reason)
        self.after_s = after_s


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header (RFC 9110: delay-seconds or an HTTP date) as seconds from now; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class FrameRejected(Exception):
    """The endpoint refused the frame for good."""


def segment_url(endpoint: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1/segment``; a URL with a path is used as given."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {endpoint!r} is not an http(s) URL, e.g. http://127.0.0.1:8000")
    path = parts.path if parts.path not in ("", "/") else "/v1/segment"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def post_frame(
    client, url: str, path: Path, rel: str, data: bytes, pixel_size_nm: float | None
) -> dict[str, Any]:
    """POST one frame's bytes to ``url`` with an ``httpx`` client; its segmentation result (the JSON body).

    Raises:
        RetryLater: the endpoint could not take it now.
        FrameRejected: the endpoint refused it for good.
    """
    import httpx

    form = {"pixel_size_nm": str(pixel_size_nm)} if pixel_size_nm else None
    try:
        response = client.post(url, files={"file": (path.name, data)}, data=form)
    except httpx.TransportError as exc:  # refused, reset, timeout, DNS: the endpoint is not there (yet)
        raise RetryLater(f"{type(exc).__name__}: {exc}") from None
    if response.status_code in _RETRY_STATUSES:
        raise RetryLater(f"HTTP {response.status_code}", retry_after_s(response.headers.get("retry-after")))
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text[:200]}
    if response.status_code >= 400:
        raise FrameRejected(
            f"HTTP {response.status_code}: {body.get('detail', '') if isinstance(body, dict) else body}"
        )
    if not isinstance(body, dict) or "particles" not in body:
        raise FrameRejected(f"unexpected response for {rel}: not a segmentation result")
    return body
