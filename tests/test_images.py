"""Image loading: every source kind, every pixel mode, EXIF orientation, and every bad input."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_uhd.errors import ImageLoadError
from llava_uhd.images import MultiFrameImageWarning, load_image, probe_image_size

EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pattern(width: int = 6, height: int = 4) -> Image.Image:
    """An RGB image whose every pixel is distinct, so any flip or rotation is visible."""
    values = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3) * 3
    return Image.fromarray(values)


# --- sources ---------------------------------------------------------------------------------------


def test_sources_path_bytes_pil_numpy_agree(tmp_path: Path) -> None:
    image = _pattern()
    data = _encode(image, "PNG")
    path = tmp_path / "pattern.png"
    path.write_bytes(data)
    expected = np.asarray(image)
    for source in (str(path), path, data, bytearray(data), memoryview(data), image, expected):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_numpy_shapes_and_dtypes() -> None:
    grey = np.array([[0, 128], [255, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(grey)), np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(load_image(grey[:, :, None]))[:, :, 1], grey)
    floats = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(floats))[:, :, 0], [[0, 128], [255, 64]])
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent becomes white
    np.testing.assert_array_equal(np.asarray(load_image(rgba))[0], [[255, 0, 0], [255, 255, 255]])


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((2, 2, 2), np.uint8), "H x W"),
        (np.zeros((2, 2, 3, 1), np.uint8), "H x W"),
        (np.zeros(5, np.uint8), "H x W"),
        (np.zeros((0, 3), np.uint8), "degenerate size 3x0"),
        (np.zeros((2, 2), np.int64), "dtype must be uint8 or float"),
        (np.full((2, 2), 1.5), r"\[0, 1\], got \[1.5, 1.5\]"),
        (np.full((2, 2), np.nan), "NaN"),
    ],
)
def test_bad_numpy_arrays(array: np.ndarray, reason: str) -> None:
    with pytest.raises(ImageLoadError, match=rf"<array .*{reason}"):
        load_image(array)


# --- modes -----------------------------------------------------------------------------------------


def test_mode_l_and_1() -> None:
    grey = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    assert np.asarray(load_image(grey)).tolist() == [[[0] * 3, [100] * 3, [255] * 3]]
    bilevel = grey.convert("1")
    assert np.asarray(load_image(bilevel)).tolist() == [[[0] * 3, [0] * 3, [255] * 3]]


def test_mode_la_and_rgba_composite_on_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 255))  # opaque black
    la.putpixel((1, 0), (0, 0))  # transparent black -> white
    assert np.asarray(load_image(la)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    rgba = Image.new("RGBA", (1, 1), (0, 0, 200, 51))  # 20% blue over white
    expected = round(200 * 51 / 255 + 255 * (1 - 51 / 255))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [204, 204, expected]


def test_mode_p_with_and_without_transparency() -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    assert np.asarray(load_image(palette_image)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    palette_image.info["transparency"] = 1  # index 1 transparent -> white
    assert np.asarray(load_image(palette_image)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    # the same through a GIF file, where Pillow reads the transparency from the file
    assert np.asarray(load_image(_encode(palette_image, "GIF", transparency=1))).tolist() == [
        [[10, 20, 30], [255, 255, 255]]
    ]


def test_mode_cmyk() -> None:
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow: red
    assert np.asarray(load_image(cmyk)).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_mode_i16_scales_not_clips() -> None:
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 8-bit levels 0, 1, 128, 255
    for image in (Image.fromarray(levels), Image.open(io.BytesIO(_encode(Image.fromarray(levels), "PNG")))):
        assert image.mode.startswith("I;16") or image.mode == "I"
        assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_mode_i_and_f() -> None:
    as_i = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32))
    assert as_i.mode == "I"
    assert np.asarray(load_image(as_i))[0, :, 0].tolist() == [0, 255, 255]  # 70000 is clipped
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]
    levels = Image.fromarray(np.array([[0.0, 100.4, 300.0]], dtype=np.float32))
    assert np.asarray(load_image(levels))[0, :, 0].tolist() == [0, 100, 255]


def test_animated_gif_takes_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    with pytest.warns(MultiFrameImageWarning, match="a GIF image of 2 frames; only the first frame is used"):
        assert np.asarray(load_image(data))[0, 0].tolist() == [255, 0, 0]


# --- EXIF orientation --------------------------------------------------------------------------------

# orientation -> the transpose that shows the image upright (EXIF 2.3)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    6: Image.Transpose.ROTATE_270,
    8: Image.Transpose.ROTATE_90,
    5: Image.Transpose.TRANSPOSE,
    7: Image.Transpose.TRANSVERSE,
}


@pytest.mark.parametrize("orientation", sorted(_UPRIGHT))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_applied_exactly(orientation: int, fmt: str) -> None:
    stored = _pattern(6, 4)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(stored, fmt, exif=exif, **kwargs)
    expected = stored.transpose(_UPRIGHT[orientation])
    loaded = load_image(data)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
    assert probe_image_size(data) == expected.size


def test_exif_orientation_jpeg_and_probe_without_decoding() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    stored = Image.fromarray(
        noise // 4 + 190
    )  # light noise keeps the JPEG big enough to cut after its header
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # displayed rotated 90 degrees clockwise: red goes to the top-right
    data = _encode(stored, "JPEG", exif=exif, quality=95)
    loaded = np.asarray(load_image(data))
    assert loaded.shape == (64, 32, 3)
    assert loaded[4, 28].tolist()[0] > 200 and loaded[4, 28].tolist()[1] < 60
    # header only: a JPEG cut after its header still probes (and its EXIF is applied) but does not load
    truncated = data[: len(data) // 2]
    assert probe_image_size(truncated) == (32, 64)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(truncated)


def test_pil_input_is_transposed_as_a_copy() -> None:
    stored = _pattern(6, 4)
    stored.getexif()[EXIF_ORIENTATION] = 8
    loaded = load_image(stored)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(stored.transpose(Image.Transpose.ROTATE_90)))
    assert (
        stored.size == (6, 4) and stored.getexif()[EXIF_ORIENTATION] == 8
    )  # the caller's image is untouched
    assert probe_image_size(stored) == (4, 6)


def test_pil_rgb_input_comes_back_as_a_copy() -> None:
    image = _pattern()
    loaded = load_image(image)  # nothing to convert or turn, yet the caller's object is not handed back
    assert loaded is not image
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_jpeg_draft_decodes_at_reduced_scale() -> None:
    data = _encode(Image.new("RGB", (800, 600), (0, 128, 255)), "JPEG")
    assert load_image(data).size == (800, 600)
    assert load_image(data, draft_size=(300, 200)).size == (400, 300)  # 1/2 still covers 300x200
    assert load_image(data, draft_size=(90, 70)).size == (100, 75)  # 1/8
    assert load_image(_encode(Image.new("RGB", (800, 600)), "PNG"), draft_size=(90, 70)).size == (800, 600)


# --- bad inputs ------------------------------------------------------------------------------------


def test_missing_directory_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for func in (load_image, probe_image_size):
        with pytest.raises(ImageLoadError, match=rf"^{missing}: no such file$"):
            func(missing)
        with pytest.raises(ImageLoadError, match=rf"^{tmp_path}: is a directory"):
            func(tmp_path)
        with pytest.raises(ImageLoadError, match=rf"^{empty}: empty file \(0 bytes\)$"):
            func(empty)
        with pytest.raises(ImageLoadError, match=r"^<0 bytes>: empty data"):
            func(b"")


def test_not_an_image_and_wrong_type(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image\n")
    with pytest.raises(ImageLoadError, match=rf"^{text}: not an image"):
        load_image(text)
    with pytest.raises(ImageLoadError, match=r"^<int>: unsupported image source type int"):
        load_image(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF"])
def test_truncated_files_fail_at_load(fmt: str, tmp_path: Path) -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _encode(noisy, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageLoadError, match=rf"^{path}: "):
        load_image(path)


def test_pixel_limit_checked_from_header_before_decoding() -> None:
    # a 6000x6000 PNG compresses to a few KB; the limit must refuse it without decoding 36 MP
    data = _encode(Image.new("L", (6000, 6000)), "PNG")
    assert len(data) < 100_000
    message = r"6000x6000 = 36000000 pixels is over the limit max_pixels=1000000"
    with pytest.raises(ImageLoadError, match=message):
        probe_image_size(data, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match=message):
        load_image(data, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(np.zeros((10, 20), np.uint8), max_pixels=199)
    assert load_image(np.zeros((10, 20), np.uint8), max_pixels=200).size == (20, 10)


def test_our_pixel_limit_rules_over_pillows() -> None:
    # 20000 x 20000 is over twice Pillow's MAX_IMAGE_PIXELS, where Pillow itself refuses at open:
    # the default limit refuses it with our message, and a raised limit admits it
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    with pytest.raises(ImageLoadError, match=r"400000000 pixels is over the limit .* --max-image-pixels"):
        load_image(bomb)
    assert probe_image_size(bomb, max_pixels=10**9) == (20000, 20000)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is restored after the header read


# --- several frames --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")]
)
def test_an_animation_or_multi_page_file_is_read_as_its_first_frame_with_one_warning(
    tmp_path: Path, fmt: str, suffix: str
) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / f"frames.{suffix}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], lossless=True)
    single = tmp_path / f"single.{suffix}"
    frames[0].save(single, fmt, lossless=True)
    with pytest.warns(MultiFrameImageWarning) as caught:
        first = load_image(path)
        load_image(path)  # the same file again: said once
    assert [str(w.message) for w in caught] == [
        f"{path}: a {fmt} image of 3 frames; only the first frame is used"
    ]
    assert first.getpixel((0, 0)) == (250, 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(single).getpixel((0, 0)) == (250, 0, 0)
