"""From an RGB image and its :class:`~llava_uhd.slicing.SlicePlan` to model-ready patches.

Every piece (slices row-major, then the overview) is resized bicubic, scaled by 1/255, normalised with
the preset's mean and std (docs/design.md section 3) and cut into P x P patches, written straight into
one preallocated (Pt, C*P*P) float32 buffer in the layout of docs/INTERFACES.md: pieces in order,
patches row-major in a piece, each patch flattened as (C, P, P).

Two resize modes:

``exact``
    What the released pipeline computes: two PIL bicubic resizes of the full-resolution image (refine
    image, cut into slices, and overview), then CLIPImageProcessor's numpy rescale (float64, cast to
    float32) and normalise (float32). Bit-faithful; tests check it against transformers.
``fast`` (default)
    The same geometry with less work. Reading the full source twice dominates the released pipeline's
    time (its two full-source resizes were measured at 34-92% of it, more for larger images), so:
    (1) a large source is first shrunk by an integer box ``reduce()`` while the remaining bicubic
    downscale stays at least ``REDUCING_GAP``x (Pillow's ``reducing_gap`` idea); (2) resizes use
    torch's uint8 antialiased bicubic kernel, which follows PIL's filter (support scaled with the
    downscale factor); (3) the overview is derived from the refine image when that is at least
    ``OVERVIEW_FROM_REFINE_GAP``x larger on both sides, else from the (reduced) source; (4) scale and
    normalise are one multiply-add per value, in the output buffer.
    Its difference from ``exact`` is measured in benchmarks/README.md and bounded by tests.

Dimensions: H, W image height and width; C channels; P patch side; Pt patches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llava_uhd.config import SlicingConfig
from llava_uhd.errors import ConfigError, ImageSizeError
from llava_uhd.slicing import PAD_FILL, Size, SlicePlan, apply_plan

ResizeMode = Literal["fast", "exact"]
RESIZE_MODES: tuple[str, ...] = ("fast", "exact")

# Shrink with a box filter only while the bicubic resize that follows still downscales at least 2x:
# the box filter's aliasing is then removed by the antialiased bicubic (Pillow's reducing_gap=2 trade-off).
REDUCING_GAP = 2.0
# Derive the overview from the refine image only when it is a real downscale of it (>= 2x per side),
# so the second bicubic pass acts as a low-pass on already band-limited pixels.
OVERVIEW_FROM_REFINE_GAP = 2.0
_CHANNELS = 3
_JPEG_DRAFT_SCALES = (1, 2, 4, 8)  # the DCT scalings libjpeg decodes at
_UINT8_LEVELS = 255.0


def _check_rgb(image: Image.Image, plan: SlicePlan, mode: ResizeMode) -> None:
    if image.mode != "RGB":
        raise ImageSizeError(
            f"pixels need an RGB image, got mode {image.mode!r} (use llava_uhd.images.load_image)"
        )
    planned = (plan.width, plan.height)
    # fast mode also takes a JPEG decoded at a reduced DCT scale 1/k: each side is ceil(side / k)
    scales = _JPEG_DRAFT_SCALES if mode == "fast" else (1,)
    if not any(image.size == (-(-planned[0] // k), -(-planned[1] // k)) for k in scales):
        raise ImageSizeError(
            f"image is {image.size[0]}x{image.size[1]} but the plan was made for {plan.width}x{plan.height}"
            + (" (or a JPEG draft of it at 1/2, 1/4, 1/8)" if mode == "fast" else "")
        )


def fused_scale_bias(config: SlicingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) per channel so that ``pixel * scale + bias == (pixel / 255 - mean) / std``."""
    std = torch.tensor(config.image_std, dtype=torch.float64)
    mean = torch.tensor(config.image_mean, dtype=torch.float64)
    return (1.0 / (_UINT8_LEVELS * std)).float(), (-mean / std).float()


