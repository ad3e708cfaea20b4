"""Slicing geometry: worked examples, an independent reference over hundreds of sizes, properties, limits."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_uhd.config import OFFICIAL_V1, PAPER, SlicingConfig
from llava_uhd.errors import ImageSizeError, PlanLimitError
from llava_uhd.layout import visual_token_count
from llava_uhd.slicing import Grid, Size, apply_plan, candidate_grids, plan_slices


def reference_plan(W: int, H: int, S: int = 336, P: int = 14, M: int = 6, upscale: bool = True):
    """The released code's recipe, transcribed independently from docs/design.md section 3.

    Returns ((cols, rows) or None, (slice_w, slice_h) or None, (overview_w, overview_h)).
    """

    def divide(length, k):
        return max(int(length // k) * k, k) if length >= 0 else k

    def resize(w, h, up):
        if w * h > S * S or up:
            r = w / h
            h = int(S / math.sqrt(r))
            w = int(h * r)
        return divide(w, P), divide(h, P)

    n = min(math.ceil(W * H / (S * S)), M)
    if n <= 1:
        return None, None, resize(W, H, upscale)
    pairs = []
    for k in [n - 1, n, n + 1]:
        if k == 1 or k > M:
            continue
        pairs += [(c, k // c) for c in range(1, k + 1) if k % c == 0]
    errors = [abs(math.log(W / H) - math.log(c / r)) for c, r in pairs]
    best = pairs[errors.index(min(errors))]  # index() finds the first minimum: ties keep the earlier grid
    cols, rows = best
    sw, sh = resize(divide(W, cols) / cols, divide(H, rows) / rows, True)
    return best, (sw, sh), resize(W, H, False)


def _as_tuple(plan):
    grid = None if plan.grid is None else (plan.grid.cols, plan.grid.rows)
    return grid, None if plan.slice_size is None else tuple(plan.slice_size), tuple(plan.overview)


WORKED = [
    # (W, H) -> (cols, rows), slice size, overview size   (docs/design.md section 3)
    ((640, 480), (2, 2), (378, 280), (378, 280)),
    ((1024, 768), (3, 2), (308, 350), (378, 280)),
    ((1920, 1080), (3, 2), (364, 308), (448, 252)),
    ((672, 1008), (2, 3), (336, 336), (266, 406)),
    ((4000, 100), (5, 1), (938, 112), (2114, 42)),
    ((10, 300), None, None, (56, 1834)),
    ((1, 1), None, None, (336, 336)),
    ((337, 336), (2, 1), (224, 462), (322, 322)),
]


@pytest.mark.parametrize(("size", "grid", "slice_size", "overview"), WORKED)
def test_worked_examples(size, grid, slice_size, overview):
    plan = plan_slices(*size, PAPER.slicing)
    assert _as_tuple(plan) == (grid, slice_size, overview)


def test_square_six_slices_prefers_three_cols_by_the_last_bit():
    # log(3/2) and -log(2/3) differ in the last bit; the released code picks 3 cols x 2 rows
    side = int(math.sqrt(5.5 * 336 * 336))
    plan = plan_slices(side, side, PAPER.slicing)
    assert plan.grid == Grid(rows=2, cols=3)


def _curated_sizes() -> list[tuple[int, int]]:
    S = 336
    sizes = {(1, 1), (2, 3), (13, 13), (14, 14), (15, 15), (335, 336), (336, 336), (337, 336), (336, 337)}
    for k in range(1, 10):  # area boundaries: exactly k*S*S and one pixel either side
        side = round(math.sqrt(k) * S)
        sizes |= {(k * S, S), (S, k * S), (k * S + 1, S), (k * S - 1, S), (side, side), (side + 1, side)}
    for extreme in (1000, 4000, 10000, 30000):
        sizes |= {(extreme, 1), (1, extreme), (extreme, 7), (7, extreme), (extreme, 100)}
    sizes |= {(20000, 20000), (100000, 3000), (8192, 8192), (65535, 2), (3, 60000)}
    rng = random.Random(0)
    while len(sizes) < 600:
        w = int(math.exp(rng.uniform(0, math.log(20000))))
        h = int(math.exp(rng.uniform(0, math.log(20000))))
        sizes.add((max(w, 1), max(h, 1)))
    return sorted(sizes)


@pytest.mark.parametrize("max_slices", [6, 7, 9])
def test_matches_reference_on_hundreds_of_sizes(max_slices):
    config = SlicingConfig(max_slices=max_slices, max_vit_patches=10**12, max_image_pixels=10**15)
    mismatches = []
    for w, h in _curated_sizes():
        ours = _as_tuple(plan_slices(w, h, config))
        ref = reference_plan(w, h, M=max_slices)
        if ours != ref:
            mismatches.append(((w, h), ours, ref))
    assert not mismatches, mismatches[:5]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30000), st.integers(1, 30000), st.sampled_from([PAPER.slicing, OFFICIAL_V1.slicing]))
def test_properties_over_random_sizes(w, h, slicing):
    config = SlicingConfig(max_slices=slicing.max_slices, max_vit_patches=10**12, max_image_pixels=10**15)
    plan = plan_slices(w, h, config)
    P = config.patch_size
    assert _as_tuple(plan) == reference_plan(w, h, M=config.max_slices)
    for piece in plan.pieces:
        assert piece.width % P == 0 and piece.height % P == 0 and piece.width >= P and piece.height >= P
    assert plan.num_slices <= config.max_slices
    assert plan.num_slices != 1
    if plan.grid is not None:
        # the slices tile the refine image exactly, row-major, without overlap or gaps
        boxes = plan.slice_boxes()
        assert len(boxes) == plan.num_slices
        area = sum((r - lft) * (b - t) for lft, t, r, b in boxes)
        assert area == plan.refine_size.width * plan.refine_size.height
        assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == tuple(plan.refine_size)
        assert [b[1] for b in boxes] == sorted(b[1] for b in boxes)
        # the chosen grid minimises the aspect error among the candidates
        n = min(math.ceil(w * h / 336**2), config.max_slices)
        err = abs(math.log(w / h) - math.log(plan.grid.cols / plan.grid.rows))
        assert all(
            err <= abs(math.log(w / h) - math.log(g.cols / g.rows))
            for g in candidate_grids(n, config.max_slices)
        )
        assert plan.separators.count("\n") == plan.grid.rows
    # token counts agree with the layout: N*(Q+1) + Q
    q = 64
    assert visual_token_count(plan, q) == plan.num_slices * (q + 1) + q
    assert plan.vit_patches == sum((s.width // P) * (s.height // P) for s in plan.pieces)


def test_separators_row_major():
    plan = plan_slices(1024, 768, PAPER.slicing)  # 3 cols x 2 rows
    assert plan.separators == (",", ",", "\n", ",", ",", "\n")
    assert plan_slices(300, 200, PAPER.slicing).separators == ()


def test_piece_grids_rows_cols():
    plan = plan_slices(4000, 100, PAPER.slicing)
    assert plan.piece_grids[0] == Grid(rows=112 // 14, cols=938 // 14)
    assert plan.piece_grids[-1] == Grid(rows=42 // 14, cols=2114 // 14)


def test_pre_resize_long_side():
    config = SlicingConfig(pre_resize_long_side=1024)
    plan = plan_slices(474, 474, config)
    assert plan.pre_resized == Size(1023, 1024)  # float rounding, as the released evaluation does
    assert plan.planned == Size(1023, 1024)
    assert _as_tuple(plan) == reference_plan(1023, 1024)
    assert plan_slices(2048, 1000, config).pre_resized == Size(1024, 500)
    assert plan_slices(500, 250, config).pre_resized == Size(1024, 512)  # upscaled too
    # an unchanged size is still reported as pre-resized
    assert plan_slices(1024, 512, config).pre_resized == Size(1024, 512)
    assert plan_slices(1024, 512, PAPER.slicing).pre_resized is None


def test_pre_resize_to_zero_is_a_clear_error():
    with pytest.raises(ImageSizeError, match=r"1x5000 becomes 0x1024 .* 0 pixels"):
        plan_slices(1, 5000, SlicingConfig(pre_resize_long_side=1024))


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-3, 5), (0, 0)])
def test_zero_side_is_a_clear_error(size):
    with pytest.raises(ImageSizeError, match="side of 0 pixels"):
        plan_slices(*size)


@pytest.mark.parametrize("size", [(10.0, 10), (True, 10), ("10", 10), (None, 5)])
def test_non_integer_size_is_rejected(size):
    with pytest.raises(ImageSizeError, match="must be an integer"):
        plan_slices(*size)


def test_extreme_strips_are_planned_like_the_released_code():
    plan = plan_slices(4000, 1, PAPER.slicing)
    assert plan.grid is None and plan.overview == Size(19992, 14)
    assert plan_slices(1, 4000, PAPER.slicing).overview == Size(14, int(336 * math.sqrt(4000)) // 14 * 14)


def test_patch_limit_refuses_a_huge_strip_and_says_how_to_raise_it():
    with pytest.raises(PlanLimitError) as info:
        plan_slices(1, 100000, PAPER.slicing)
    message = str(info.value)
    assert "1x100000" in message and "7589 ViT patches" in message
    assert "max_vit_patches=7168" in message and "--max-vit-patches" in message
    assert plan_slices(1, 100000, SlicingConfig(max_vit_patches=8000)).vit_patches == 7589


def test_no_upscale_keeps_small_images():
    plan = plan_slices(100, 50, SlicingConfig(upscale_small=False))
    assert plan.overview == Size(98, 42)
    # upscaled: h = int(336 / sqrt(2)) = 237, w = 474, floored to the patch: 462 x 224
    assert plan_slices(100, 50).overview == Size(462, 224)


def test_candidate_grids_order():
    assert candidate_grids(3, 6) == [
        Grid(2, 1),
        Grid(1, 2),
        Grid(3, 1),
        Grid(1, 3),
        Grid(4, 1),
        Grid(2, 2),
        Grid(1, 4),
    ]
    assert candidate_grids(6, 6) == [Grid(5, 1), Grid(1, 5), Grid(6, 1), Grid(3, 2), Grid(2, 3), Grid(1, 6)]


def test_apply_plan_cuts_the_refine_image():
    image = Image.effect_mandelbrot((1024, 768), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    plan = plan_slices(1024, 768, PAPER.slicing)
    slices, overview = apply_plan(image, plan)
    assert overview.size == tuple(plan.overview)
    assert [s.size for s in slices] == [tuple(plan.slice_size)] * 6
    refine = image.resize(plan.refine_size, Image.Resampling.BICUBIC)
    for box, piece in zip(plan.slice_boxes(), slices, strict=True):
        assert piece.tobytes() == refine.crop(box).tobytes()
    assert overview.tobytes() == image.resize(plan.overview, Image.Resampling.BICUBIC).tobytes()


def test_apply_plan_pre_resizes_and_checks_size():
    image = Image.new("RGB", (474, 474), "red")
    plan = plan_slices(474, 474, SlicingConfig(pre_resize_long_side=1024))
    slices, overview = apply_plan(image, plan)
    assert len(slices) == plan.num_slices and overview.size == tuple(plan.overview)
    with pytest.raises(ImageSizeError, match="plan was made for 474x474"):
        apply_plan(Image.new("RGB", (10, 10)), plan)


@pytest.mark.parametrize("size", [(700000, 1), (1, 700000), (2_000_000, 3)])
def test_a_plan_that_cannot_keep_the_aspect_is_refused(size):
    # past about S^2 : 1 the released truncation makes a side 0, which the patch snap would turn into 14
    with pytest.raises(ImageSizeError, match=r"aspect ratio is too extreme to slice"):
        plan_slices(*size, SlicingConfig(max_vit_patches=10**9))


def test_extreme_but_representable_strips_still_plan_as_released():
    plan = plan_slices(100000, 1, SlicingConfig())
    assert plan.grid is None and plan.overview == Size(99988, 14)
