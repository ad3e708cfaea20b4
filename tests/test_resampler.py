"""The paper's perceiver resampler: names, shapes, batched == per-piece, an independent reference, grads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_uhd.config import TINY, ResamplerConfig
from llava_uhd.errors import ConfigError, ModelInputError
from llava_uhd.model.resampler import PerceiverResampler
from llava_uhd.model.resamplers import build_resampler

KV_DIM, EMBED_DIM = 24, 32
MIXED_GRIDS = [(1, 1), (1, 20), (20, 1), (8, 8), (5, 7), (8, 8)]


def _resampler(kv_dim: int = KV_DIM, embed_dim: int = EMBED_DIM, queries: int = 16) -> PerceiverResampler:
    torch.manual_seed(0)
    module = PerceiverResampler(ResamplerConfig(num_queries=queries, num_heads=4), kv_dim, embed_dim)
    with torch.no_grad():  # move LayerNorms and biases off their 1/0 init so the reference checks them
        for name, p in module.named_parameters():
            if name.startswith("ln_") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return module


def _inputs(grids: list[tuple[int, int]], dim: int = KV_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    total = sum(r * c for r, c in grids)
    return torch.randn(total, dim), torch.tensor(grids, dtype=torch.long)


def test_parameter_names_and_shapes() -> None:
    module = _resampler()
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    d, q = EMBED_DIM, 16
    assert shapes == {
        "query": (q, d),
        "pos_embed": (q, d),
        "kv_proj.weight": (d, KV_DIM),
        "attn.in_proj_weight": (3 * d, d),
        "attn.in_proj_bias": (3 * d,),
        "attn.out_proj.weight": (d, d),
        "attn.out_proj.bias": (d,),
        "ln_q.weight": (d,),
        "ln_q.bias": (d,),
        "ln_kv.weight": (d,),
        "ln_kv.bias": (d,),
        "ln_post.weight": (d,),
        "ln_post.bias": (d,),
        "proj": (d, d),
    }
    assert module.num_heads == 4


def test_kv_proj_is_identity_when_widths_match() -> None:
    module = PerceiverResampler(ResamplerConfig(num_queries=4, num_heads=2), 16, 16)
    assert isinstance(module.kv_proj, torch.nn.Identity)
    assert "kv_proj.weight" not in dict(module.named_parameters())


def test_init_follows_released_recipe() -> None:
    torch.manual_seed(0)
    d = 256
    module = PerceiverResampler(ResamplerConfig(num_queries=64, num_heads=8), 128, d)
    # trunc_normal_'s cut is at +-2 absolute (timm's and torch's default), so it is a plain N(0, 0.02) here
    assert module.query.std().item() == pytest.approx(0.02, rel=0.05)
    assert module.kv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(module.attn.out_proj.bias == 0) and torch.all(module.ln_post.weight == 1)
    assert module.proj.std().item() == pytest.approx(d**-0.5, rel=0.05)
    assert torch.equal(module.pos_embed.detach(), _mae_sincos(d, 8))


def _mae_sincos(dim: int, side: int) -> torch.Tensor:
    """MAE's 2D sin-cos table written independently with numpy: column channels first, then rows."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    table = np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)
    return torch.from_numpy(table).float()


def _reference(module: PerceiverResampler, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The resampler of docs/design.md section 5 on one piece, in plain torch (no nn.MultiheadAttention)."""
    sd = {k: v.detach().double() for k, v in module.state_dict().items()}
    d, heads, eps = module.embed_dim, module.num_heads, module.config.layer_norm_eps

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    side = int(math.isqrt(module.num_queries))
    table = sd["pos_embed"].float().reshape(1, side, side, d).permute(0, 3, 1, 2)
    key_pos = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
    key_pos = key_pos.permute(0, 2, 3, 1).reshape(rows * cols, d).double()

    x = layer_norm(features.double() @ sd["kv_proj.weight"].T, "ln_kv")  # (L, D)
    q = layer_norm(sd["query"], "ln_q") + sd["pos_embed"]  # (Q, D)
    k = x + key_pos
    wq, wk, wv = sd["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd["attn.in_proj_bias"].chunk(3)
    hd = d // heads
    qh = (q @ wq.T + bq).reshape(-1, heads, hd).transpose(0, 1)  # (H, Q, hd)
    kh = (k @ wk.T + bk).reshape(-1, heads, hd).transpose(0, 1)  # (H, L, hd)
    vh = (x @ wv.T + bv).reshape(-1, heads, hd).transpose(0, 1)
    attn = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd), dim=-1) @ vh  # (H, Q, hd)
    out = attn.transpose(0, 1).reshape(-1, d) @ sd["attn.out_proj.weight"].T + sd["attn.out_proj.bias"]
    return layer_norm(out, "ln_post") @ sd["proj"]


def test_matches_independent_reference_on_mixed_grids() -> None:
    module = _resampler()
    features, grids = _inputs(MIXED_GRIDS)
    with torch.no_grad():
        out = module(features, grids)
    assert out.shape == (len(MIXED_GRIDS), 16, EMBED_DIM)
    start = 0
    for i, (r, c) in enumerate(MIXED_GRIDS):
        expected = _reference(module, features[start : start + r * c], r, c)
        start += r * c
        torch.testing.assert_close(out[i].double(), expected, atol=2e-5, rtol=1e-5)


def test_batched_equals_per_piece_loop() -> None:
    module = _resampler()
    features, grids = _inputs(MIXED_GRIDS)
    with torch.no_grad():
        batched = module(features, grids)
        start, looped = 0, []
        for r, c in MIXED_GRIDS:
            looped.append(module(features[start : start + r * c], torch.tensor([[r, c]]))[0])
            start += r * c
    assert (batched - torch.stack(looped)).abs().max().item() <= 1e-5


def test_native_grid_uses_table_unchanged_and_positions_matter() -> None:
    module = _resampler()
    pos = module.key_positions(torch.tensor([[4, 4], [2, 3]]))
    assert torch.equal(pos[:16], module.pos_embed.detach())  # 4x4 is the table's own grid
    features, grids = _inputs([(4, 4)])
    with torch.no_grad():
        before = module(features, grids)
        module.pos_embed.add_(1.0)  # the stored table is used, not a recomputed one
        after = module(features, grids)
    assert (before - after).abs().max() > 1e-3


def test_gradient_reaches_queries_and_positions() -> None:
    module = _resampler()
    features, grids = _inputs([(2, 3), (4, 4)])
    module(features, grids).square().mean().backward()
    for name in ("query", "pos_embed", "kv_proj.weight", "attn.in_proj_weight", "proj"):
        grad = dict(module.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bfloat16_runs_and_stays_close() -> None:
    module = _resampler()
    features, grids = _inputs([(3, 5), (8, 8)])
    with torch.no_grad():
        ref = module(features, grids)
        out = module.to(torch.bfloat16)(features.bfloat16(), grids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_bad_grids_raise_with_values() -> None:
    module = _resampler()
    features, _ = _inputs([(2, 2)])
    with pytest.raises(ModelInputError, match=r"cover 6 patches but features have 4"):
        module(features, torch.tensor([[2, 3]]))
    with pytest.raises(ModelInputError, match=r"\(N, 2\)"):
        module(features, torch.tensor([2, 2]))


def test_build_resampler_by_kind() -> None:
    module = build_resampler(TINY.resampler, 32, 64)
    assert isinstance(module, PerceiverResampler) and module.num_queries == TINY.resampler.num_queries
    with pytest.raises(ConfigError, match="multiple of 4"):
        PerceiverResampler(ResamplerConfig(num_queries=4, num_heads=1), 8, 6)