class PatchWriter:
    """Writes pieces into a preallocated (Pt, C*P*P) float32 buffer, in order."""

    def __init__(self, total_patches: int, config: SlicingConfig) -> None:
        self.patch = config.patch_size
        self.config = config
        self.out = torch.empty(total_patches, _CHANNELS * self.patch * self.patch, dtype=torch.float32)
        self.offset = 0
        scale, bias = fused_scale_bias(config)
        # one value per element of a flattened patch (C, P, P): the multiply-add then runs on contiguous rows
        self._scale_row = scale.repeat_interleave(self.patch * self.patch)
        self._bias_row = bias.repeat_interleave(self.patch * self.patch)

    def _take(self, grid_rows: int, grid_cols: int, piece: Size) -> torch.Tensor:
        """The next rows*cols pieces' patches as a (rows, cols, H/P, W/P, C, P, P) view of the buffer."""
        p = self.patch
        prow, pcol = piece.height // p, piece.width // p
        count = grid_rows * grid_cols * prow * pcol
        view = self.out[self.offset : self.offset + count].view(
            grid_rows, grid_cols, prow, pcol, _CHANNELS, p, p
        )
        self.offset += count
        return view

    def _tiles(self, hwc: torch.Tensor, grid_rows: int, grid_cols: int, piece: Size) -> torch.Tensor:
        """(H, W, C) cut into a rows x cols grid of pieces, each into P x P patches, as a strided view."""
        p = self.patch
        prow, pcol = piece.height // p, piece.width // p
        # (rows, prow, P, cols, pcol, P, C) -> (rows, cols, prow, pcol, C, P, P): row-major pieces and patches
        return hwc.view(grid_rows, prow, p, grid_cols, pcol, p, _CHANNELS).permute(0, 3, 1, 4, 6, 2, 5)

    def write_uint8(self, hwc: torch.Tensor, grid_rows: int, grid_cols: int, piece: Size) -> None:
        """``pixel * scale + bias`` of a uint8 (H, W, C) image holding a grid of equal pieces.

        The strided gather into patch order moves bytes, not floats; widening and the multiply-add then
        run on contiguous rows (measured ~20% faster than one multiply-add over the strided view).
        """
        target = self._take(grid_rows, grid_cols, piece)
        staged = torch.empty(target.shape, dtype=torch.uint8)
        staged.copy_(self._tiles(hwc, grid_rows, grid_cols, piece))
        target.copy_(staged)
        rows = target.view(-1, self._scale_row.numel())
        rows.mul_(self._scale_row).add_(self._bias_row)

    def write_exact(self, image: Image.Image) -> None:
        """One PIL piece, rescaled and normalised with CLIPImageProcessor's numpy arithmetic."""
        pixels = np.asarray(image).astype(np.float64) * (1.0 / _UINT8_LEVELS)  # transformers' rescale
        pixels = pixels.astype(np.float32)
        mean = np.array(self.config.image_mean, dtype=np.float32)
        std = np.array(self.config.image_std, dtype=np.float32)
        normalised = torch.from_numpy((pixels - mean) / std)  # transformers' normalize, float32
        piece = Size(image.size[0], image.size[1])
        self._take(1, 1, piece).copy_(self._tiles(normalised, 1, 1, piece))


def draft_size(plan: SlicePlan) -> tuple[int, int]:
    """The (width, height) a JPEG may be DCT-decoded down to for ``plan``: its largest piece image times
    ``REDUCING_GAP``, so the antialiased bicubic resize that follows still downscales >= 2x."""
    largest = plan.refine_size or plan.overview
    return math.ceil(largest.width * REDUCING_GAP), math.ceil(largest.height * REDUCING_GAP)


def _pil_to_hwc(image: Image.Image) -> torch.Tensor:
    """(H, W, C) uint8 tensor over one copy of the PIL image's pixels (read-only: never written to)."""
    width, height = image.size
    with warnings.catch_warnings():  # torch warns that bytes are immutable; we only read them
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(image.tobytes(), dtype=torch.uint8)
    return flat.view(height, width, _CHANNELS)


