"""Position tables: fixed 2D sin-cos tables and bicubic resizing of square tables to any patch grid.

Both the ViT (its 24x24 CLIP table) and the resampler (its 8x8 or 12x12 sin-cos
table added to the keys, section 5) resize a square table to a piece's (rows, cols) patch grid with the
same function, in float32 whatever the model's dtype, then cast back; :func:`positions_per_patch` does it
once per distinct grid of a batch and hands every packed patch its row.

Dimensions: R, C = rows and columns of a grid; D = channels; N pieces, U distinct grids, Pt patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llava_uhd.errors import ModelInputError
from llava_uhd.model.packing import gather_segments


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) table: sin of the first half of the frequencies, cos of the second."""
    if dim % 2:
        raise ModelInputError(f"1D sin-cos dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, dim) float32 table, rows enumerated row-major (MAE's recipe).

    The first half of the channels encodes the column, the second half the row.
    """
    if dim % 4:
        raise ModelInputError(f"2D sin-cos dimension must be a multiple of 4, got {dim}")
    row_idx, col_idx = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )
    emb_col = sincos_1d(dim // 2, col_idx.reshape(-1))
    emb_row = sincos_1d(dim // 2, row_idx.reshape(-1))
    return torch.cat([emb_col, emb_row], dim=1).float()


def resize_grid_table(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bicubically resize a square (S*S, D) table to (rows * cols, D), row-major.

    align_corners=False, computed in float32 and cast back to the table's dtype; returns the table
    itself when the size already matches.
    """
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ModelInputError(f"position table with {table.shape[0]} rows is not a square grid")
    if (rows, cols) == (side, side):
        return table
    grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, S, S)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(table.dtype)


def positions_per_patch(table: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
    """A square (S*S, D) table resized to each of N pieces' (rows, cols): (Pt, D), pieces packed in order.

    Each distinct grid is resized once into a bank of tables; every patch then gathers its row from the
    bank by index, with no loop over pieces.
    """
    shapes, shape_of_piece = torch.unique(piece_grids, dim=0, return_inverse=True)  # (U, 2), (N,)
    bank = torch.cat([resize_grid_table(table, rows, cols) for rows, cols in shapes.tolist()])
    return bank[gather_segments(shapes.prod(dim=1), shape_of_piece)]
