"""Image modularization (LLaVA-UHD paper section 3.1; docs/design.md section 3). Pure Python, no torch.

:func:`plan_slices` decides, from an image's size alone, how it is cut: a grid of equally sized slices
whose area and aspect ratio stay close to the ViT's pre-training shape, plus a low-resolution overview.
It reproduces the released code's arithmetic exactly (truncating ``int()``, floor-based rounding to the
patch size, strict-< tie breaking), because a one-pixel difference changes the ViT's input.
:func:`apply_plan` then cuts a PIL image: one bicubic resize to the refine size, row-major crops, and
one bicubic resize for the overview. :func:`overview_plan` drops a plan's slices.

``SlicingConfig.mode`` also plans the two encodings the paper measures itself against, so they run
through the same processor, token layout and FLOPs accounting (docs/design.md section 3.4):

``resize`` (LLaVA-1.5)
    One S x S bicubic resize of the whole image, aspect ratio not kept, no slices: the plan's overview.
``anyres`` (LLaVA-NeXT)
    The canvas of :data:`ANYRES_CANVASES` (in S x S tiles) that :func:`anyres_grid` picks; the image is
    resized keeping its aspect to fit it, centred on it with :data:`PAD_FILL` around
    (:func:`letterbox`), and the canvas is cut into S x S tiles (the plan's slices, in the spatial
    schema); the whole image squashed to S x S is the base image (the plan's overview).

All sizes are ``Size(width, height)``; grids are ``Grid(rows, cols)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from llava_uhd.config import SlicingConfig
from llava_uhd.errors import ImageSizeError, PlanLimitError

if TYPE_CHECKING:
    from PIL import Image


class Size(NamedTuple):
    """A size in pixels, width first (PIL's order)."""

    width: int
    height: int


class Grid(NamedTuple):
    """A slice grid: rows first."""

    rows: int
    cols: int


class Letterbox(NamedTuple):
    """Where the resized image lies inside a padded refine canvas (``anyres``), in canvas pixels."""

    left: int
    top: int
    width: int
    height: int


# LLaVA-NeXT's grid pinpoints (336x672, 672x336, 672x672, 1008x336, 336x1008 as width x height), in
# tiles and in its order, which decides ties: 1 col x 2 rows, 2x1, 2x2, 3x1, 1x3.
ANYRES_CANVASES: tuple[Grid, ...] = (
    Grid(rows=2, cols=1),
    Grid(rows=1, cols=2),
    Grid(rows=2, cols=2),
    Grid(rows=1, cols=3),
    Grid(rows=3, cols=1),
)
# LLaVA-NeXT pads its canvas with black (its resize_and_pad_image; transformers' LlavaNextImageProcessor
# pads with 0 too): the baseline as published, not one tuned to synthdoc's light pages.
PAD_FILL = (0, 0, 0)


@dataclass(frozen=True)
class SlicePlan:
    """How one image is cut. Pieces are the slices in row-major order, then the overview."""

    width: int  # the input size as given
    height: int
    patch_size: int
    overview: Size
    grid: Grid | None = None  # None: the image is not sliced, the overview is the only piece
    slice_size: Size | None = None
    pre_resized: Size | None = None  # set when the long side was resized before planning
    letterbox: Letterbox | None = None  # anyres: the image fills only this box of the padded refine canvas

    @property
    def planned(self) -> Size:
        """The size the geometry was computed for: the pre-resized size if any, else the input size."""
        return self.pre_resized if self.pre_resized is not None else Size(self.width, self.height)

    @property
    def num_slices(self) -> int:
        return 0 if self.grid is None else self.grid.rows * self.grid.cols

    @property
    def refine_size(self) -> Size | None:
        """The size of the image that is cut into slices: the whole image resized to it, or (with a
        ``letterbox``) the padded canvas the resized image is pasted on."""
        if self.grid is None or self.slice_size is None:
            return None
        return Size(self.slice_size.width * self.grid.cols, self.slice_size.height * self.grid.rows)

    @property
    def slices(self) -> tuple[Size, ...]:
        return (self.slice_size,) * self.num_slices if self.slice_size is not None else ()

    @property
    def pieces(self) -> tuple[Size, ...]:
        """Every piece the ViT encodes, in LLM order: slices row-major, then the overview."""
        return (*self.slices, self.overview)

    @property
    def separators(self) -> tuple[str, ...]:
        """The separator after each slice: "," inside a row, "\\n" at the end of a row."""
        if self.grid is None:
            return ()
        cols = self.grid.cols
        return tuple("\n" if (i + 1) % cols == 0 else "," for i in range(self.num_slices))

    @property
    def piece_grids(self) -> tuple[Grid, ...]:
        """Each piece's ViT patch grid (rows, cols), in piece order."""
        p = self.patch_size
        return tuple(Grid(s.height // p, s.width // p) for s in self.pieces)

    @property
    def vit_patches(self) -> int:
        """ViT patches over all pieces (CLS tokens not counted)."""
        return sum(g.rows * g.cols for g in self.piece_grids)

    def slice_boxes(self) -> tuple[tuple[int, int, int, int], ...]:
        """(left, top, right, bottom) of each slice inside the refine image, row-major."""
        if self.grid is None or self.slice_size is None:
            return ()
        sw, sh = self.slice_size
        return tuple(
            (c * sw, r * sh, (c + 1) * sw, (r + 1) * sh)
            for r in range(self.grid.rows)
            for c in range(self.grid.cols)
        )


def ensure_divide(length: float, multiple: int) -> int:
    """Round ``length`` down to a multiple of ``multiple``, but never below ``multiple``."""
    return max(math.floor(length / multiple) * multiple, multiple)


def best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int, upscale: bool) -> Size:
    """Keep the aspect ratio, bring the area to about ``scale_resolution**2``, snap sides to the patch.

    Images already below that area are left alone unless ``upscale``. The truncations are the
    released code's: ``h = int(S / sqrt(r))`` and then ``w = int(h * r)`` from the truncated ``h``.
    """
    width, height = _area_resize(size, scale_resolution, upscale)
    return Size(ensure_divide(width, patch_size), ensure_divide(height, patch_size))


def _area_resize(size: tuple[float, float], scale_resolution: int, upscale: bool) -> tuple[float, float]:
    """:func:`best_resize` before the snap to the patch size (a side of 0 here means a degenerate piece)."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return width, height


def _check_aspect(
    width: int, height: int, size: tuple[float, float], scale_resolution: int, upscale: bool, piece: str
) -> None:
    """Refuse a plan whose piece no longer keeps the image's aspect: past about S^2 : 1 the released
    code's truncation makes a side 0, which ``ensure_divide`` would silently turn into one patch."""
    w, h = _area_resize(size, scale_resolution, upscale)
    if w < 1 or h < 1:
        raise ImageSizeError(
            f"image size {width}x{height}: its aspect ratio is too extreme to slice (the {piece} would be "
            f"{int(w)}x{int(h)} pixels before snapping to the patch grid, so the pieces could not keep the "
            f"image's shape); crop or pad it to an aspect ratio under about {scale_resolution * scale_resolution}:1"
        )


def candidate_grids(num_slices: int, max_slices: int) -> list[Grid]:
    """Grids with N-1, N or N+1 slices (not 1, not above the maximum), columns ascending within each."""
    grids = []
    for k in (num_slices - 1, num_slices, num_slices + 1):
        if k == 1 or k > max_slices or k < 1:
            continue
        grids.extend(Grid(rows=k // cols, cols=cols) for cols in range(1, k + 1) if k % cols == 0)
    return grids


def choose_grid(width: int, height: int, grids: list[Grid]) -> Grid:
    """The grid whose cols/rows ratio is closest to the image's in log space; the first wins ties."""
    log_ratio = math.log(width / height)
    best, best_error = grids[0], float("inf")
    for grid in grids:
        error = abs(log_ratio - math.log(grid.cols / grid.rows))
        if error < best_error:  # strict: on a tie the earlier grid stays
            best, best_error = grid, error
    return best


def pre_resize_size(width: int, height: int, long_side: int) -> Size:
    """The released evaluation's resize so the long side is exactly ``long_side`` (up or down).

    A square keeps ``height = long_side`` and gets ``width = int(L / H * W)``, which float rounding can
    make ``L - 1`` (474x474 -> 1023x1024); we reproduce that.
    """
    if width > height:
        return Size(long_side, int(long_side / width * height))
    return Size(int(long_side / height * width), long_side)


def _check_size(width: object, height: object) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ImageSizeError(f"image {name} must be an integer, got {value!r}")
    if width < 1 or height < 1:  # type: ignore[operator]
        raise ImageSizeError(f"image size {width}x{height} has a side of 0 pixels or less")


def plan_slices(width: int, height: int, config: SlicingConfig | None = None) -> SlicePlan:
    """Plan how an image of ``width`` x ``height`` pixels is cut (docs/design.md section 3).

    Raises:
        ImageSizeError: a side is not a positive integer, the size is over ``max_image_pixels``, the pre-resize makes one 0 pixels, or the aspect
            ratio is so extreme that a piece would truncate to a side of 0 pixels.
        PlanLimitError: the plan needs more ViT patches than ``config.max_vit_patches``.
    """
    cfg = config or SlicingConfig()
    _check_size(width, height)
    if width * height > cfg.max_image_pixels:  # the limit image files meet, for sizes given as numbers too
        raise ImageSizeError(
            f"image size {width}x{height} = {width * height} pixels is over the limit "
            f"max_image_pixels={cfg.max_image_pixels}; raise it with --max-image-pixels N or "
            f"SlicingConfig(max_image_pixels=N) if the image is genuine"
        )
    w, h = width, height
    pre_resized = None
    if cfg.pre_resize_long_side is not None:
        w, h = pre_resize_size(width, height, cfg.pre_resize_long_side)
        if w < 1 or h < 1:
            raise ImageSizeError(
                f"image size {width}x{height} becomes {w}x{h} after resizing the long side to "
                f"{cfg.pre_resize_long_side}: a side of 0 pixels cannot be sliced"
            )
        pre_resized = Size(w, h)
    S, P, M = cfg.scale_resolution, cfg.patch_size, cfg.max_slices
    num_slices = min(math.ceil(w * h / (S * S)), M)
    if cfg.mode != "uhd":
        plan = _plan_baseline(width, height, (w, h), cfg, pre_resized)
    elif num_slices <= 1:
        _check_aspect(width, height, (w, h), S, cfg.upscale_small, "overview")
        overview = best_resize((w, h), S, P, upscale=cfg.upscale_small)
        plan = SlicePlan(width, height, P, overview=overview, pre_resized=pre_resized)
    else:
        grid = choose_grid(w, h, candidate_grids(num_slices, M))
        refine_w = ensure_divide(w, grid.cols)
        refine_h = ensure_divide(h, grid.rows)
        slice_shape = (refine_w / grid.cols, refine_h / grid.rows)
        _check_aspect(width, height, slice_shape, S, True, "slices")
        _check_aspect(width, height, (w, h), S, False, "overview")
        slice_size = best_resize(slice_shape, S, P, upscale=True)
        overview = best_resize((w, h), S, P, upscale=False)
        plan = SlicePlan(width, height, P, overview, grid, slice_size, pre_resized)

    if plan.vit_patches > cfg.max_vit_patches:
        raise PlanLimitError(
            f"image size {width}x{height} needs {plan.vit_patches} ViT patches "
            f"(pieces {', '.join(f'{s.width}x{s.height}' for s in plan.pieces)}), over the limit "
            f"max_vit_patches={cfg.max_vit_patches}; raise it (--max-vit-patches N, or "
            f"SlicingConfig(max_vit_patches=N)) if you really want this"
        )
    return plan


def anyres_grid(width: int, height: int, tile: int, max_tiles: int) -> Grid | None:
    """LLaVA-NeXT's choice of canvas for an image of ``width`` x ``height`` (its select_best_resolution).

    Among the :data:`ANYRES_CANVASES` of at most ``max_tiles`` tiles of ``tile`` pixels, the one where the
    image, scaled to fit (``int()`` of each side), shows the most of its own pixels (never counting more
    than the image has, so small images do not favour big canvases), then the one with the least canvas
    area left over; on a full tie the earlier canvas stays. None if no canvas has few enough tiles.
    """
    best, best_effective, best_wasted = None, 0, math.inf
    for grid in ANYRES_CANVASES:
        if grid.rows * grid.cols > max_tiles:
            continue
        canvas_w, canvas_h = grid.cols * tile, grid.rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = grid, effective, wasted
    return best


def letterbox(width: int, height: int, canvas: Size) -> Letterbox:
    """Fit ``width`` x ``height`` into ``canvas`` keeping the aspect ratio, centred (LLaVA-NeXT's rule).

    The side whose scale is smaller fills the canvas; the other is ``ceil(side * scale)`` (at most the
    canvas). The offsets are the floor of half the slack, so an odd remainder pads the right or bottom.
    """
    scale_w, scale_h = canvas.width / width, canvas.height / height
    if scale_w < scale_h:
        new_w, new_h = canvas.width, min(math.ceil(height * scale_w), canvas.height)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), canvas.width), canvas.height
    return Letterbox((canvas.width - new_w) // 2, (canvas.height - new_h) // 2, new_w, new_h)


def _plan_baseline(
    width: int, height: int, planned: tuple[int, int], cfg: SlicingConfig, pre_resized: Size | None
) -> SlicePlan:
    """The ``resize`` and ``anyres`` plans (module docstring); ``planned`` is the size after any pre-resize."""
    S, P = cfg.scale_resolution, cfg.patch_size
    square = Size(S, S)
    grid = anyres_grid(*planned, S, cfg.max_slices) if cfg.mode == "anyres" else None
    if grid is None:  # resize, or anyres under a slice limit below every canvas: the base image alone
        return SlicePlan(width, height, P, overview=square, pre_resized=pre_resized)
    box = letterbox(*planned, Size(grid.cols * S, grid.rows * S))
    return SlicePlan(width, height, P, square, grid, square, pre_resized, box)


def overview_plan(plan: SlicePlan) -> SlicePlan:
    """The same plan without slices: its only piece is the overview (the paper's stage 1 trains on it)."""
    return dataclasses.replace(plan, grid=None, slice_size=None, letterbox=None)


def refine_image(image: Image.Image, plan: SlicePlan, resample: int | None = None) -> Image.Image | None:
    """The image the slices are cut from: ``image`` (at the planned size) resized to the refine size,
    or resized into the plan's letterbox on a :data:`PAD_FILL` canvas; None for an unsliced plan."""
    from PIL import Image as PILImage

    bicubic = PILImage.Resampling.BICUBIC if resample is None else resample
    if plan.refine_size is None:
        return None
    if plan.letterbox is None:
        return image.resize(plan.refine_size, bicubic)
    box = plan.letterbox
    canvas = PILImage.new("RGB", plan.refine_size, PAD_FILL)
    canvas.paste(image.resize((box.width, box.height), bicubic), (box.left, box.top))
    return canvas


def apply_plan(
    image: Image.Image, plan: SlicePlan, resample: int | None = None
) -> tuple[list[Image.Image], Image.Image]:
    """Cut an RGB PIL image by ``plan``: returns (slices in row-major order, overview).

    One bicubic resize of the whole image to the refine size (or into its letterbox), then crops; one
    bicubic resize of the whole image to the overview size. The image's size must be the size the plan was made for (pre-resize,
    if any, is applied here first).
    """
    from PIL import Image as PILImage

    bicubic = PILImage.Resampling.BICUBIC if resample is None else resample
    if image.size != (plan.width, plan.height):
        raise ImageSizeError(
            f"image is {image.size[0]}x{image.size[1]} but the plan was made for {plan.width}x{plan.height}"
        )
    if plan.pre_resized is not None:
        image = image.resize(plan.pre_resized, bicubic)
    overview = image.resize(plan.overview, bicubic)
    refine = refine_image(image, plan, bicubic)
    if refine is None:
        return [], overview
    return [refine.crop(box) for box in plan.slice_boxes()], overview
