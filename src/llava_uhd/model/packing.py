"""Index arithmetic for segments laid end to end ("packed") along one dimension of a tensor.

A batch's pieces are packed (docs/INTERFACES.md): piece i's patches are rows ``[start_i, start_i + n_i)``
of one (Pt, ...) tensor, in piece order. Every move between the per-piece and the per-row view (the ViT's
packed sequence, the position rows of each patch, the resamplers' padded keys, beam search repeating a
row's pieces) is one of these pure functions of the (N,) segment lengths, with no loop over segments.

Dimensions: N segments, L rows of all segments (sum of the lengths), n_i the length of segment i, W a
padded width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_uhd.errors import ModelInputError


def check_piece_grids(piece_grids: torch.Tensor) -> torch.Tensor:
    """Validate (N >= 1, 2) (rows, cols) piece grids; return the (N,) int64 patch count of each piece."""
    if piece_grids.ndim != 2 or piece_grids.shape[1] != 2 or piece_grids.shape[0] == 0:
        raise ModelInputError(
            f"piece_grids must be (N, 2) as (rows, cols) with N >= 1, got shape {tuple(piece_grids.shape)}"
        )
    if piece_grids.is_floating_point() or bool((piece_grids < 1).any()):
        raise ModelInputError(f"piece_grids must be positive integers, got {piece_grids.tolist()}")
    return piece_grids.to(torch.int64).prod(dim=1)


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) lengths -> (N + 1,) int64 offsets of each segment's first row, ending with the total L."""
    return F.pad(lengths.to(torch.int64).cumsum(0), (1, 0))


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) lengths -> (L,) index of the segment each row belongs to."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def segment_slots(lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(L,) destination of every row when segment i is moved to start at ``starts[i]``.

    Row r of segment i (its k-th row) goes to ``starts[i] + k``: e.g. ``starts = arange(N) * W`` lays the
    segments into an (N, W) padded block, ``starts`` from a sorted order repacks them in that order.
    """
    segments = segment_ids(lengths)
    within = torch.arange(segments.numel(), device=lengths.device) - cu_seqlens(lengths)[segments]
    return starts[segments] + within


def gather_segments(lengths: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Row indices that lay out the segments of (N,) ``lengths`` in ``order`` (indices may repeat or be
    left out): ``x[gather_segments(lengths, order)]`` is segments ``order[0], order[1], ...`` end to end."""
    return segment_slots(lengths[order], cu_seqlens(lengths)[:-1][order])


def padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(N, W) boolean mask of segments padded to ``width``: True on the pad positions."""
    return torch.arange(width, device=lengths.device)[None, :] >= lengths[:, None]
