"""Find and load an unlabelled stack of micrographs from a folder, a glob or an S3 prefix.

    uris = list_stack("s3://em-data/haadf_pt/", cfg.storage)
    images, skipped = load_stack(uris, cfg.storage, min_images=cfg.data.min_images)

Unreadable files are skipped with one warning that lists them; too few usable images is an error that says
how many there were and why the others failed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from tgan_ray.config import StorageConfig
from tgan_ray.io.decoders import SUPPORTED_EXTENSIONS, ImageReadError
from tgan_ray.io.readers import DEFAULT_MAX_PIXELS, EMImage, read_image
from tgan_ray.io.storage import StorageNotFoundError, is_s3, list_files

_SHOWN_FAILURES = 5  # failures named in a message; the rest are counted


class StackError(ValueError):
    """A stack that cannot be used: missing, empty, or with too few readable images."""


class SkippedImagesWarning(UserWarning):
    """Some images of a stack were unreadable and skipped."""


def list_stack(
    spec: str | os.PathLike, storage: StorageConfig | None = None, recursive: bool = False
) -> list[str]:
    """The EM image files of a stack, sorted.

    Args:
        spec: a folder, a glob (``/data/*.tif``), one file, or an ``s3://bucket/prefix``.
        storage: S3 endpoint and region.
        recursive: also look in subfolders / below the prefix.

    Returns:
        Paths or URIs with a supported extension (:data:`SUPPORTED_EXTENSIONS`).

    Raises:
        StackError: the local folder/file does not exist, or it holds no EM images.
    """
    spec = str(spec)
    try:
        files = list_files(spec, storage, recursive=recursive)
    except StorageNotFoundError:
        if is_s3(spec):
            raise  # a missing bucket: the storage message (with the endpoint) says more
        raise StackError(f"no such folder or file: {spec}") from None
    images = [f for f in files if f.lower().endswith(SUPPORTED_EXTENSIONS)]
    if not images:
        others = sorted({os.path.splitext(f)[1].lower() or "(none)" for f in files})
        hint = f" (found {len(files)} other file(s): {', '.join(others[:6])})" if files else ""
        raise StackError(f"no EM images ({', '.join(SUPPORTED_EXTENSIONS)}) in {spec}{hint}")
    return images


def _location(uris: list[str]) -> str:
    """The common folder or prefix of ``uris``, for messages."""
    if all(is_s3(u) for u in uris):
        prefix = os.path.commonprefix(uris)
        return prefix[: prefix.rfind("/") + 1] or prefix
    if not any(is_s3(u) for u in uris):
        try:
            return os.path.commonpath([os.path.dirname(os.path.abspath(u)) for u in uris])
        except ValueError:  # different drives on Windows
            pass
    return f"{len(uris)} given files"


def _describe(skipped: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{os.path.basename(uri)} ({reason})" for uri, reason in skipped[:_SHOWN_FAILURES])
    more = len(skipped) - _SHOWN_FAILURES
    return shown + (f" and {more} more" if more > 0 else "")


def load_stack(
    uris: Iterable[str | os.PathLike],
    storage: StorageConfig | None = None,
    min_images: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_workers: int = 4,
    source: str | None = None,
) -> tuple[list[EMImage], list[tuple[str, str]]]:
    """Read every image of a stack, skipping unreadable ones.

    Args:
        uris: image paths or URIs (e.g. from :func:`list_stack`).
        storage: S3 endpoint and region.
        min_images: fewest usable images (config ``data.min_images``).
        max_pixels: per-image decompression-bomb guard.
        max_workers: parallel reads (S3 latency, not CPU, is what this hides).
        source: the stack's name in messages; None: the files' common folder or prefix.

    Returns:
        (images in input order, [(uri, reason)] of the skipped files). A non-empty skipped list has also
        been reported with one :class:`SkippedImagesWarning`.

    Raises:
        StackError: fewer than ``min_images`` readable images; the message lists why the others failed.
        StorageError: S3 endpoint, credential or bucket problems.
    """
    uris = [str(u) for u in uris]
    if not uris:
        raise StackError("no image files given")
    where = source or _location(uris)

    def read_one(uri: str) -> EMImage | ImageReadError:
        try:
            return read_image(uri, storage, max_pixels=max_pixels)
        except ImageReadError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(uris)))) as pool:
        results = list(pool.map(read_one, uris))
    images = [r for r in results if isinstance(r, EMImage)]
    skipped = [(uri, r.reason) for uri, r in zip(uris, results, strict=True) if isinstance(r, ImageReadError)]
    if len(images) < min_images:
        usable = f"{len(images)} usable image{'' if len(images) == 1 else 's'}"
        detail = f"; unreadable: {_describe(skipped)}" if skipped else ""
        raise StackError(f"only {usable} in {where} (need {min_images}){detail}")
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} of {len(uris)} images in {where}: {_describe(skipped)}",
            SkippedImagesWarning,
            stacklevel=2,
        )
    return images, skipped


def read_stack(
    spec: str | os.PathLike,
    storage: StorageConfig | None = None,
    min_images: int = 2,
    recursive: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[EMImage], list[tuple[str, str]]]:
    """:func:`list_stack` then :func:`load_stack`, with messages that name ``spec``."""
    uris = list_stack(spec, storage, recursive=recursive)
    return load_stack(uris, storage, min_images=min_images, max_pixels=max_pixels, source=str(spec))
