"""Closed-form FLOPs against torch's flop counter on the tiny model, and against hand counts at 13B."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llava_uhd.config import OFFICIAL_V1, PAPER, TINY, ResamplerConfig
from llava_uhd.errors import ConfigError
from llava_uhd.model import resampler_windowed
from llava_uhd.model.configuration import LlavaUHDConfig
from llava_uhd.model.flops import (
    llava15_flops,
    llm_flops,
    resampler_piece_flops,
    text_dims,
    uhd_flops,
    vit_piece_flops,
    windowed_resampler_piece_flops,
)
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.model.resampler import PerceiverResampler
from llava_uhd.model.resamplers import build_resampler
from llava_uhd.model.vision import VisionTransformer
from llava_uhd.slicing import plan_slices

PATCH_VALUES = 3 * 14 * 14


def counted(fn, *args, **kwargs) -> int:
    """FLOPs torch counts for one call. SDPA runs on its math backend: the counter has no formula for
    the CPU flash kernel and would count attention as 0, while the math path is plain matmuls."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("grid", [(8, 6), (1, 20), (8, 8)])
def test_vit_matches_flop_counter(grid) -> None:
    vit = VisionTransformer(TINY.vision).eval()
    rows, cols = grid
    pixels = torch.randn(rows * cols, PATCH_VALUES)
    assert counted(vit, pixels, torch.tensor([grid])) == vit_piece_flops(TINY.vision, rows, cols)


def test_vit_packed_pieces_cost_their_sum() -> None:
    vit = VisionTransformer(TINY.vision).eval()
    grids = [(8, 6), (8, 6), (4, 4)]
    pixels = torch.randn(sum(r * c for r, c in grids), PATCH_VALUES)
    expected = sum(vit_piece_flops(TINY.vision, r, c) for r, c in grids)
    assert counted(vit, pixels, torch.tensor(grids), strategy="grouped") == expected


@pytest.mark.parametrize("kv_dim", [32, 64])
def test_resampler_matches_flop_counter(kv_dim) -> None:
    resampler = PerceiverResampler(TINY.resampler, kv_dim, 64).eval()
    features = torch.randn(48, kv_dim)
    expected = resampler_piece_flops(TINY.resampler.num_queries, 48, kv_dim, 64)
    assert counted(resampler, features, torch.tensor([[8, 6]])) == expected


@pytest.mark.parametrize(("grid", "kv_dim"), [((8, 6), 32), ((2, 20), 64), ((20, 3), 32)])
def test_windowed_resampler_matches_flop_counter(grid, kv_dim, monkeypatch) -> None:
    # RoIAlign is interpolation, not counted; the torch fallback does it with two matmuls, so replace it
    # by a zero-cost stand-in of the same shape and count everything else
    def pooled_zeros(maps, row_bounds, col_bounds, output_size, **_):
        return maps.new_zeros(maps.shape[0], len(row_bounds), len(col_bounds), maps.shape[1], *output_size)

    monkeypatch.setattr(resampler_windowed, "roi_align_grid", pooled_zeros)
    config = ResamplerConfig(kind="windowed", num_queries=144, num_heads=None)
    resampler = build_resampler(config, kv_dim, 64).eval()
    rows, cols = grid
    expected = windowed_resampler_piece_flops(12, rows, cols, kv_dim, 64)
    assert counted(resampler, torch.randn(rows * cols, kv_dim), torch.tensor([grid])) == expected


def test_official_preset_counts_the_windowed_resampler() -> None:
    plan = plan_slices(672, 1088, OFFICIAL_V1.slicing)
    flops = uhd_flops(OFFICIAL_V1, plan, 0)
    expected = sum(windowed_resampler_piece_flops(12, g.rows, g.cols, 1024, 5120) for g in plan.piece_grids)
    assert flops["resampler"] == expected
    assert expected != sum(resampler_piece_flops(144, g.rows * g.cols, 1024, 5120) for g in plan.piece_grids)


