"""Read electron micrographs (PNG, JPEG, TIFF, DM3/DM4, EMD) as float32 intensities with their pixel size.

    img = read_image("s3://em-data/stack1/img_001.dm4", cfg.storage)
    img.data            # float32 HxW, raw intensities (counts), not normalised
    img.pixel_size_nm   # 0.5, from the file's calibration; None when the file has none
    x = cfg.data.normalize(img.data)

Decoding goes by the file's magic bytes first and its extension second, so a raw HTTP body (Serve) or a
mislabelled file still decodes. Every failure is an :class:`ImageReadError` whose one-line message names the file.

This module holds the image type, reading from a path or URI, intensity normalisation and PNG writing; each
format's decoder (and its pixel-size calibration) is in :mod:`tgan_ray.io.decoders`.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tgan_ray.config import StorageConfig
from tgan_ray.io.decoders import (
    SUPPORTED_EXTENSIONS,
    ImageReadError,
    UnsupportedFormatError,
    decode_pixels,
    detect_format,
    file_extension,
    luminance,
)
from tgan_ray.io.storage import StorageNotFoundError, is_s3, read_bytes, write_bytes
from tgan_ray.messages import one_line

_log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 2**28  # 268 Mpx: above any single EM frame (16k x 16k), below a decompression bomb


@dataclass
class EMImage:
    """One electron micrograph.

    Attributes:
        data: raw intensities (counts or grey levels), not normalised.
        pixel_size_nm: pixel width in nm from the file's calibration; None if the file has none.
        source: the path or URI it was read from.
        meta: ``format``, original ``dtype`` and ``shape``, ``frames``, ``notes`` and format-specific details.

    Shape:
        data: (H, W), float32.
    """

    data: np.ndarray
    pixel_size_nm: float | None
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def name(self) -> str:
        return os.path.basename(self.source.rstrip("/"))


# ---------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> EMImage:
    """Decode an image held in memory.

    Args:
        data: the file's bytes.
        name: file name or URI, used for the extension (when the bytes are not recognised) and in messages.
        max_pixels: refuse images with more pixels than this before decoding them (decompression bombs).

    Returns:
        :class:`EMImage` with float32 grey data; colour is converted to luminance, stacks give their first frame.

    Raises:
        UnsupportedFormatError: neither the bytes nor the extension are a supported format.
        ImageReadError: empty, corrupt, truncated, too large, or not a 2D image.
    """
    if not data:
        raise ImageReadError(name, "empty file")
    fmt = detect_format(data, name)
    if fmt is None:
        ext = file_extension(name) or "no extension"
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise UnsupportedFormatError(name, f"unsupported format ({ext}); supported: {supported}")
    try:
        array, pixel_size, meta = decode_pixels(fmt, data, name, max_pixels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(name, "not enough memory to decode it") from None
    except Exception as exc:  # any library error on a corrupt or truncated file becomes one line
        _log.debug("decoding %s failed", name, exc_info=True)
        reason = one_line(f"{type(exc).__name__}: {exc}", 160)
        raise ImageReadError(name, f"not a valid {fmt.upper()} file ({reason})") from None
    meta.setdefault("format", fmt)
    meta["dtype"] = str(array.dtype)
    meta["shape"] = tuple(int(s) for s in array.shape)
    array = _to_gray_2d(array, name, meta)
    return EMImage(data=array, pixel_size_nm=pixel_size, source=name, meta=meta)


def _to_gray_2d(array: np.ndarray, name: str, meta: dict) -> np.ndarray:
    if np.iscomplexobj(array):
        raise ImageReadError(name, "complex data (an FFT?) is not a micrograph")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = luminance(array)
        meta.setdefault("converted_from", "RGB")
    while array.ndim > 2:  # a volume inside one page: first slice
        meta.setdefault("notes", []).append(f"first of {array.shape[0]} slices")
        array = array[0]
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageReadError(name, f"not a 2D image (shape {tuple(array.shape)})")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_image(
    uri: str | os.PathLike, storage: StorageConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> EMImage:
    """Read a local or ``s3://`` image file (see :func:`decode_image`).

    Raises:
        ImageReadError: missing, a folder, corrupt, truncated, unsupported or too large; names the file.
        StorageError: S3 endpoint, credential or bucket problems (not the file's fault).
    """
    uri = str(uri)
    if not is_s3(uri) and os.path.isdir(uri):
        raise ImageReadError(uri, "is a folder, not an image file")
    try:
        raw = read_bytes(uri, storage)
    except StorageNotFoundError:
        raise ImageReadError(uri, "no such file") from None
    return decode_image(raw, uri, max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------- intensities


def normalize_intensity(img: EMImage | np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of the intensities to 0..1 and clip.

    Robust to hot pixels (percentiles, not min/max), to constant images (zeros, no NaN) and to NaN/inf
    pixels (set to 0). When the percentile range collapses (a few bright particles on a flat support),
    the full min..max range is used so the particles survive.

    Args:
        img: an :class:`EMImage` or an array.
        low: percentile mapped to 0.
        high: percentile mapped to 1.

    Returns:
        float32 array in [0, 1], same shape as the input.
    """
    data = img.data if isinstance(img, EMImage) else np.asarray(img)
    x = data.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    values = x[finite] if not finite.all() else x.ravel()
    if values.size == 0:
        return np.zeros(x.shape, np.float32)
    if values.size > 2**22:  # percentiles of a strided sample are as good and 10x faster on big frames
        values = values[:: values.size // 2**22 + 1]
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    out = np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    if not finite.all():
        out[~finite] = 0.0
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- writing


def _to_png_array(array: np.ndarray, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"cannot write {where}: PNG needs HxW or HxWx3/4, got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype in (np.uint8, np.uint16):
        if array.dtype == np.uint16 and array.ndim != 2:
            raise ValueError(f"cannot write {where}: 16-bit PNG must be grey (HxW)")
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"cannot write {where}: array has NaN or inf values")
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(
        f"cannot write {where}: dtype {array.dtype} (use uint8, uint16, bool or float in [0, 1])"
    )


def write_png(
    path_or_uri: str | os.PathLike, array: np.ndarray, storage: StorageConfig | None = None
) -> None:
    """Write a PNG atomically, locally or to S3.

    Args:
        path_or_uri: destination file or ``s3://`` URI.
        array: uint8 (as is), uint16 (16-bit grey), bool (0/255) or float in [0, 1] (scaled to 0..255).
        storage: S3 endpoint and region.

    Shape:
        array: (H, W) grey, or (H, W, 3|4) RGB(A).
    """
    from PIL import Image

    pixels = _to_png_array(array, str(path_or_uri))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_bytes(path_or_uri, buffer.getvalue(), storage)


def write_mask_png(path: str | os.PathLike, mask: np.ndarray, storage: StorageConfig | None = None) -> None:
    """Write a binary mask as an 8-bit PNG: 255 where ``mask`` is true (non-zero), 0 elsewhere.

    Shape:
        mask: (H, W).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"cannot write {path}: a mask must be HxW, got shape {mask.shape}")
    write_png(path, (mask != 0).astype(np.uint8) * 255, storage)


def read_mask_png(path_or_uri: str | os.PathLike, storage: StorageConfig | None = None) -> np.ndarray:
    """The mask :func:`write_mask_png` wrote, locally or from S3: True where the PNG is over 127.

    A pseudo-label's unsure value (127, ``masks/pseudo.py``) reads as background.

    Shape:
        returns: (H, W) bool.
    """
    from PIL import Image

    with Image.open(io.BytesIO(read_bytes(str(path_or_uri), storage))) as png:
        return np.asarray(png) > 127
