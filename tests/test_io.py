"""EM image decoding, pixel sizes, intensity normalisation, PNG writing and stacks, on files written here."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from tgan_ray.io import (
    EMImage,
    ImageReadError,
    SkippedImagesWarning,
    StackError,
    UnsupportedFormatError,
    decode_image,
    list_stack,
    load_stack,
    normalize_intensity,
    read_image,
    read_mask_png,
    read_stack,
    write_mask_png,
    write_png,
)

RNG = np.random.default_rng(0)


def _tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- DM3 / DM4 writer
# rosettasciio reads DM3/DM4 but cannot write them (specifications.yaml: writes: False), so tests write the
# Gatan tag format themselves: header, then a tree of tag groups (id 20) and data tags (id 21, '%%%%' + type
# info + little-endian payload). DM4 widens every length to 8 bytes and prefixes groups/tags with their size.

_TAG_TYPE = {"<i2": 2, "<i4": 3, "<u2": 4, "<u4": 5, "<f4": 6, "<f8": 7, "|u1": 8, "|i1": 10}
_DM_DATA_TYPE = {"<i2": 1, "<f4": 2, "|u1": 6, "<i4": 7, "<u2": 10, "<u4": 11, "<f8": 12}


def _dm_bytes(image: np.ndarray, scale: float, units: str, version: int = 4) -> bytes:
    """A minimal DigitalMicrograph file holding ``image`` with calibration ``scale`` ``units`` per pixel.

    Shape:
        image: (H, W) or (N, H, W); DM stores dimensions x first.
    """
    length = ">I" if version == 3 else ">Q"

    def n(value: int) -> bytes:
        return struct.pack(length, value)

    def group(name: str, tags: list[bytes]) -> bytes:
        body = b"".join(tags)
        head = b"\x00\x01" + (n(len(body) + 2 + 8) if version == 4 else b"") + n(len(tags))
        return bytes([20]) + struct.pack(">H", len(name)) + name.encode() + head + body

    def data_tag(name: str, info: list[int], payload: bytes) -> bytes:
        content = b"%%%%" + n(len(info)) + b"".join(n(i) for i in info) + payload
        size = n(len(content)) if version == 4 else b""
        return bytes([21]) + struct.pack(">H", len(name)) + name.encode() + size + content

    def scalar(name: str, value, dtype: str) -> bytes:
        return data_tag(name, [_TAG_TYPE[dtype]], np.asarray(value, dtype).tobytes())

    def text(name: str, value: str) -> bytes:  # DM strings: arrays of UTF-16 code units
        codes = np.frombuffer(value.encode("utf-16-le"), "<u2")
        return data_tag(name, [20, 4, len(codes)], codes.tobytes())

    image = np.ascontiguousarray(image)
    dtype = image.dtype.str
    shape_xy = image.shape[::-1]
    calibrations = [
        group(
            "",
            [
                scalar("Origin", 0.0, "<f4"),
                scalar("Scale", scale if i < 2 else 1.0, "<f4"),
                text("Units", units if i < 2 else ""),
            ],
        )
        for i in range(len(shape_xy))
    ]
    image_data = group(
        "ImageData",
        [
            group(
                "Calibrations",
                [
                    group(
                        "Brightness",
                        [scalar("Origin", 0.0, "<f4"), scalar("Scale", 1.0, "<f4"), text("Units", "")],
                    ),
                    group("Dimension", calibrations),
                ],
            ),
            data_tag("Data", [20, _TAG_TYPE[dtype], image.size], image.tobytes()),
            scalar("DataType", _DM_DATA_TYPE[dtype], "<i4"),
            group("Dimensions", [scalar("", s, "<u4") for s in shape_xy]),
        ],
    )
    image_list = group(
        "ImageList", [group("", [image_data, group("ImageTags", []), text("Name", "test image")])]
    )
    root = b"\x00\x01" + n(1) + image_list + b"\x00" * 8
    header_size = 16 if version == 4 else 12
    return struct.pack(">I", version) + n(len(root) + header_size) + struct.pack(">I", 1) + root


# ---------------------------------------------------------------------------------------------- TIFF


def test_tiff_16bit_with_centimetre_resolution_gives_pixel_size():
    image = RNG.integers(0, 65535, (24, 32), dtype=np.uint16)
    # 0.25 nm/px: 1 cm = 1e7 nm, so 1e7 / 0.25 = 4e7 pixels per centimetre.
    raw = _tiff_bytes(image, resolution=(1e7 / 0.25, 1e7 / 0.25), resolutionunit="CENTIMETER")
    img = decode_image(raw, "a.tif")
    assert img.pixel_size_nm == pytest.approx(0.25, rel=1e-6)
    assert img.data.dtype == np.float32 and img.data.shape == (24, 32)
    np.testing.assert_array_equal(img.data, image.astype(np.float32))
    assert img.meta["dtype"] == "uint16" and img.meta["format"] == "tiff"


def test_tiff_inch_resolution_gives_pixel_size():
    raw = _tiff_bytes(
        np.zeros((8, 8), np.uint16), resolution=(2.54e7 / 0.5, 2.54e7 / 0.5), resolutionunit="INCH"
    )
    assert decode_image(raw, "a.tiff").pixel_size_nm == pytest.approx(0.5, rel=1e-6)


def test_tiff_print_dpi_is_not_a_pixel_size():
    raw = _tiff_bytes(np.zeros((8, 8), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    img = decode_image(raw, "a.tif")
    assert img.pixel_size_nm is None
    assert any("DPI" in note for note in img.meta["notes"])


def test_tiff_imagej_stack_micron_unit_first_page():
    stack = RNG.random((3, 16, 20)).astype(np.float32)
    raw = _tiff_bytes(stack, imagej=True, resolution=(1 / 0.0005, 1 / 0.0005), metadata={"unit": "um"})
    img = decode_image(raw, "stack.tif")
    assert img.pixel_size_nm == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_array_equal(img.data, stack[0])
    assert img.meta["frames"] == 3


def test_tiff_float32_keeps_values():
    image = (RNG.standard_normal((10, 12)) * 1000).astype(np.float32)
    img = decode_image(_tiff_bytes(image), "f.tif")
    np.testing.assert_array_equal(img.data, image)
    assert img.pixel_size_nm is None


def test_tiff_8bit_rgb_and_fei_metadata():
    gray = RNG.integers(0, 255, (8, 9), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_tiff_bytes(gray), "g.tif").data, gray)
    rgb = np.stack([gray, gray, gray], axis=-1)
    img = decode_image(_tiff_bytes(rgb, photometric="rgb"), "c.tif")
    np.testing.assert_allclose(img.data, gray, atol=0.01)
    grey_alpha = np.dstack([gray, np.full_like(gray, 255)])
    raw = _tiff_bytes(grey_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(decode_image(raw, "ga.tif").data, gray)
    fei_text = "[User]\nDate=01/01/2024\n[Scan]\nPixelWidth=2.5e-10\nPixelHeight=2.5e-10\n"
    raw = _tiff_bytes(gray, extratags=[(34682, "s", 0, fei_text, True)])
    assert decode_image(raw, "fei.tif").pixel_size_nm == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------- PNG / JPEG


def test_png_8bit_16bit_rgb_and_jpeg():
    image8 = RNG.integers(0, 255, (12, 14), dtype=np.uint8)
    img = decode_image(_png_bytes(image8), "a.png")
    np.testing.assert_array_equal(img.data, image8)
    assert img.pixel_size_nm is None and img.meta["dtype"] == "uint8"

    image16 = RNG.integers(256, 65535, (12, 14), dtype=np.uint16)  # values above 255 must survive
    img = decode_image(_png_bytes(image16), "b.png")
    np.testing.assert_array_equal(img.data, image16.astype(np.float32))

    rgb = RNG.integers(0, 255, (12, 14, 3), dtype=np.uint8)
    img = decode_image(_png_bytes(rgb), "c.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)
    np.testing.assert_array_equal(img.data, expected)
    assert img.data.shape == (12, 14) and img.meta["converted_from"] == "RGB"

    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    img = decode_image(buffer.getvalue(), "d.jpg")
    assert img.data.shape == (16, 32) and np.abs(img.data - smooth).mean() < 3


def test_sniffs_format_without_or_with_wrong_extension():
    image = RNG.integers(0, 255, (6, 7), dtype=np.uint8)
    assert decode_image(_png_bytes(image), "upload").meta["format"] == "png"
    assert decode_image(_tiff_bytes(image), "<bytes>").meta["format"] == "tiff"
    assert decode_image(_png_bytes(image), "mislabelled.tif").meta["format"] == "png"
    assert decode_image(_dm_bytes(image.astype(np.uint16), 0.5, "nm"), "body").pixel_size_nm == pytest.approx(
        0.5
    )


# ---------------------------------------------------------------------------------------------- DM3 / DM4 / EMD


@pytest.mark.parametrize("version", [3, 4])
def test_dm_calibration_in_nm(version):
    image = RNG.integers(0, 4000, (20, 30)).astype(np.uint16)
    img = decode_image(_dm_bytes(image, 0.5, "nm", version), f"a.dm{version}")
    assert img.pixel_size_nm == pytest.approx(0.5)
    np.testing.assert_array_equal(img.data, image.astype(np.float32))
    assert img.meta["format"] == f"dm{version}" and img.meta["title"] == "test image"


@pytest.mark.parametrize(
    "units, expected",
    [("\u00b5m", 500.0), ("um", 500.0), ("\u00c5", 0.05), ("A", 0.05), ("1/nm", None), ("", None)],
)
def test_dm_units_convert_to_nm(units, expected):
    img = decode_image(_dm_bytes(np.ones((8, 8), np.float32), 0.5, units), "u.dm4")
    assert img.pixel_size_nm == (pytest.approx(expected) if expected else None)
    if units == "1/nm":
        assert any("reciprocal" in note for note in img.meta["notes"])


def test_dm_stack_gives_first_frame():
    stack = RNG.random((3, 10, 12)).astype(np.float32)
    img = decode_image(_dm_bytes(stack, 0.2, "nm"), "s.dm4")
    np.testing.assert_array_equal(img.data, stack[0])
    assert img.meta["frames"] == 3 and img.pixel_size_nm == pytest.approx(0.2)


def test_emd_roundtrip_through_rosettasciio(tmp_path):
    pytest.importorskip("h5py")
    from rsciio.emd import file_writer

    image = RNG.random((16, 18)).astype(np.float32)
    axes = [
        {"name": n, "size": s, "scale": 0.3, "offset": 0.0, "units": "nm", "navigate": False}
        for n, s in zip(("y", "x"), image.shape, strict=True)
    ]
    signal = {
        "data": image,
        "axes": axes,
        "metadata": {"General": {"title": "haadf"}, "Signal": {"signal_type": ""}},
        "original_metadata": {},
    }
    file_writer(str(tmp_path / "a.emd"), signal)
    img = read_image(tmp_path / "a.emd")
    np.testing.assert_allclose(img.data, image)
    assert img.pixel_size_nm == pytest.approx(0.3)


def test_emd_without_h5py_or_corrupt_is_one_clear_error():
    with pytest.raises(ImageReadError, match=r"bad\.emd"):
        decode_image(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64, "bad.emd")
    try:
        import h5py  # noqa: F401
    except ImportError:
        with pytest.raises(ImageReadError, match="h5py"):
            decode_image(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64, "x.emd")


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path):
    cases = {
        "missing.tif": None,
        "empty.png": b"",
        "corrupt.tif": RNG.bytes(2000),
        "truncated.png": _png_bytes(RNG.integers(0, 255, (64, 64), dtype=np.uint8))[:300],
        "corrupt.dm4": b"\x00\x00\x00\x04" + RNG.bytes(100),
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError) as err:
            read_image(tmp_path / name)
        message = str(err.value)
        assert name in message and "\n" not in message, message
        assert err.value.source == str(tmp_path / name)
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def test_unsupported_extension():
    with pytest.raises(UnsupportedFormatError, match=r"notes\.xyz.*supported: \.png"):
        decode_image(b"just some text", "notes.xyz")


@pytest.mark.parametrize("kind", ["png", "tif", "dm4"])
def test_decompression_bomb_guard(kind):
    image = np.zeros((100, 100), np.uint16)
    raw = {"png": _png_bytes, "tif": _tiff_bytes, "dm4": lambda a: _dm_bytes(a, 1.0, "nm")}[kind](image)
    with pytest.raises(ImageReadError, match="too large"):
        decode_image(raw, f"big.{kind}", max_pixels=5000)
    assert decode_image(raw, f"ok.{kind}", max_pixels=10_000).shape == (100, 100)


def test_image_read_error_survives_pickling():  # Ray ships exceptions between processes
    err = pickle.loads(pickle.dumps(ImageReadError("a.tif", "corrupt")))
    assert (
        str(err) == "cannot read image a.tif: corrupt" and err.source == "a.tif" and err.reason == "corrupt"
    )


# ---------------------------------------------------------------------------------------------- normalisation


def test_normalize_intensity_percentiles_and_edge_cases():
    image = RNG.normal(100, 10, (64, 64)).astype(np.float32)
    image[0, 0] = 1e6  # a hot pixel must not squash the contrast
    out = normalize_intensity(image)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.3 < float(np.median(out)) < 0.7

    assert not normalize_intensity(np.full((8, 8), 7.0)).any()

    sparse = np.zeros((100, 100), np.float32)
    sparse[:3, :3] = 50.0  # 0.09 % of the pixels: above the 99.5th percentile
    assert normalize_intensity(sparse)[0, 0] == 1.0

    with_nan = image.copy()
    with_nan[5, 5] = np.nan
    out = normalize_intensity(EMImage(with_nan, None, "x"), low=1, high=99)
    assert np.isfinite(out).all() and out[5, 5] == 0.0


# ---------------------------------------------------------------------------------------------- writing


def test_write_png_and_mask_roundtrip(tmp_path):
    floats = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    write_png(tmp_path / "f.png", floats)
    back = read_image(tmp_path / "f.png").data
    np.testing.assert_array_equal(back, np.round(floats * 255))

    image16 = RNG.integers(0, 65535, (8, 8), dtype=np.uint16)
    write_png(tmp_path / "sub" / "w.png", image16)  # creates the folder
    np.testing.assert_array_equal(read_image(tmp_path / "sub" / "w.png").data, image16)

    mask = RNG.random((9, 7)) > 0.5
    write_mask_png(tmp_path / "m.png", mask)
    back = read_image(tmp_path / "m.png").data
    assert set(np.unique(back)) <= {0.0, 255.0}
    np.testing.assert_array_equal(back > 0, mask)
    np.testing.assert_array_equal(read_mask_png(tmp_path / "m.png"), mask)
    # atomic writes leave no temporary files behind
    assert sorted(os.listdir(tmp_path)) == ["f.png", "m.png", "sub"] and os.listdir(tmp_path / "sub") == [
        "w.png"
    ]

    with pytest.raises(ValueError, match=r"bad\.png.*shape"):
        write_png(tmp_path / "bad.png", np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        write_png(tmp_path / "nan.png", np.full((2, 2), np.nan))


# ---------------------------------------------------------------------------------------------- stacks


def _make_stack(folder, n_good: int, bad: dict[str, bytes] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        image = RNG.integers(0, 65535, (16, 16), dtype=np.uint16)
        (folder / f"img_{i:02d}.tif").write_bytes(_tiff_bytes(image))
    for name, content in (bad or {}).items():
        (folder / name).write_bytes(content)


def test_list_stack_folder_glob_and_errors(tmp_path):
    _make_stack(tmp_path / "s", 3)
    (tmp_path / "s" / "notes.txt").write_text("x")
    (tmp_path / "s" / "UPPER.TIF").write_bytes(_tiff_bytes(np.zeros((4, 4), np.uint8)))
    files = list_stack(tmp_path / "s")
    assert [os.path.basename(f) for f in files] == ["UPPER.TIF", "img_00.tif", "img_01.tif", "img_02.tif"]
    assert len(list_stack(str(tmp_path / "s" / "img_0[01].tif"))) == 2

    with pytest.raises(StackError, match="no such folder or file: .*nowhere"):
        list_stack(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackError, match=r"no EM images \(\.png, .*\) in .*empty$"):
        list_stack(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(StackError, match=r"found 1 other file\(s\): \.txt"):
        list_stack(tmp_path / "docs")


def test_load_stack_skips_unreadable_with_one_warning(tmp_path):
    _make_stack(
        tmp_path,
        3,
        {
            "bad.tif": RNG.bytes(500),
            "cut.png": _png_bytes(RNG.integers(0, 255, (40, 40), dtype=np.uint8))[:400],
        },
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, skipped = load_stack(list_stack(tmp_path))
    relevant = [w for w in caught if issubclass(w.category, SkippedImagesWarning)]
    assert len(relevant) == 1
    assert "skipped 2 of 5" in str(relevant[0].message) and "bad.tif" in str(relevant[0].message)
    assert [img.name for img in images] == ["img_00.tif", "img_01.tif", "img_02.tif"]
    assert [os.path.basename(uri) for uri, _ in skipped] == ["bad.tif", "cut.png"]


def test_load_stack_too_few_images_names_the_numbers(tmp_path):
    _make_stack(tmp_path, 1, {"a.tif": RNG.bytes(300), "b.dm4": b"\x00\x00\x00\x04junk"})
    with pytest.raises(StackError) as err:
        read_stack(tmp_path, min_images=2)
    message = str(err.value)
    assert message.startswith(f"only 1 usable image in {tmp_path} (need 2); unreadable: a.tif (")
    assert "b.dm4 (" in message and "\n" not in message
    with pytest.raises(StackError, match="no image files given"):
        load_stack([])


def test_mask_tiffs_read_back_with_their_nm_calibration_and_labels(tmp_path):
    from tgan_ray.io.tiff import write_mask_tiffs

    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15], labels[20:30, 10:40], labels[32:38, 44:50] = 1, 2, 300
    mask_uri, labels_uri = write_mask_tiffs(str(tmp_path), "a_labels", labels > 0, labels, 0.21)
    assert (mask_uri, labels_uri) == (
        str(tmp_path / "a_labels.tif"),
        str(tmp_path / "labels" / "a_labels.tif"),
    )
    for uri, expected in ((mask_uri, (labels > 0) * 255), (labels_uri, labels)):
        with tifffile.TiffFile(uri) as tif:
            np.testing.assert_array_equal(tif.asarray(), expected)
            assert tif.is_imagej and tif.imagej_metadata["unit"] == "nm"
            num, den = tif.pages[0].tags["XResolution"].value
            assert num / den == pytest.approx(1 / 0.21)
        assert read_image(uri).pixel_size_nm == pytest.approx(0.21)  # our reader takes it back as nm
    assert tifffile.imread(labels_uri).dtype == np.uint16
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    write_mask_tiffs(str(tmp_path), "raw", labels > 0, labels, None)  # no pixel size: no calibration
    assert read_image(tmp_path / "labels" / "raw.tif").pixel_size_nm is None


def test_label_tiff_beyond_uint16_stays_exact():
    from tgan_ray.io.tiff import label_image, tiff_bytes

    labels = np.arange(70_000 * 2, dtype=np.int64).reshape(200, 700) // 2
    stored = tifffile.imread(io.BytesIO(tiff_bytes(label_image(labels), 1.0)))
    np.testing.assert_array_equal(stored.astype(np.int64), labels)


@pytest.mark.parametrize("name", ["junk.png", "junk.jpg", "junk.tif", "junk.dm4"])
def test_random_bytes_error_has_no_object_address(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(5).bytes(3000))
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = str(err.value)
    assert str(path) in message and " at 0x" not in message and "<_io" not in message, message
    if name == "junk.png":  # Pillow's own text, less the buffer it was reading from
        assert message.endswith("(UnidentifiedImageError: cannot identify image file)")


def test_without_addresses_drops_reprs_and_keeps_the_words():
    from tgan_ray.messages import without_addresses

    text = (
        "Connection failed: <urllib3.connection.HTTPConnection object at 0x7f3a2c1d9e50>: Failed to "
        "establish a new connection; callback <function on_done at 0x10ab> gone; keep <not a repr>"
    )
    assert without_addresses(text) == (
        "Connection failed: Failed to establish a new connection; callback gone; keep <not a repr>"
    )