def test_whole_model_matches_flop_counter() -> None:
    """One unsliced image (a single piece) and some text: every matmul of the model, counted by torch."""
    config = LlavaUHDConfig.from_preset(TINY, image_token_id=31999)
    model = LlavaUHDForConditionalGeneration(config).eval()
    plan = plan_slices(100, 80, TINY.slicing)
    assert plan.num_slices == 0
    (grid,) = plan.piece_grids
    text_tokens = 7
    q = TINY.resampler.num_queries
    ids = torch.tensor([[1] * 3 + [31999] * q + [5] * (text_tokens - 3)])
    inputs = {
        "input_ids": ids,
        "pixel_values": torch.randn(grid.rows * grid.cols, PATCH_VALUES),
        "piece_grids": torch.tensor([[grid.rows, grid.cols]]),
    }
    expected = uhd_flops(TINY, plan, text_tokens)
    assert counted(model, **inputs) == expected["total"]


def test_llm_matches_flop_counter() -> None:
    config = LlavaUHDConfig.from_preset(TINY)
    lm = LlavaUHDForConditionalGeneration(config).language_model.eval()
    ids = torch.randint(0, 100, (1, 40))
    dims = text_dims(TINY.text)
    assert counted(lm, input_ids=ids) == llm_flops(dims, 40)


def test_llm_flops_by_hand_for_vicuna_13b() -> None:
    """2 FLOPs per weight per token (embeddings excluded, LM head included) plus attention scores."""
    dims = text_dims(PAPER.text)
    d, f, layers, vocab = 5120, 13824, 40, 32000
    weights = layers * (4 * d * d + 3 * d * f) + d * vocab
    assert weights == 12_851_609_600  # Vicuna-13B's 13.0B parameters minus its 164M input embeddings
    tokens = 1000
    assert llm_flops(dims, tokens) == 2 * tokens * weights + layers * 4 * tokens * tokens * d


def test_paper_compute_ratio_at_672x1088() -> None:
    """Paper Table 1 / section 4: LLaVA-UHD at 672x1088 costs about 94% of LLaVA-1.5's inference compute."""
    ours = uhd_flops(PAPER, plan_slices(672, 1088, PAPER.slicing), 0)
    base = llava15_flops(PAPER, 0)
    assert ours["total"] == ours["vit"] + ours["resampler"] + ours["llm"]
    assert base["total"] == base["vit"] + base["projector"] + base["llm"]
    assert 0.90 < ours["total"] / base["total"] < 1.0
    # the baseline by hand: 577 ViT tokens through 23 layers, 576 tokens of projector and LLM
    assert base["vit"] == vit_piece_flops(PAPER.vision, 24, 24)
    assert base["projector"] == 2 * 576 * (1024 * 5120 + 5120 * 5120)
    assert base["llm"] == llm_flops(text_dims(PAPER.text), 576)


def test_text_dims_sources(tmp_path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "hidden_size": 96,
                "intermediate_size": 200,
                "num_hidden_layers": 3,
                "num_attention_heads": 6,
                "num_key_value_heads": 2,
                "vocab_size": 1000,
            }
        )
    )
    local = text_dims(PAPER.with_overrides(text={"name_or_path": str(tmp_path)}).text)
    assert (local.head_dim, local.num_kv_heads, local.gated_mlp) == (16, 2, True)
    with pytest.raises(ConfigError, match="some/unknown-model"):
        text_dims(PAPER.with_overrides(text={"name_or_path": "some/unknown-model"}).text)


def test_plan_flops_is_torch_free_and_reports_both_models() -> None:
    code = (
        "import sys, json, io, contextlib\n"
        "from llava_uhd.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    rc = main(['plan', '672x1088', '--flops', '--json', '--text-tokens', '32'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'plan --flops imported torch'\n"
        "print(out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(record["flops"]) == {"vit", "resampler", "llm", "total"}
    assert set(record["llava15_flops"]) == {"vit", "projector", "llm", "total"}
    assert record["flops"] == uhd_flops(PAPER, plan_slices(672, 1088, PAPER.slicing), 32)
