"""Fuzzing the loader: whatever the bytes, only ImageLoadError escapes load_image and probe_image_size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_uhd.errors import ImageLoadError
from llava_uhd.images import load_image, probe_image_size

# Corrupt files make Pillow warn (e.g. "Corrupt EXIF data") before it raises; the warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Small enough that a mutated header claiming a huge size is refused instead of decoded slowly.
FUZZ_MAX_PIXELS = 1_000_000
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")
FUZZ = settings(
    max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(len(fmt))
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if fmt == "GIF":
        image = image.quantize(16)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    kwargs = {"exif": exif} if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else {}
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


ENCODED = {fmt: _encoded(fmt) for fmt in FORMATS}


def _load_both(data: bytes) -> None:
    """Either call may fail, but only with ImageLoadError; a success returns a sane RGB image."""
    try:
        width, height = probe_image_size(data, max_pixels=FUZZ_MAX_PIXELS)
        assert width >= 1 and height >= 1
    except ImageLoadError:
        pass
    try:
        image = load_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except ImageLoadError as exc:
        assert str(exc).startswith(f"<{len(data)} bytes>: ")
        return
    assert image.mode == "RGB"
    assert image.size[0] * image.size[1] <= FUZZ_MAX_PIXELS


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(ENCODED[draw(st.sampled_from(FORMATS))])
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("flip", "set", "delete", "insert")))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80)))
        elif action == "delete" and len(data) > 1:
            del data[position]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


def test_unmutated_encodings_load() -> None:
    for fmt, data in ENCODED.items():
        expected = (24, 32) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else (32, 24)  # EXIF 6 transposes
        assert load_image(data).size == expected, fmt
        assert probe_image_size(data) == expected, fmt


@FUZZ
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes(data: bytes) -> None:
    _load_both(data)


@FUZZ
@given(st.sampled_from(FORMATS).map(lambda fmt: ENCODED[fmt][:16]), st.binary(max_size=256))
def test_valid_magic_then_garbage(header: bytes, tail: bytes) -> None:
    _load_both(header + tail)


@FUZZ
@given(mutated_images())
def test_mutated_real_images(data: bytes) -> None:
    _load_both(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_truncation_point_of_a_header(fmt: str) -> None:
    data = ENCODED[fmt]
    for end in range(1, min(len(data), 200)):
        _load_both(data[:end])
