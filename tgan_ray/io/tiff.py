"""Masks and instance labels as ImageJ TIFFs that carry the pixel size, so Fiji and napari show nm.

    write_mask_tiffs("out/masks", "img_001", mask, labels, pixel_size_nm=0.21)
    # out/masks/img_001.tif          mask, uint8 0/255
    # out/masks/labels/img_001.tif   instance labels, uint16 (float32 above 65535 particles), 0 = background

Labels go to their own subfolder: a stem such as ``a_labels`` can never collide with the labels of ``a``.
"""

from __future__ import annotations

import io

import numpy as np

from tgan_ray.config import StorageConfig
from tgan_ray.io.storage import join, write_bytes

LABELS_FOLDER = "labels"
# ImageJ hyperstacks hold 8/16-bit integers or 32-bit floats only; float32 keeps integers exact up to 2**24.
_MAX_FLOAT32_LABEL = 2**24


def tiff_bytes(array: np.ndarray, pixel_size_nm: float | None) -> bytes:
    """Encode a 2-D array as an ImageJ TIFF; with a pixel size, its resolution tags say ``1/px`` per nm.

    Shape:
        array: (H, W), uint8, uint16 or float32.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"a TIFF mask must be HxW, got shape {array.shape}")
    import tifffile

    kwargs = {}
    if pixel_size_nm is not None:
        kwargs = {"resolution": (1.0 / pixel_size_nm, 1.0 / pixel_size_nm), "metadata": {"unit": "nm"}}
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, imagej=True, **kwargs)
    return buffer.getvalue()


def label_image(labels: np.ndarray) -> np.ndarray:
    """Labels in the narrowest type ImageJ opens: uint16, or float32 for more than 65535 particles."""
    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    if labels.min(initial=0) < 0:
        raise ValueError("instance labels must be >= 0")
    if top <= np.iinfo(np.uint16).max:
        return labels.astype(np.uint16)
    if top < _MAX_FLOAT32_LABEL:
        return labels.astype(np.float32)
    raise ValueError(f"{top} labels do not fit an ImageJ TIFF (at most {_MAX_FLOAT32_LABEL - 1})")


def write_mask_tiffs(
    masks_dir: str,
    stem: str,
    mask: np.ndarray,
    labels: np.ndarray,
    pixel_size_nm: float | None,
    storage: StorageConfig | None = None,
) -> tuple[str, str]:
    """Write ``<masks_dir>/<stem>.tif`` (mask, 0/255) and ``<masks_dir>/labels/<stem>.tif``, each atomically.

    Args:
        masks_dir: folder or ``s3://`` prefix of the mask PNGs.
        stem: the image's unique stem.
        mask: binary mask (non-zero = particle).
        labels: instance label map of the same shape, 0 = background.
        pixel_size_nm: nm per pixel, written as the ImageJ calibration; None: uncalibrated (pixels).

    Returns:
        URIs of the mask TIFF and the label TIFF.
    """
    mask, labels = np.asarray(mask), np.asarray(labels)
    if mask.shape != labels.shape:
        raise ValueError(f"labels shape {labels.shape} does not match mask shape {mask.shape} for {stem}")
    mask_uri = join(masks_dir, f"{stem}.tif")
    labels_uri = join(masks_dir, LABELS_FOLDER, f"{stem}.tif")
    write_bytes(mask_uri, tiff_bytes((mask != 0).astype(np.uint8) * 255, pixel_size_nm), storage)
    write_bytes(labels_uri, tiff_bytes(label_image(labels), pixel_size_nm), storage)
    return mask_uri, labels_uri
