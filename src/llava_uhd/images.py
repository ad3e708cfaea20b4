"""Reading images safely: any source in, an RGB PIL image out. Pillow and numpy only, no torch.

Sources are a path (``str`` or ``os.PathLike``), encoded bytes, a PIL image or a numpy array
(H x W, H x W x 1, H x W x 3 or H x W x 4; ``uint8``, or floats in [0, 1]). Every failure a user can
cause (missing file, a directory, empty or truncated data, not an image, too many pixels, a bad array)
raises :class:`~llava_uhd.errors.ImageLoadError` naming the input and the reason; nothing else escapes.

Decompression bombs are refused from the header, before any pixel is decoded, and truncated files fail
here (pixels are decoded eagerly with ``load()``), not later inside a resize. An animation (GIF, APNG,
WebP) or a multi-page TIFF is read as its first frame, with a :class:`MultiFrameImageWarning` saying so.

:func:`load_planned` is how the processor reads the images of one request: plan from the header, then
decode JPEGs only at the DCT scale the plan needs (several times faster for large photos), planning
again when the decoder reveals an orientation the header did not show.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from llava_uhd.config import DEFAULT_MAX_IMAGE_PIXELS
from llava_uhd.errors import ImageLoadError
from llava_uhd.slicing import SlicePlan

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
_ENCODED_SOURCES = (str, os.PathLike, bytes, bytearray, memoryview)

# What Pillow's decoders raise on bad data. OSError covers missing files, UnidentifiedImageError and
# "image file is truncated"; the others come from plugins parsing corrupt headers (found by fuzzing).
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    zlib.error,
    Image.DecompressionBombError,
)

# EXIF orientations 5-8 transpose the image, so width and height swap (EXIF 2.3, tag 0x0112).
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TURNING_ORIENTATIONS = frozenset(range(2, 9))  # every orientation but 1 (upright) moves pixels
_TIFF_WIDTH_TAG, _TIFF_LENGTH_TAG = 256, 257  # ImageWidth, ImageLength (TIFF 6.0)
_TIFF_BITS_TAG, _TIFF_SAMPLE_FORMAT_TAG = 258, 339  # BitsPerSample, SampleFormat (TIFF 6.0)
_TIFF_SIGNED = 2  # SampleFormat: two's complement signed integer
# Formats whose integer greyscale Pillow always delivers on a 16-bit scale: PNG stores 16 bits, and the
# PPM/PGM decoder rescales any maxval above 255 to 0-65535.
_SIXTEEN_BIT_FORMATS = frozenset({"PNG", "PPM"})

_UINT8_MAX = 255
_UINT16_MAX = 65535
_WHITE = (255, 255, 255)
# Formats whose further frames are other pictures (animation frames, pages). Not MPO: its extra images
# are previews of the first (CIPA DC-007), so a phone photo would warn for nothing.
_MULTI_FRAME_FORMATS = frozenset({"GIF", "PNG", "WEBP", "TIFF"})


class MultiFrameImageWarning(UserWarning):
    """An image holds several frames (an animation or pages) and only the first one is used."""


def describe_source(source: object) -> str:
    """A short name for an input, for error messages: the path, or the kind and size of the data."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {tuple(source.shape)}>"
    return f"<{type(source).__name__}>"


def _fail(source: object, reason: str) -> ImageLoadError:
    return ImageLoadError(f"{describe_source(source)}: {reason}")


