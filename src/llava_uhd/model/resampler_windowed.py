"""The spatially constrained resampler of the released LLaVA-UHD checkpoint (the ``official-v1`` preset).

The paper's resampler (section 3.2) lets every query attend to all of a piece's features. The released
``llava-uhd-144-13b`` checkpoint constrains it spatially: the piece's feature map is cut into a
``G x G`` grid of windows (G = 12 for its 144 queries), each window is RoIAlign-pooled to a handful of
cells, and query ``i`` (row-major) attends only to window ``i``'s pooled keys and values. Everything
else is the paper resampler's (:class:`~llava_uhd.model.resampler_base.Resampler`), so the parameters
(and the checkpoint's key names) are the same:

    x = ln_kv(kv_proj(features))                       # (L, D)
    k = x + pos_embed resized bicubic to (rows, cols)  # positions added before pooling
    v = x
    k_w, v_w = RoIAlign(k), RoIAlign(v) per window     # (Q, ph*pw, D)
    q = ln_q(query) + pos_embed                        # (Q, D), one query per window
    out = MultiheadAttention(q_i, k_w[i], v_w[i])      # each query against its own window only
    y = ln_post(out) @ proj

Window geometry follows the released code: for a (rows x cols) feature map, window (i, j) spans
columns j*cols/G .. (j+1)*cols/G and rows i*rows/G .. (i+1)*rows/G as float boxes, and every window of
the map is pooled to the same (ph, pw), chosen from the map's aspect ratio (:func:`pooled_size`).

Dimensions: Pt packed patches, N pieces, B pieces of one grid shape, R x C a piece's patch grid
(rows x cols), G the window grid side, Q = G*G queries, ph x pw pooled cells per window, D width.
"""

from __future__ import annotations

import math

import torch

from llava_uhd.errors import ModelInputError
from llava_uhd.model.packing import gather_segments
from llava_uhd.model.resampler_base import Resampler
from llava_uhd.model.roi_align import roi_align_grid
from llava_uhd.model.windows import pooled_size


def window_bounds(rows: int, cols: int, grid_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float window edges of a (rows x cols) map cut into a grid_side x grid_side grid of windows.

    Returns:
        (row_bounds (G, 2) as (y1, y2), col_bounds (G, 2) as (x1, x2)), float32. Window (i, j) is
        rows ``row_bounds[i]`` x columns ``col_bounds[j]``.

    The released code derives the window height from the area per window, sqrt((R*C/Q) / (C/R)), and
    the width from the height times C/R; both equal R/G and C/G up to float rounding, and a window ends
    at its start plus that length. We do the same arithmetic so the float32 boxes match bit for bit.
    """
    if rows < 1 or cols < 1:
        raise ModelInputError(f"feature map must be at least 1x1 patches, got rows={rows}, cols={cols}")
    aspect = cols / rows
    height = math.sqrt(rows * cols / grid_side**2 / aspect)
    width = height * aspect
    row_bounds = [[i * height, i * height + height] for i in range(grid_side)]
    col_bounds = [[j * width, j * width + width] for j in range(grid_side)]
    return torch.tensor(row_bounds, dtype=torch.float32), torch.tensor(col_bounds, dtype=torch.float32)


class WindowedResampler(Resampler):
    """The released spatially constrained resampler: (Pt, Dv) packed features -> (N, Q, D) tokens.

    Constructor and parameters are :class:`~llava_uhd.model.resampler_base.Resampler`'s, as for the
    perceiver; only the attention pattern differs (one window per query). Pieces of one grid shape are
    pooled and attended together; the loop runs over the distinct shapes of a batch (two for a sliced
    image).
    """

    def pool_windows(self, maps: torch.Tensor) -> torch.Tensor:
        """RoIAlign every window of B same-shape maps: (B, R, C, D) -> (B, Q, ph*pw, D).

        Pooled cells of a window are row-major (ph, pw), as in the released code's flatten.
        """
        batch, rows, cols, dim = maps.shape
        row_bounds, col_bounds = window_bounds(rows, cols, self.grid_side)
        # The released code casts its float32 boxes to the features' dtype before RoIAlign (which then runs
        # in float32), so in half precision its window edges are rounded to that dtype; so are ours.
        row_bounds, col_bounds = (b.to(maps.dtype).to(torch.float32) for b in (row_bounds, col_bounds))
        pooled_h, pooled_w = pooled_size(rows, cols)
        channels_first = maps.permute(0, 3, 1, 2)  # (B, D, R, C)
        pooled = roi_align_grid(
            channels_first, row_bounds.to(maps.device), col_bounds.to(maps.device), (pooled_h, pooled_w)
        )  # (B, G, G, D, ph, pw), computed in float32 and cast back
        pooled = pooled.permute(0, 1, 2, 4, 5, 3)  # (B, G, G, ph, pw, D)
        return pooled.reshape(batch, self.num_queries, pooled_h * pooled_w, dim)

    def forward(self, features: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
        """(Pt, Dv) packed features of N pieces with (N, 2) (rows, cols) grids -> (N, Q, D) tokens."""
        # keys carry their positions before pooling
        counts, keys, values = self.keys_and_values(features, piece_grids)  # (N,), (Pt, D), (Pt, D)
        query = self.queries().to(values.dtype)  # (Q, D)
        out = values.new_empty(counts.numel(), self.num_queries, self.embed_dim)
        grids = piece_grids.to(values.device)
        shapes, shape_of_piece = torch.unique(grids, dim=0, return_inverse=True)  # (U, 2), (N,)
        for index, (rows, cols) in enumerate(shapes.tolist()):
            pieces = torch.nonzero(shape_of_piece == index).squeeze(1)  # (B,)
            patch_rows = gather_segments(counts, pieces)  # (B * R * C,) packed rows of these pieces
            # keys and values pooled in one call: (B, R, C, 2D)
            maps = torch.cat([keys[patch_rows], values[patch_rows]], dim=-1).view(
                -1, rows, cols, 2 * self.embed_dim
            )
            pooled = self.pool_windows(maps)  # (B, Q, ph*pw, 2D)
            batch, _, cells, _ = pooled.shape
            pooled = pooled.reshape(batch * self.num_queries, cells, 2 * self.embed_dim)
            k_win, v_win = pooled.split(self.embed_dim, dim=-1)  # (B*Q, ph*pw, D) each
            q_win = query.repeat(batch, 1).unsqueeze(1)  # (B*Q, 1, D): query i meets window i only
            attended, _ = self.attn(q_win, k_win, v_win, need_weights=False)  # (B*Q, 1, D)
            out.index_copy_(0, pieces, attended.view(batch, self.num_queries, self.embed_dim))
        return self.output(out)
