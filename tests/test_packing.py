"""Packed-index arithmetic: exact values of every mapping between segments and packed rows."""

from __future__ import annotations

import pytest
import torch

from llava_uhd.errors import ModelInputError
from llava_uhd.model.packing import (
    check_piece_grids,
    cu_seqlens,
    gather_segments,
    padding_mask,
    segment_ids,
    segment_slots,
)

LENGTHS = torch.tensor([2, 0, 3, 1])  # an empty segment in the middle must vanish from every row view


def test_offsets_and_segment_of_every_row():
    assert cu_seqlens(LENGTHS).tolist() == [0, 2, 2, 5, 6]
    assert cu_seqlens(LENGTHS).dtype == torch.int64
    assert segment_ids(LENGTHS).tolist() == [0, 0, 2, 2, 2, 3]


def test_segment_slots_move_each_segment_to_its_start():
    padded = segment_slots(LENGTHS, torch.arange(4) * 3)  # an (N, 3) padded block
    assert padded.tolist() == [0, 1, 6, 7, 8, 9]
    assert segment_slots(LENGTHS, torch.tensor([10, 0, 20, 30])).tolist() == [10, 11, 20, 21, 22, 30]


def test_gather_segments_reorders_repeats_and_drops():
    rows = torch.arange(6) * 10  # row r holds 10 * r
    assert rows[gather_segments(LENGTHS, torch.tensor([3, 2, 0]))].tolist() == [50, 20, 30, 40, 0, 10]
    assert rows[gather_segments(LENGTHS, torch.tensor([0, 0, 3]))].tolist() == [0, 10, 0, 10, 50]
    assert gather_segments(LENGTHS, torch.tensor([1])).tolist() == []


def test_padding_mask_marks_pads():
    assert padding_mask(torch.tensor([1, 3]), 3).tolist() == [[False, True, True], [False, False, False]]


def test_check_piece_grids_returns_patch_counts_and_names_bad_values():
    assert check_piece_grids(torch.tensor([[2, 3], [1, 1]], dtype=torch.int32)).tolist() == [6, 1]
    with pytest.raises(ModelInputError, match=r"\(N, 2\) as \(rows, cols\) with N >= 1, got shape \(2,\)"):
        check_piece_grids(torch.tensor([2, 2]))
    with pytest.raises(ModelInputError, match=r"got shape \(0, 2\)"):
        check_piece_grids(torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ModelInputError, match=r"positive integers, got \[\[2.0, 3.0\]\]"):
        check_piece_grids(torch.tensor([[2.0, 3.0]]))