def _resize_hwc(hwc: torch.Tensor, size: Size) -> torch.Tensor:
    """Bicubic antialiased resize of a uint8 (H, W, C) tensor to ``size`` (width, height)."""
    if (hwc.shape[1], hwc.shape[0]) == tuple(size):
        return hwc
    nchw = hwc.permute(2, 0, 1).unsqueeze(0)  # channels-last strides: torch's fast uint8 kernel
    out = F.interpolate(
        nchw, size=(size.height, size.width), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].permute(1, 2, 0)


def _reduce_factor(source: tuple[int, int], target: Size) -> int:
    """The integer box-reduce factor that keeps the remaining downscale >= REDUCING_GAP on both sides."""
    ratio = min(source[0] / target.width, source[1] / target.height)
    return max(math.floor(ratio / REDUCING_GAP), 1)


def _letterboxed(source: torch.Tensor, plan: SlicePlan) -> torch.Tensor:
    """The padded refine canvas of an ``anyres`` plan: ``source`` resized into the letterbox."""
    box, refine = plan.letterbox, plan.refine_size
    assert box is not None and refine is not None
    canvas = torch.tensor(PAD_FILL, dtype=torch.uint8).expand(refine.height, refine.width, _CHANNELS).clone()
    content = _resize_hwc(source, Size(box.width, box.height))
    canvas[box.top : box.top + box.height, box.left : box.left + box.width] = content
    return canvas


def _fast_pieces(image: Image.Image, plan: SlicePlan, writer: PatchWriter) -> None:
    refine = plan.refine_size
    box = plan.letterbox
    # the largest resize of the source: the refine image, or the letterboxed image and the base image
    targets = [refine or plan.overview] if box is None else [plan.overview, Size(box.width, box.height)]
    factor = min(_reduce_factor(image.size, target) for target in targets)
    source = _pil_to_hwc(image.reduce(factor) if factor > 1 else image)
    overview_source = source
    if refine is not None and plan.grid is not None and plan.slice_size is not None:
        refined = _resize_hwc(source, refine).contiguous() if box is None else _letterboxed(source, plan)
        writer.write_uint8(refined, plan.grid.rows, plan.grid.cols, plan.slice_size)
        if (
            box is None  # a padded canvas is not the whole image: the base image comes from the source
            and min(refine.width / plan.overview.width, refine.height / plan.overview.height)
            >= OVERVIEW_FROM_REFINE_GAP
        ):
            overview_source = refined
    overview = _resize_hwc(overview_source, plan.overview).contiguous()
    writer.write_uint8(overview, 1, 1, plan.overview)


def _exact_pieces(image: Image.Image, plan: SlicePlan, writer: PatchWriter) -> None:
    slices, overview = apply_plan(image, plan)
    for piece in (*slices, overview):
        writer.write_exact(piece)


def image_patches(
    images: Sequence[Image.Image],
    plans: Sequence[SlicePlan],
    config: SlicingConfig,
    mode: ResizeMode = "fast",
) -> torch.Tensor:
    """All pieces of all images as one (Pt, C*P*P) float32 tensor (docs/INTERFACES.md order).

    ``images`` are RGB PIL images at the size their plan was made for (in ``fast`` mode also a smaller
    copy with the same aspect ratio, e.g. a JPEG decoded at a reduced DCT scale).
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if len(images) != len(plans):
        raise ImageSizeError(f"got {len(images)} images but {len(plans)} plans")
    writer = PatchWriter(sum(plan.vit_patches for plan in plans), config)
    for image, plan in zip(images, plans, strict=True):
        _check_rgb(image, plan, mode)
        if mode == "exact":
            _exact_pieces(image, plan, writer)
        else:
            _fast_pieces(image, plan, writer)
    return writer.out


def patches_to_piece(patches: torch.Tensor, rows: int, cols: int, patch_size: int) -> torch.Tensor:
    """Inverse of the flattening for one piece: (rows*cols, C*P*P) -> (C, rows*P, cols*P).

    For tests and visualisation; the model never needs it.
    """
    p = patch_size
    grid = patches.view(rows, cols, _CHANNELS, p, p).permute(2, 0, 3, 1, 4)  # (C, rows, P, cols, P)
    return grid.reshape(_CHANNELS, rows * p, cols * p)
