"""Integer greyscale (Pillow modes I and I;16*): each real source scales to 8 bits by its own range.

Expected values are exact: round(v * 255 / white) with white = the file's declared maximum, including
values either side of a rounding boundary (x.498 -> x, x.502 -> x + 1).
"""

from __future__ import annotations

import io
import logging
import struct

import numpy as np
import pytest
from PIL import Image

from llava_uhd.images import load_image, to_rgb

EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _grey(source: object) -> list[int]:
    """The loaded image's grey levels, row-major (asserting R = G = B)."""
    rgb = np.asarray(load_image(source))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return rgb[..., 0].ravel().tolist()


def _tiff(values: np.ndarray, bits: int, signed: bool = False, orientation: int | None = None) -> bytes:
    """A minimal little-endian greyscale TIFF (one uncompressed strip), for depths Pillow cannot write."""
    height, width = values.shape
    if bits == 12:  # two samples in three bytes, most significant bits first
        a, b = values.astype(np.uint32).reshape(-1, 2).T
        pixels = np.stack([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF], axis=1).astype(np.uint8).tobytes()
    else:
        pixels = values.astype(f"<{'i' if signed else 'u'}{bits // 8}").tobytes()
    short, long_ = 3, 4
    entries = [
        (256, long_, width),
        (257, long_, height),
        (258, short, bits),
        (259, short, 1),  # no compression
        (262, short, 1),  # BlackIsZero
        (273, long_, 0),  # strip offset, filled in below
        *([(274, short, orientation)] if orientation is not None else []),
        (277, short, 1),
        (278, long_, height),
        (279, long_, len(pixels)),
        (339, short, 2 if signed else 1),
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


# --- files: the declared bit depth decides ---------------------------------------------------------


def test_png_16_bit() -> None:
    levels = np.array([[0, 257, 32896, 65535, 128, 129]], dtype=np.uint16)
    data = _encode(Image.fromarray(levels), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert _grey(data) == [0, 1, 128, 255, 0, 1]


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_tiff_16_bit_both_byte_orders(dtype: str) -> None:
    levels = np.array([[0, 257, 32896, 65535, 128, 129]]).astype(dtype)
    data = _encode(Image.fromarray(levels), "TIFF")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B")
    assert _grey(data) == [0, 1, 128, 255, 0, 1]


def test_tiff_12_bit_uses_its_4095_range() -> None:
    values = np.array([[0, 1, 2048, 4095], [100, 4000, 8, 9]])
    data = _tiff(values, bits=12)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(opened), values)  # the builder packs what Pillow unpacks
    # 8 * 255 / 4095 = 0.498, 9 * 255 / 4095 = 0.560; a 0-65535 scale would have left 4095 at level 16
    assert _grey(data) == [0, 0, 128, 255, 6, 249, 0, 1]


def test_tiff_16_bit_signed_clips_negatives() -> None:
    values = np.array([[-100, 0, 32767, 16384, 128, 64]])
    data = _tiff(values, bits=16, signed=True)
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert _grey(data) == [0, 0, 255, 128, 1, 0]


def test_tiff_32_bit_signed_as_pillow_writes_it() -> None:
    values = np.array([[0, 2**31 - 1, 2**30, -5, 4210752, 4210753]], dtype=np.int32)
    data = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert _grey(data) == [0, 255, 128, 0, 0, 1]


def test_tiff_32_bit_unsigned_above_2_to_the_31() -> None:
    values = np.array([[0, 2**32 - 1, 2**31, 2**31 - 1, 8421504, 8421505]], dtype=np.uint64)
    data = _tiff(values, bits=32)
    assert Image.open(io.BytesIO(data)).mode == "I"  # Pillow holds these in int32: 2**31 reads as < 0
    assert _grey(data) == [0, 255, 128, 127, 0, 1]


def test_tiff_32_bit_holding_8_bit_values_is_black_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    data = _encode(Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)), "TIFF")
    with caplog.at_level(logging.WARNING, logger="llava_uhd.images"):
        assert _grey(data) == [0, 0, 0]  # as the file declares: 255 of 2**31 - 1 is black
    assert "values up to 255 on a 0-2147483647 scale comes out black" in caplog.text


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        # Pillow rescales maxval 1023 to 0-65535 (512 -> 32800), then 32800 / 257 = 127.6
        (b"P5 4 1 1023\n", np.array([0, 1, 512, 1023], ">u2").tobytes(), [0, 0, 128, 255]),
        (b"P5 4 1 4095\n", np.array([0, 8, 9, 4095], ">u2").tobytes(), [0, 0, 1, 255]),
        (b"P5 4 1 65535\n", np.array([0, 128, 129, 65535], ">u2").tobytes(), [0, 0, 1, 255]),
        (b"P2 4 1 65535\n", b"0 128 129 65535\n", [0, 0, 1, 255]),
        (b"P5 4 1 255\n", bytes([0, 1, 128, 255]), [0, 1, 128, 255]),  # 8-bit: mode L, untouched
    ],
)
def test_pgm_any_maxval(header: bytes, body: bytes, expected: list[int]) -> None:
    assert _grey(header + body) == expected


def test_opened_file_passed_as_pil_image_keeps_its_depth() -> None:
    data = _tiff(np.array([[0, 2048, 4095, 9]]), bits=12)
    assert _grey(Image.open(io.BytesIO(data))) == [0, 128, 255, 1]


def test_depth_read_before_the_exif_transpose() -> None:
    values = np.array([[0, 4095], [2048, 9]])
    data = _tiff(values, bits=12, orientation=6)  # shown rotated 90 degrees clockwise
    loaded = np.asarray(load_image(data))[..., 0]
    np.testing.assert_array_equal(loaded, np.rot90(np.array([[0, 255], [128, 1]]), k=-1))


# --- in memory: the origin is unknown -------------------------------------------------------------


def test_mode_i_with_8_bit_values_is_taken_as_8_bit() -> None:
    as_int32 = Image.fromarray(np.array([[0, 1, 128, 255, -5]], dtype=np.int32))
    assert as_int32.mode == "I"
    assert _grey(as_int32) == [0, 1, 128, 255, 0]
    converted = Image.fromarray(np.array([[0, 1, 128, 255]], dtype=np.uint8)).convert("I")
    assert converted.mode == "I"
    assert _grey(converted) == [0, 1, 128, 255]


def test_mode_i_above_255_is_taken_as_16_bit() -> None:
    image = Image.fromarray(np.array([[0, 256, 65535, 70000, 128, 129]], dtype=np.int32))
    assert _grey(image) == [0, 1, 255, 255, 0, 1]  # 70000 is clipped


def test_mode_i16_in_memory_is_16_bit_by_its_name() -> None:
    image = Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8)).convert("I;16")
    assert image.mode == "I;16"
    assert _grey(image) == [0, 0, 1]  # a 16-bit image this dark is dark


def test_to_rgb_takes_a_known_white_level() -> None:
    image = Image.fromarray(np.array([[0, 2048, 4095, 9]], dtype=np.int32))
    assert np.asarray(to_rgb(image, white_level=4095))[0, :, 0].tolist() == [0, 128, 255, 1]
