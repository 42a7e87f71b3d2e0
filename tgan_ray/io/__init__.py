"""EM image I/O (PNG, JPEG, TIFF, DM3/DM4, EMD with pixel size) and one storage layer for local and s3://."""

from tgan_ray.io.decoders import SUPPORTED_EXTENSIONS, ImageReadError, UnsupportedFormatError
from tgan_ray.io.readers import (
    DEFAULT_MAX_PIXELS,
    EMImage,
    decode_image,
    normalize_intensity,
    read_image,
    read_mask_png,
    write_mask_png,
    write_png,
)
from tgan_ray.io.s3 import pyarrow_filesystem, resolve_endpoint, resolve_region, s3_client
from tgan_ray.io.stack import SkippedImagesWarning, StackError, list_stack, load_stack, read_stack
from tgan_ray.io.storage import (
    check_access,
    download_to,
    exists,
    list_files,
    read_bytes,
    upload_file,
    write_bytes,
)
from tgan_ray.io.uris import StorageError, StorageNotFoundError, is_s3, join, split_s3

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_EXTENSIONS",
    "EMImage",
    "ImageReadError",
    "SkippedImagesWarning",
    "StackError",
    "StorageError",
    "StorageNotFoundError",
    "UnsupportedFormatError",
    "check_access",
    "decode_image",
    "download_to",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "list_stack",
    "load_stack",
    "normalize_intensity",
    "pyarrow_filesystem",
    "read_bytes",
    "read_image",
    "read_stack",
    "resolve_endpoint",
    "resolve_region",
    "s3_client",
    "split_s3",
    "upload_file",
    "write_bytes",
    "read_mask_png",
    "write_mask_png",
    "write_png",
]