def _open_stream(source: str | os.PathLike | bytes | bytearray | memoryview) -> IO[bytes]:
    """A binary stream over a path or bytes, after the checks Pillow would report obscurely."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise _fail(source, "empty data (0 bytes)")
        return io.BytesIO(bytes(source))
    path = Path(source)
    if not path.exists():
        raise _fail(source, "no such file")
    if path.is_dir():
        raise _fail(source, "is a directory, not an image file")
    try:
        if path.stat().st_size == 0:
            raise _fail(source, "empty file (0 bytes)")
        return path.open("rb")
    except OSError as exc:  # permission denied, a special file...
        raise _fail(source, f"cannot be read ({exc.strerror or exc})") from None


def _check_pixels(source: object, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise _fail(source, f"has a degenerate size {width}x{height}")
    if width * height > max_pixels:
        raise _fail(
            source,
            f"{width}x{height} = {width * height} pixels is over the limit max_pixels={max_pixels} "
            "(a decompression-bomb guard; if the image is genuine, raise it with --max-image-pixels N "
            "or max_image_pixels=N)",
        )


_PILLOW_LIMIT_LOCK = threading.Lock()
# The files already reported as read by their first frame only.
_MULTI_FRAME_REPORTED: set[str] = set()
_MULTI_FRAME_LOCK = threading.Lock()


@contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """Let our ``max_pixels`` rule instead of Pillow's own bomb limit (2 x ``MAX_IMAGE_PIXELS``).

    Pillow's limit is a module global checked in ``Image.open``; it is lifted only for the duration of
    one header read, under a lock, and our own check runs right after, before any pixel is decoded, so
    the user sees our limit and how to raise it.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is None:
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit


def _open_header(source: object, stream: IO[bytes], max_pixels: int) -> ImageFile.ImageFile:
    """Open an encoded image lazily (header only) and check its size against ``max_pixels``."""
    try:
        with warnings.catch_warnings(), _our_pixel_limit():
            # We enforce our own limit right below; Pillow's warning band would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise _fail(source, f"over Pillow's decompression-bomb limit ({exc})") from None
    except UnidentifiedImageError:
        raise _fail(source, "not an image (no image format recognised the data)") from None
    except _PIL_ERRORS as exc:
        raise _fail(source, f"cannot be opened as an image ({type(exc).__name__}: {exc})") from None
    _check_pixels(source, image.size[0], image.size[1], max_pixels)
    return image


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 if absent) read from metadata only, never by decoding pixels."""
    raw = image.info.get("exif")
    if raw is not None:
        exif = Image.Exif()
        exif.load(raw)
    elif isinstance(image, PngImagePlugin.PngImageFile):
        # PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixel data;
        # an orientation there is rare and not worth a full decode in a header probe. Callers that
        # decode anyway (check_image_file, the processor) correct the size from the decoded image.
        return 1
    else:
        exif = image.getexif()  # TIFF keeps orientation in its header tags
    value = exif.get(_EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) else 1


def probe_image_size(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image as :func:`load_image` would return it, from the header alone.

    EXIF orientation is applied (orientations 5-8 swap the sides). Encoded sources are not decoded, so
    this is cheap even for huge files; decoded sources (PIL, numpy) report their size directly.

    Raises:
        ImageLoadError: the source cannot be opened, or has more than ``max_pixels`` pixels.
    """
    if isinstance(source, Image.Image | np.ndarray):
        return load_image(source, max_pixels=max_pixels).size
    stream = _open_source(source)
    with stream:
        image = _open_header(source, stream, max_pixels)
        try:
            orientation = _exif_orientation(image)
        except _PIL_ERRORS:  # unreadable metadata: the pixels are still upright as stored
            orientation = 1
        width, height = _stored_size(image)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def check_image_file(source: ImageSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) as :func:`probe_image_size` gives it, after checking that the pixels decode.

    The header alone does not reveal a truncated or corrupt file; this decodes the image (JPEGs at the
    smallest DCT scale, which still reads every byte) so that ``llava-uhd plan`` refuses such a file
    just as loading it for the model would.
    """
    width, height = probe_image_size(source, max_pixels=max_pixels)
    image = load_image(source, max_pixels=max_pixels, draft_size=(1, 1))
    if width != height and image.size == (height, width):  # a PNG's EXIF orientation after its pixels
        return image.size
    return width, height


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels as stored, before any EXIF orientation."""
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        # Pillow 11+ reports a TIFF's size already upright (it transposes inside load()); the header
        # tags hold the stored size whatever the Pillow version.
        return image.tag_v2[_TIFF_WIDTH_TAG], image.tag_v2[_TIFF_LENGTH_TAG]
    return image.size


