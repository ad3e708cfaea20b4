"""Dense per-patch labels of a synthdoc page as each piece of the model sees it (vision pretraining targets).

A :class:`View` maps page pixels to a piece's pixels (``piece = page * scale - offset``): the slices of a
:class:`~llava_uhd.slicing.SlicePlan` are crops of the page resized to the refine size (or into its
letterbox), the overview is the page resized to the overview size, and a window cut from a piece is
that piece's view shifted. On a view two targets are read off the drawn
:class:`~llava_uhd.synth.synthdoc.Document`:

* glyphs: each patch is split into 2 x 2 sub-cells; a sub-cell's target is the character whose ink centre
  lies in it, or :data:`GLYPH_NONE`. Asking "which character is centred here" keeps the target sharp
  when a glyph straddles two patches;
* colours: a patch's target is the colour of the box whose rectangle holds the patch's centre, or
  :data:`COLOUR_NONE`, so the tokens around a code also carry its box's colour.

Pure numpy; the trainer turns the arrays into tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llava_uhd.slicing import SlicePlan
from llava_uhd.synth.synthdoc import CODE_ALPHABET, COLOURS, Document

SUBCELLS = 2  # sub-cells per patch side: 2 x 2 = 4 glyph targets per patch
GLYPH_CLASSES = len(CODE_ALPHABET) + 1
GLYPH_NONE = len(CODE_ALPHABET)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_CLASSES = len(COLOUR_NAMES) + 1
COLOUR_NONE = len(COLOUR_NAMES)


@dataclass(frozen=True)
class View:
    """A piece's window onto the page: ``piece_x = page_x * scale_x - offset_x``; ``rows x cols`` patches."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    rows: int
    cols: int

    def crop(self, left: int, top: int, rows: int, cols: int) -> View:
        """The view of a window of ``rows x cols`` patches whose top-left is at piece pixel (left, top)."""
        return View(self.scale_x, self.scale_y, self.offset_x + left, self.offset_y + top, rows, cols)


def piece_views(plan: SlicePlan) -> list[View]:
    """One view per piece of ``plan``, in piece order (slices row-major, then the overview)."""
    w, h = plan.width, plan.height
    p = plan.patch_size
    views = []
    if plan.refine_size is not None:
        box = plan.letterbox  # anyres: the page fills only this box of the padded canvas
        placed = plan.refine_size if box is None else box
        sx, sy = placed.width / w, placed.height / h
        shift_x, shift_y = (0, 0) if box is None else (box.left, box.top)
        for left, top, right, bottom in plan.slice_boxes():
            views.append(
                View(sx, sy, left - shift_x, top - shift_y, (bottom - top) // p, (right - left) // p)
            )
    ov = plan.overview
    views.append(View(ov.width / w, ov.height / h, 0.0, 0.0, ov.height // p, ov.width // p))
    return views


def glyph_targets(doc: Document, view: View, patch_size: int) -> np.ndarray:
    """(rows * cols, 4) int64: per patch, per sub-cell (row-major), the character index or GLYPH_NONE."""
    out = np.full((view.rows * view.cols, SUBCELLS * SUBCELLS), GLYPH_NONE, dtype=np.int64)
    cell = patch_size / SUBCELLS
    for glyph in doc.glyphs:
        gx, gy = glyph.centre
        x, y = gx * view.scale_x - view.offset_x, gy * view.scale_y - view.offset_y
        col, row = math.floor(x / patch_size), math.floor(y / patch_size)
        if not (0 <= col < view.cols and 0 <= row < view.rows):
            continue
        sub_col = min(int((x - col * patch_size) // cell), SUBCELLS - 1)
        sub_row = min(int((y - row * patch_size) // cell), SUBCELLS - 1)
        out[row * view.cols + col, sub_row * SUBCELLS + sub_col] = CODE_ALPHABET.index(glyph.char)
    return out


def colour_targets(doc: Document, view: View, patch_size: int) -> np.ndarray:
    """(rows * cols,) int64: per patch, the colour index of the box holding its centre, or COLOUR_NONE."""
    cols, rows = np.meshgrid(np.arange(view.cols), np.arange(view.rows))
    page_x = ((cols.ravel() + 0.5) * patch_size + view.offset_x) / view.scale_x
    page_y = ((rows.ravel() + 0.5) * patch_size + view.offset_y) / view.scale_y
    out = np.full(view.rows * view.cols, COLOUR_NONE, dtype=np.int64)
    for box in doc.boxes:
        left, top, right, bottom = box.rect
        inside = (page_x >= left) & (page_x < right) & (page_y >= top) & (page_y < bottom)
        out[inside] = COLOUR_NAMES.index(box.colour)
    return out
