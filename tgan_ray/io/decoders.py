"""Per-format decoding of EM image bytes into (array, pixel size in nm, metadata), and the errors it raises.

PNG and JPEG go through Pillow, TIFF through tifffile (pixel size from FEI, ImageJ or resolution-tag
calibration), DM3/DM4 and EMD through rosettasciio (pixel size from the axes calibration). The format comes
from the magic bytes first and the extension second. :func:`tgan_ray.io.readers.decode_image` is the entry
point: it wraps library errors into one :class:`ImageReadError` line and makes the result a float32 2-D image.

    fmt = detect_format(raw, "img_001.dm4")                        # "dm4"
    array, pixel_size_nm, meta = decode_pixels(fmt, raw, "img_001.dm4", max_pixels=2**28)
"""

from __future__ import annotations

import io
import os
import tempfile
import unicodedata
from typing import Any

import numpy as np

from tgan_ray.messages import one_line

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dm3", ".dm4", ".emd")
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


# ---------------------------------------------------------------------------------------------- decoding


def file_extension(name: str) -> str:
    """Lower-case extension of a file name or URL, ignoring any ``?query``: ``"a/b.TIF?x=1"`` -> ``".tif"``."""
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


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey float32 intensities of an RGB(A) array; alpha is ignored.

    Shape:
        rgb: (..., 3|4); returns (...).
    """
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
        array = luminance(np.stack([array["R"], array["G"], array["B"]], axis=-1))
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


def detect_format(data: bytes, name: str) -> str | None:
    """The format key (``"png"``, ``"tiff"``, ``"dm4"``, ...) from the magic bytes, else from ``name``'s extension.

    Returns:
        None when neither the bytes nor the extension are a supported format.
    """
    return _sniff(data) or _FORMAT_BY_EXT.get(file_extension(name))


def decode_pixels(fmt: str, data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, float | None, dict]:
    """Decode ``data`` with the decoder for ``fmt`` (a :func:`detect_format` key).

    Returns:
        (array as the file holds it, pixel size in nm or None, metadata dict).

    Raises:
        ImageReadError: too large, no 2D image, or a missing optional package; the library's own exception
            on a corrupt or truncated file (:func:`tgan_ray.io.readers.decode_image` turns it into one line).
    """
    return _DECODERS[fmt](data, name, max_pixels)