def _open_source(source: object) -> IO[bytes]:
    if not isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        raise ImageLoadError(
            f"{describe_source(source)}: unsupported image source type {type(source).__name__}; "
            "give a path, bytes, a PIL image or a numpy array"
        )
    return _open_stream(source)


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read any supported source into an upright 8-bit RGB PIL image.

    Args:
        source: a path, encoded bytes, a PIL image or a numpy array (see the module docstring).
        max_pixels: refuse images with more pixels than this (checked from the header, before decoding).
        draft_size: optional (width, height), in upright orientation: the smallest size the caller
            needs. JPEG sources are then decoded at the largest DCT reduction (1/2, 1/4 or 1/8) that
            still covers it, several times faster for large photos; the result is then smaller than the
            header size. Other formats ignore it. None (default) decodes at full resolution.

    Raises:
        ImageLoadError: with the input and the reason, for every bad input.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, Image.Image):
        image = _decoded(source, source, max_pixels)
        return image.copy() if image is source else image  # never hand back the caller's own object
    stream = _open_source(source)
    with stream:
        image = _open_header(source, stream, max_pixels)
        return _decoded(source, image, max_pixels, draft_size)


PlanImages = Callable[[list[tuple[int, int]]], list[SlicePlan]]  # all (width, height) -> their plans
DraftSize = Callable[[SlicePlan], tuple[int, int]]  # a plan -> the smallest decode it allows


def load_planned(
    sources: Sequence[ImageSource],
    plan: PlanImages,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft_size: DraftSize | None = None,
) -> tuple[list[Image.Image], list[SlicePlan]]:
    """Decode and plan the images of one request, in order.

    ``plan`` gets every image's upright (width, height) at once, so a token budget can be shared across
    them. Without ``draft_size`` every source is decoded in full and planned from its pixels. With it,
    encoded sources (paths, bytes) are planned from their header (:func:`probe_image_size`) and then
    decoded at the JPEG DCT scale ``draft_size(plan)`` still covers (:func:`load_image`); PIL images and
    arrays are taken as they are.

    Raises:
        ImageLoadError: a source cannot be read (errors of ``plan`` pass through).
    """
    if draft_size is None:
        images = [load_image(source, max_pixels=max_pixels) for source in sources]
        return images, plan([image.size for image in images])
    decoded: list[Image.Image | None] = [None] * len(sources)
    sizes: list[tuple[int, int]] = []
    for i, source in enumerate(sources):
        if isinstance(source, _ENCODED_SOURCES):
            sizes.append(probe_image_size(source, max_pixels=max_pixels))
        else:
            image = load_image(source, max_pixels=max_pixels)
            decoded[i] = image
            sizes.append(image.size)
    plans = plan(sizes)
    loaded = _decode_drafts(sources, decoded, plans, max_pixels, draft_size)
    # The header probe cannot see an EXIF orientation stored after a PNG's pixel data (the decoder meets
    # it at the end): an image that decodes as the transpose of its probed size is planned again from
    # what was decoded, and any other image whose plan that changes is decoded again.
    turned = [
        i
        for i, (image, size) in enumerate(zip(loaded, sizes, strict=True))
        if decoded[i] is None and size[0] != size[1] and image.size == (size[1], size[0])
    ]
    if turned:
        for i in turned:
            sizes[i], decoded[i] = loaded[i].size, loaded[i]
        first, plans = plans, plan(sizes)
        decoded = [
            image if full is not None or old == new else None  # a draft for the old plan may not fit
            for image, full, old, new in zip(loaded, decoded, first, plans, strict=True)
        ]
        loaded = _decode_drafts(sources, decoded, plans, max_pixels, draft_size)
    return loaded, plans


