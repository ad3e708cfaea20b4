"""Image modularization (LLaVA-UHD paper section 3.1; docs/design.md section 3). Pure Python, no torch.

:func:`plan_slices` decides, from an image's size alone, how it is cut: a grid of equally sized slices
whose area and aspect ratio stay close to the ViT's pre-training shape, plus a low-resolution overview.
It reproduces the released code's arithmetic exactly (truncating ``int()``, floor-based rounding to the
patch size, strict-< tie breaking), because a one-pixel difference changes the ViT's input.
:func:`apply_plan` then cuts a PIL image: one bicubic resize to the refine size, row-major crops, and
one bicubic resize for the overview. :func:`overview_plan` drops a plan's slices.

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

    @property
    def planned(self) -> Size:
        """The size the geometry was computed for: the pre-resized size if any, else the input size."""
        return self.pre_resized if self.pre_resized is not None else Size(self.width, self.height)

    @property
    def num_slices(self) -> int:
        return 0 if self.grid is None else self.grid.rows * self.grid.cols

    @property
    def refine_size(self) -> Size | None:
        """The size the whole image is resized to before it is cut into slices."""
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
    if num_slices <= 1:
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


def overview_plan(plan: SlicePlan) -> SlicePlan:
    """The same plan without slices: its only piece is the overview (the paper's stage 1 trains on it)."""
    return dataclasses.replace(plan, grid=None, slice_size=None)


def apply_plan(
    image: Image.Image, plan: SlicePlan, resample: int | None = None
) -> tuple[list[Image.Image], Image.Image]:
    """Cut an RGB PIL image by ``plan``: returns (slices in row-major order, overview).

    One bicubic resize of the whole image to the refine size, then crops; one bicubic resize of the whole
    image to the overview size. The image's size must be the size the plan was made for (pre-resize,
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
    if plan.refine_size is None:
        return [], overview
    refine = image.resize(plan.refine_size, bicubic)
    return [refine.crop(box) for box in plan.slice_boxes()], overview
