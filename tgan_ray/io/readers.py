"""Read electron micrographs (PNG, JPEG, TIFF, DM3/DM4, EMD) as float32 intensities with their pixel size.

    img = read_image("s3://em-data/stack1/img_001.dm4", cfg.storage)
    img.data            # float32 HxW, raw intensities (counts), not normalised
    img.pixel_size_nm   # 0.5, from the file's calibration; None when the file has none
    x = cfg.data.normalize(img.data)

Decoding goes by the file's magic bytes first and its extension second, so a raw HTTP body (Serve) or a
mislabelled file still decodes. Every failure is an :class:`ImageReadError` whose one-line message names the file.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tgan_ray.config import StorageConfig
from tgan_ray.io.storage import StorageNotFoundError, is_s3, read_bytes, write_bytes
from tgan_ray.messages import one_line

_log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dm3", ".dm4", ".emd")
DEFAULT_MAX_PIXELS = 2**28  # 268 Mpx: above any single EM frame (16k x 16k), below a decompression bomb

_FORMAT_BY_EXT = {ext: ext[1:] for ext in SUPPORTED_EXTENSIONS} | {".jpg": "jpeg", ".tif": "tiff"}
_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x89HDF\r\n\x1a\n", "emd"),  # EMD (Velox, NCEM) is HDF5
    (b"\x00\x00\x00\x03", "dm3"),  # DM header: big-endian version number
    (b"\x00\x00\x00\x04", "dm4"),
]
# Length units -> nm. Keys are NFKC-normalised and lower-cased (NFKC folds the micro sign into Greek mu
# and the angstrom sign into A-ring).
_NM_PER_UNIT = {
    **dict.fromkeys(("nm", "nanometer", "nanometers"), 1.0),
    # "\\u00b5m": ImageJ writes the micro sign as this literal escape
    **dict.fromkeys(("um", "\u03bcm", "\\u00b5m", "micron", "microns", "micrometer"), 1e3),
    **dict.fromkeys(("a", "\u00e5", "angstrom", "angstroms"), 0.1),
    **{"pm": 1e-3, "mm": 1e6, "m": 1e9},
}
# TIFF ResolutionUnit -> nm per unit (4, 5 are tifffile's non-standard MILLIMETER / MICROMETER).
_NM_PER_RESUNIT = {2: 2.54e7, 3: 1e7, 4: 1e6, 5: 1e3}
# A TEM/STEM pixel is never 10 um wide; a larger value comes from a print DPI (72, 300 dpi), not a calibration.
_MAX_PLAUSIBLE_PIXEL_NM = 1e4


class ImageReadError(ValueError):
    """A file that cannot be read as an image. ``source`` is the file, ``reason`` the short cause."""

    def __init__(self, source: str, reason: str = ""):
        super().__init__(f"cannot read image {source}: {reason}" if reason else source)
        self.source = source
        self.reason = reason or source


class UnsupportedFormatError(ImageReadError):
    """A file whose format is none of :data:`SUPPORTED_EXTENSIONS`."""


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


def _extension(name: str) -> str:
    return os.path.splitext(name.split("?", 1)[0])[1].lower()


def _sniff(data: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def _check_pixels(n_pixels: int, shape: tuple, name: str, max_pixels: int) -> None:
    if n_pixels > max_pixels:
        dims = "x".join(str(int(s)) for s in shape)
        raise ImageReadError(name, f"image too large: {dims} = {n_pixels} px exceeds max_pixels={max_pixels}")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601-2 luma, the weights Pillow's convert("L") uses, so colour PNG and colour TIFF agree.
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _length_to_nm(scale: float, units: str) -> tuple[float | None, str | None]:
    """Pixel size in nm from a calibration ``scale`` in ``units``; (None, note) when it is not a length."""
    unit = unicodedata.normalize("NFKC", str(units or "")).strip().lower()
    if unit.startswith("1/") or unit.endswith(("^-1", "-1", "\u207b\u00b9")):
        return None, f"reciprocal-space calibration ({units}): diffraction pattern, no real-space pixel size"
    if unit not in _NM_PER_UNIT:
        return None, f"calibration unit {units!r} is not a length" if unit else None
    if not np.isfinite(scale) or scale <= 0:
        return None, f"invalid calibration scale {scale}"
    return float(scale) * _NM_PER_UNIT[unit], None


def _decode_pillow(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, float | None, dict]:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"image too large ({one_line(exc, 160)})") from None
    with img:
        w, h = img.size
        _check_pixels(w * h, (h, w), name, max_pixels)
        meta: dict[str, Any] = {"format": (img.format or "").lower(), "mode": img.mode}
        if getattr(img, "n_frames", 1) > 1:
            meta["frames"] = img.n_frames
            meta.setdefault("notes", []).append(f"first of {img.n_frames} frames")
        img.load()
        if img.mode in ("L", "I", "F") or img.mode.startswith("I;16"):
            array = np.asarray(img)
        else:  # RGB(A), palette, 1-bit, LA, CMYK: grey luminance
            meta["converted_from"] = img.mode
            array = np.asarray(img.convert("L"))
    # PNG pHYs / JPEG DPI describe printing, not the microscope, so they are not a pixel size.
    return array, None, meta


def _decode_tiff(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, float | None, dict]:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        n_pixels = int(np.prod(page.shape))
        _check_pixels(n_pixels, page.shape, name, max_pixels)
        n_pages = len(tif.pages)
        meta: dict[str, Any] = {"format": "tiff", "page_shape": tuple(page.shape), "axes": page.axes}
        if n_pages > 1:
            meta["frames"] = n_pages
            meta.setdefault("notes", []).append(f"first of {n_pages} pages")
        array = page.asarray()
        if "S" in page.axes and array.ndim == len(page.axes):  # samples (RGB) last
            array = np.moveaxis(array, page.axes.index("S"), -1)
            if array.shape[-1] not in (3, 4):  # grey + alpha or extra channels: the first sample
                array = array[..., 0]
        pixel_size = _tiff_pixel_size(tif, page, meta)
    return array, pixel_size, meta


def _tiff_pixel_size(tif, page, meta: dict) -> float | None:
    """Pixel size from FEI/Thermo metadata, else ImageJ 'unit', else the XResolution/ResolutionUnit tags."""
    fei = tif.fei_metadata if tif.is_fei else None
    if fei:
        width_m = (fei.get("Scan") or {}).get("PixelWidth") or (fei.get("EScan") or {}).get("PixelWidth")
        if width_m:
            meta["pixel_size_from"] = "FEI metadata"
            return float(width_m) * 1e9
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num or not den:
        return None
    pixels_per_unit = num / den
    imagej = tif.imagej_metadata or {}
    if imagej.get("unit"):
        size, note = _length_to_nm(1.0 / pixels_per_unit, imagej["unit"])
        if note:
            meta.setdefault("notes", []).append(note)
        if size is not None:
            meta["pixel_size_from"] = "ImageJ unit"
        return size
    resunit_tag = page.tags.get("ResolutionUnit")
    resunit = int(resunit_tag.value) if resunit_tag is not None else 2  # TIFF default: inch
    if resunit not in _NM_PER_RESUNIT:
        return None
    size = _NM_PER_RESUNIT[resunit] / pixels_per_unit
    if size > _MAX_PLAUSIBLE_PIXEL_NM:
        meta.setdefault("notes", []).append(
            f"resolution tag ({pixels_per_unit:g}/unit) is a print DPI, ignored"
        )
        return None
    meta["pixel_size_from"] = "TIFF resolution tags"
    return size


def _decode_rsciio(
    data: bytes, name: str, max_pixels: int, fmt: str
) -> tuple[np.ndarray, float | None, dict]:
    """DM3/DM4 (Gatan) and EMD (Velox, NCEM) through rosettasciio, which reads only from a file path."""
    try:
        if fmt == "emd":
            from rsciio.emd import file_reader
        else:
            from rsciio.digitalmicrograph import file_reader
    except ImportError as exc:
        missing = getattr(exc, "name", None) or "a dependency"
        raise ImageReadError(
            name, f".{fmt} files need the '{missing}' package (pip install {missing})"
        ) from None
    with tempfile.TemporaryDirectory(prefix="tgan-read-") as tmp:
        path = os.path.join(tmp, f"image.{fmt}")
        with open(path, "wb") as f:
            f.write(data)
        kwargs = {"select_type": "image"} if fmt == "emd" else {}
        try:
            # lazy: only the first frame of a stack / 4D-STEM file is read, and its size is checked first.
            signals = file_reader(path, lazy=True, **kwargs)
        except ValueError:  # e.g. rsciio cannot read RGB DM images lazily
            signals = file_reader(path, lazy=False, **kwargs)
        return _pick_image_signal(signals, name, max_pixels, fmt)


def _pick_image_signal(signals: list[dict], name: str, max_pixels: int, fmt: str):
    images = [s for s in signals if sum(not ax.get("navigate", False) for ax in s["axes"]) == 2]
    if not images:
        kinds = ", ".join(f"{len(s['axes'])}D" for s in signals) or "none"
        raise ImageReadError(name, f"no 2D image in the {fmt.upper()} file (signals: {kinds})")
    signal = images[0]
    axes = sorted(signal["axes"], key=lambda ax: ax.get("index_in_array", 0))
    frames = int(np.prod([ax["size"] for ax in axes if ax.get("navigate", False)] or [1]))
    index = tuple(0 if ax.get("navigate", False) else slice(None) for ax in axes)
    signal_axes = [ax for ax in axes if not ax.get("navigate", False)]
    shape = tuple(int(ax["size"]) for ax in signal_axes)
    _check_pixels(int(np.prod(shape)), shape, name, max_pixels)
    array = np.asarray(signal["data"][index])
    meta: dict[str, Any] = {
        "format": fmt,
        "title": str(signal.get("metadata", {}).get("General", {}).get("title", "")),
        "signal_type": str(signal.get("metadata", {}).get("Signal", {}).get("signal_type", "")),
        "units": [str(ax.get("units", "")) for ax in signal_axes],
        "scales": [float(ax.get("scale", 1.0)) for ax in signal_axes],
    }
    if len(signals) > 1:
        meta["signals"] = len(signals)
        meta.setdefault("notes", []).append(f"first 2D image of {len(signals)} signals")
    if frames > 1:
        meta["frames"] = frames
        meta.setdefault("notes", []).append(f"first of {frames} frames")
    if array.dtype.names and {"R", "G", "B"} <= set(array.dtype.names):  # DM RGBA images
        array = _luminance(np.stack([array["R"], array["G"], array["B"]], axis=-1))
        meta["converted_from"] = "RGBA"
    y_axis, x_axis = signal_axes
    pixel_size, note = _length_to_nm(float(x_axis.get("scale", 1.0)), x_axis.get("units", ""))
    if note:
        meta.setdefault("notes", []).append(note)
    if pixel_size is not None:
        y_size, _ = _length_to_nm(float(y_axis.get("scale", 1.0)), y_axis.get("units", ""))
        if y_size is not None and not np.isclose(y_size, pixel_size, rtol=1e-3):
            meta["pixel_size_y_nm"] = y_size
            meta.setdefault("notes", []).append("non-square pixels: pixel_size_nm is the x size")
        meta["pixel_size_from"] = f"{fmt.upper()} axes calibration"
    return array, pixel_size, meta


_DECODERS = {
    "png": _decode_pillow,
    "jpeg": _decode_pillow,
    "tiff": _decode_tiff,
    "dm3": lambda d, n, m: _decode_rsciio(d, n, m, "dm3"),
    "dm4": lambda d, n, m: _decode_rsciio(d, n, m, "dm4"),
    "emd": lambda d, n, m: _decode_rsciio(d, n, m, "emd"),
}


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
    fmt = _sniff(data) or _FORMAT_BY_EXT.get(_extension(name))
    if fmt is None:
        ext = _extension(name) or "no extension"
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise UnsupportedFormatError(name, f"unsupported format ({ext}); supported: {supported}")
    try:
        array, pixel_size, meta = _DECODERS[fmt](data, name, max_pixels)
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
        array = _luminance(array)
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