def _decode_drafts(
    sources: Sequence[ImageSource],
    decoded: list[Image.Image | None],
    plans: Sequence[SlicePlan],
    max_pixels: int,
    draft_size: DraftSize,
) -> list[Image.Image]:
    """The decoded images, decoding the rest at the DCT scale each one's plan allows."""
    return [
        image if image is not None else load_image(source, max_pixels=max_pixels, draft_size=draft_size(plan))
        for image, source, plan in zip(decoded, sources, plans, strict=True)
    ]


def _decoded(
    source: object, image: Image.Image, max_pixels: int, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode, turn upright and convert to RGB; every decoding error becomes an ImageLoadError."""
    _check_pixels(source, image.size[0], image.size[1], max_pixels)
    try:
        _warn_if_multi_frame(source, image)
        if draft_size is not None and image.format == "JPEG":
            _draft(image, draft_size)
        image.load()  # decode now: a truncated file must fail here, not inside a later resize
        white_level = _declared_white_level(image)  # read from the header before a transpose drops it
        return to_rgb(_upright(image), white_level=white_level)
    except ImageLoadError:
        raise
    except _PIL_ERRORS as exc:
        reason = "truncated or corrupt image data" if "truncated" in str(exc) else "cannot be decoded"
        raise _fail(source, f"{reason} ({type(exc).__name__}: {exc})") from None


def _warn_if_multi_frame(source: object, image: Image.Image) -> None:
    """Say that only the first frame of an animation or a multi-page file is used: once per file and
    process (the warnings module's own once-only memory is reset whenever a filter changes, as here)."""
    if not isinstance(source, _ENCODED_SOURCES):  # a PIL image: its caller chose the frame
        return
    if image.format not in _MULTI_FRAME_FORMATS:
        return
    try:  # frame headers only (GIF: its blocks are skipped, not decoded)
        frames = getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
    except _PIL_ERRORS:  # a damaged later frame: the first one may still decode
        return
    if frames < 2:
        return
    name = describe_source(source)
    if isinstance(source, str | os.PathLike):
        with _MULTI_FRAME_LOCK:
            if name in _MULTI_FRAME_REPORTED:
                return
            _MULTI_FRAME_REPORTED.add(name)
    warnings.warn(
        f"{name}: a {image.format} image of {frames} frames; only the first frame is used",
        MultiFrameImageWarning,
        stacklevel=2,
    )


def _draft(image: Image.Image, size: tuple[int, int]) -> None:
    width, height = size
    if _exif_orientation(image) in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width  # the decoder works in stored orientation
    mode = "RGB" if image.mode in ("RGB", "YCbCr") else None
    image.draft(mode, (width, height))


def _upright(image: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose`` without the full copy it makes of an image that is already upright."""
    if image.getexif().get(_EXIF_ORIENTATION_TAG, 1) in _TURNING_ORIENTATIONS:
        return ImageOps.exif_transpose(image)
    return image


def _declared_white_level(image: Image.Image) -> int | None:
    """The value that stands for white in an integer greyscale image, as its file declares; else None.

    TIFF: from BitsPerSample and SampleFormat (2**bits - 1 unsigned, 2**(bits - 1) - 1 signed, whose
    negative values are clipped to black). PNG and PPM/PGM: 65535 (see ``_SIXTEEN_BIT_FORMATS``).
    """
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return None
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        bits = _first(image.tag_v2.get(_TIFF_BITS_TAG))
        if bits is None:
            return None
        signed = _first(image.tag_v2.get(_TIFF_SAMPLE_FORMAT_TAG)) == _TIFF_SIGNED
        return 2 ** (bits - 1 if signed else bits) - 1
    if image.format in _SIXTEEN_BIT_FORMATS:
        return _UINT16_MAX
    return None


def _first(value: object) -> int | None:
    """A TIFF tag's first value (Pillow gives a tuple per sample, or a bare int)."""
    if isinstance(value, tuple):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def to_rgb(image: Image.Image, white_level: int | None = None) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Transparent modes (LA, La, P with transparency, PA, RGBA, RGBa) are composited on white.
    Float greyscale (F) is read in [0, 1] when all of it lies there, otherwise on Pillow's 0-255 scale,
    and clipped.

    Integer greyscale (I;16*, I) is scaled so that ``white_level`` becomes 255, rounded; values below 0
    or above ``white_level`` are clipped. :func:`load_image` passes the level the file declares: TIFF
    ``2**BitsPerSample - 1`` (so 12-bit, 16-bit and 32-bit TIFFs each use their full range, and signed
    ones ``2**(bits - 1) - 1``), 65535 for 16-bit PNG and for PGM with maxval > 255 (Pillow rescales
    those to 16 bits). Without one (an image built in memory, whose origin is unknown): I;16 modes are
    16-bit by their name, 65535; mode I has no range of its own, so its values are taken as 8-bit
    levels when they all lie in 0-255 (e.g. ``L.convert("I")`` or ``Image.fromarray`` of an int32
    array of 8-bit data) and as 16-bit levels otherwise. That rule is a guess: a 16-bit image darker
    than level 256 of 65535 would be read as 8-bit, so pass ``white_level`` when it is known. A
    non-black integer image that still maps to black (say a 32-bit TIFF holding 8-bit values) is
    logged as a warning.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return _grey_to_rgb(_integer_levels(image, white_level))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=_UINT8_MAX, neginf=0.0)
        in_unit_range = values.size > 0 and values.min() >= 0.0 and values.max() <= 1.0
        return _grey_to_rgb(values * _UINT8_MAX if in_unit_range else values)
    has_alpha = mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (*_WHITE, _UINT8_MAX))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _integer_levels(image: Image.Image, white_level: int | None) -> np.ndarray:
    """Integer greyscale -> float 8-bit levels (not yet rounded or clipped); see :func:`to_rgb`."""
    values = np.asarray(image)
    if white_level is not None and white_level > np.iinfo(np.int32).max and values.dtype == np.int32:
        values = values.view(np.uint32)  # unsigned 32-bit data that Pillow keeps in signed int32
    peak = int(values.max()) if values.size > 0 else 0
    if white_level is None:
        white_level = _UINT8_MAX if image.mode == "I" and peak <= _UINT8_MAX else _UINT16_MAX
    if peak > 0 and peak * _UINT8_MAX * 2 < white_level:  # every value rounds to level 0
        logger.warning(
            "integer greyscale image (mode %s) with values up to %d on a 0-%d scale comes out black",
            image.mode,
            peak,
            white_level,
        )
    # v * 255 is exact in float64 and the division rounds once: no level lands on a rounding tie
    return values.astype(np.float64) * _UINT8_MAX / white_level


def _grey_to_rgb(levels: np.ndarray) -> Image.Image:
    """A float array of 0-255 levels (any range; clipped, rounded) -> RGB."""
    grey = np.clip(np.rint(levels), 0, _UINT8_MAX).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    """A numpy array (H x W[, 1|3|4], uint8 or float in [0, 1]) -> RGB PIL image."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise _fail(array, "array must be H x W, H x W x 1, H x W x 3 or H x W x 4")
    height, width = array.shape[:2]
    _check_pixels(array, width, height, max_pixels)
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise _fail(array, "float array contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise _fail(array, f"float array values must lie in [0, 1], got [{low:g}, {high:g}]")
        data = np.rint(array * _UINT8_MAX).astype(np.uint8)
    else:
        raise _fail(array, f"array dtype must be uint8 or float in [0, 1], got {array.dtype}")
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    # Pillow infers the mode from the shape of a uint8 array: L, RGB or RGBA
    return to_rgb(Image.fromarray(np.ascontiguousarray(data)))
