"""The released checkpoint's windowed resampler: pooled-size choice, window geometry, shapes, the window
constraint (each query sees only its own window), and parity with an independent per-piece reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llava_uhd.config import ResamplerConfig
from llava_uhd.errors import ModelInputError
from llava_uhd.model.resampler_windowed import WindowedResampler, window_bounds
from llava_uhd.model.resamplers import build_resampler
from llava_uhd.model.roi_align import roi_align_torch
from llava_uhd.model.windows import pooled_size

KV_DIM, EMBED_DIM, HEADS = 24, 32, 4
CONFIG = ResamplerConfig(kind="windowed", num_queries=144, num_heads=HEADS)
# Both resamplers' parameter names: those of the released checkpoint (docs/design.md section 5).
RESAMPLER_PARAMETERS = {
    "query",
    "pos_embed",
    "kv_proj.weight",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_q.weight",
    "ln_q.bias",
    "ln_kv.weight",
    "ln_kv.bias",
    "ln_post.weight",
    "ln_post.bias",
    "proj",
}

# (rows, cols) feature maps whose aspect ratio selects each of the seven pooled sizes, and the
# (height, width) expected: the candidate (w, h) nearest in log aspect ratio.
SEVEN = [
    ((12, 24), (2, 4)),  # W/H = 2   -> (w, h) = (4, 2)
    ((16, 24), (2, 3)),  # 1.5       -> (3, 2)
    ((18, 24), (3, 4)),  # 4/3       -> (4, 3)
    ((24, 24), (3, 3)),  # 1         -> (3, 3)
    ((24, 12), (4, 2)),  # 0.5       -> (2, 4)
    ((24, 16), (3, 2)),  # 2/3       -> (2, 3)
    ((24, 18), (4, 3)),  # 3/4       -> (3, 4)
]


def _resampler(seed: int = 0, config: ResamplerConfig = CONFIG) -> WindowedResampler:
    torch.manual_seed(seed)
    model = build_resampler(config, KV_DIM, EMBED_DIM)
    assert isinstance(model, WindowedResampler)
    with torch.no_grad():  # break the symmetric init so every parameter matters in the parity test
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _features(grids: list[tuple[int, int]], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    total = sum(r * c for r, c in grids)
    return torch.randn(total, KV_DIM, generator=generator), torch.tensor(grids)


@pytest.mark.parametrize(("grid", "expected"), SEVEN)
def test_pooled_size_from_aspect_ratio(grid, expected):
    assert pooled_size(*grid) == expected


def test_pooled_size_extremes_and_errors():
    # No two candidates share an aspect ratio and their log-midpoints are irrational, so integer maps
    # never tie; the extremes pick the most elongated candidates.
    assert pooled_size(1, 100) == (2, 4)  # very wide: the widest candidate
    assert pooled_size(100, 1) == (4, 2)  # very tall: the tallest
    with pytest.raises(ModelInputError, match="rows=0"):
        pooled_size(0, 5)


def test_window_bounds_are_the_float_grid():
    row_bounds, col_bounds = window_bounds(25, 22, 12)
    assert row_bounds.shape == (12, 2) and col_bounds.shape == (12, 2)
    expected_rows = torch.tensor([[i * 25 / 12, (i + 1) * 25 / 12] for i in range(12)])
    expected_cols = torch.tensor([[j * 22 / 12, (j + 1) * 22 / 12] for j in range(12)])
    torch.testing.assert_close(row_bounds, expected_rows, rtol=0, atol=1e-5)
    torch.testing.assert_close(col_bounds, expected_cols, rtol=0, atol=1e-5)
    assert col_bounds[-1, 1].item() == pytest.approx(22.0, abs=1e-5)


def test_shapes_for_all_seven_pooled_sizes():
    model = _resampler()
    grids = [grid for grid, _ in SEVEN]
    features, piece_grids = _features(grids)
    out = model(features, piece_grids)
    assert out.shape == (7, 144, EMBED_DIM) and torch.isfinite(out).all()
    for (rows, cols), (ph, pw) in SEVEN:
        maps = torch.randn(2, rows, cols, EMBED_DIM)
        assert model.pool_windows(maps).shape == (2, 144, ph * pw, EMBED_DIM)


def test_batched_equals_one_piece_at_a_time():
    model = _resampler()
    grids = [(16, 24), (24, 24), (16, 24), (5, 37)]  # repeated and odd shapes, out of order
    features, piece_grids = _features(grids)
    together = model(features, piece_grids)
    start = 0
    for n, (rows, cols) in enumerate(grids):
        alone = model(features[start : start + rows * cols], torch.tensor([[rows, cols]]))
        start += rows * cols
        torch.testing.assert_close(together[n], alone[0], rtol=1e-5, atol=1e-5)


def _support(low: float, high: float, size: int) -> range:
    """Cells a RoIAlign window over [low, high] can read: bilinear reads floor(y) and floor(y) + 1."""
    return range(max(math.floor(low), 0), min(math.floor(max(high, low + 1)) + 1, size - 1) + 1)


@pytest.mark.parametrize("grid", [(24, 24), (18, 24), (25, 22)])
def test_each_query_sees_only_its_window(grid):
    """Perturbing every feature outside a query's window leaves that query's output unchanged."""
    rows, cols = grid
    model = _resampler()
    features, piece_grids = _features([grid])
    base = model(features, piece_grids)[0]  # (Q, D)
    row_bounds, col_bounds = window_bounds(rows, cols, 12)
    generator = torch.Generator().manual_seed(5)
    for query in (0, 13, 77, 143):
        i, j = divmod(query, 12)
        inside = torch.zeros(rows, cols, dtype=torch.bool)
        ys = _support(*row_bounds[i].tolist(), rows)
        xs = _support(*col_bounds[j].tolist(), cols)
        inside[ys.start : ys.stop, xs.start : xs.stop] = True
        noise = torch.randn(features.shape, generator=generator) * 5.0
        outside = features + noise * (~inside).reshape(-1, 1)
        out = model(outside, piece_grids)[0]
        torch.testing.assert_close(out[query], base[query], rtol=1e-5, atol=1e-5)
        assert (out - base).abs().amax(dim=1).max() > 1e-2  # other queries did see the noise
        # and the query does react to its own window
        own = features + noise * inside.reshape(-1, 1)
        assert (model(own, piece_grids)[0][query] - base[query]).abs().max() > 1e-3


def reference_forward(model: WindowedResampler, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """One piece, written independently from the released recipe: explicit boxes, per-box RoIAlign, and
    multi-head attention by hand from ``attn``'s packed in-projection (heads split the channels evenly)."""
    dim, heads, side = model.embed_dim, model.num_heads, model.grid_side
    x = F.layer_norm(
        features @ model.kv_proj.weight.T, (dim,), model.ln_kv.weight, model.ln_kv.bias, model.ln_kv.eps
    )
    table = model.pos_embed.detach().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(rows * cols, dim)
    key_map = (x + pos).T.reshape(1, dim, rows, cols)
    value_map = x.T.reshape(1, dim, rows, cols)
    win_h, win_w = rows / side, cols / side
    boxes = torch.tensor(
        [
            [0.0, j * win_w, i * win_h, (j + 1) * win_w, (i + 1) * win_h]
            for i in range(side)
            for j in range(side)
        ]
    )
    size = pooled_size(rows, cols)
    k = roi_align_torch(key_map, boxes, size).flatten(2).transpose(1, 2)  # (Q, ph*pw, D)
    v = roi_align_torch(value_map, boxes, size).flatten(2).transpose(1, 2)
    q = (
        F.layer_norm(model.query, (dim,), model.ln_q.weight, model.ln_q.bias, model.ln_q.eps)
        + model.pos_embed
    )
    w_q, w_k, w_v = model.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = model.attn.in_proj_bias.chunk(3)
    head_dim = dim // heads
    qh = (q @ w_q.T + b_q).reshape(-1, 1, heads, head_dim)  # (Q, 1, H, hd)
    kh = (k @ w_k.T + b_k).reshape(k.shape[0], k.shape[1], heads, head_dim)  # (Q, cells, H, hd)
    vh = (v @ w_v.T + b_v).reshape(v.shape[0], v.shape[1], heads, head_dim)
    scores = torch.einsum("qahd,qchd->qhac", qh, kh) / math.sqrt(head_dim)
    attended = torch.einsum("qhac,qchd->qahd", scores.softmax(-1), vh).reshape(-1, dim)
    out = attended @ model.attn.out_proj.weight.T + model.attn.out_proj.bias
    out = F.layer_norm(out, (dim,), model.ln_post.weight, model.ln_post.bias, model.ln_post.eps)
    return out @ model.proj


def test_matches_independent_reference():
    model = _resampler(seed=3)
    grids = [(25, 22), (24, 24), (3, 40)]
    features, piece_grids = _features(grids, seed=4)
    with torch.no_grad():
        ours = model(features, piece_grids)
        start = 0
        for n, (rows, cols) in enumerate(grids):
            expected = reference_forward(model, features[start : start + rows * cols], rows, cols)
            start += rows * cols
            torch.testing.assert_close(ours[n], expected, rtol=1e-4, atol=1e-4)


def test_heads_default_to_hidden_over_128():
    model = build_resampler(ResamplerConfig(kind="windowed", num_queries=144, num_heads=None), 16, 256)
    assert model.attn.num_heads == 2  # 256 // 128, the released checkpoint's rule
    assert {name for name, _ in model.named_parameters()} == RESAMPLER_PARAMETERS


def test_bfloat16_runs_and_pools_in_float32():
    model = _resampler().to(torch.bfloat16)
    features, piece_grids = _features([(24, 24)])
    out = model(features.to(torch.bfloat16), piece_grids)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 144, EMBED_DIM)


def test_half_precision_rounds_window_edges_like_the_released_code():
    """In bfloat16 the released code's boxes pass through bfloat16 (25/12 = 2.0833 becomes 2.078125)."""
    model = _resampler()
    maps = torch.randn(1, 25, 22, 8).to(torch.bfloat16)
    rows, cols = window_bounds(25, 22, 12)
    assert rows[1, 0].item() != rows[1, 0].to(torch.bfloat16).item()  # the rounding does move this edge
    boxes = torch.tensor(
        [
            [0.0, cols[j, 0].item(), rows[i, 0].item(), cols[j, 1].item(), rows[i, 1].item()]
            for i in range(12)
            for j in range(12)
        ]
    )
    rounded = torch.cat([boxes[:, :1], boxes[:, 1:].to(torch.bfloat16).float()], dim=1)
    channels_first = maps.permute(0, 3, 1, 2)
    expected = roi_align_torch(channels_first, rounded, pooled_size(25, 22)).flatten(2).transpose(1, 2)
    unrounded = roi_align_torch(channels_first, boxes, pooled_size(25, 22)).flatten(2).transpose(1, 2)
    pooled = model.pool_windows(maps)[0]
    assert torch.equal(pooled, expected) and not torch.equal(pooled, unrounded)


def test_gradients_reach_every_parameter():
    model = _resampler().train()
    features, piece_grids = _features([(12, 24), (24, 24)])
    model(features, piece_grids).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
