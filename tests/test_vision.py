"""The packed vision encoder against transformers' CLIP/SigLIP towers (the oracle) on tiny random weights.

The per-piece oracle runs transformers' ``CLIPVisionModel`` on each piece separately, as an image, with
``interpolate_pos_encoding=True`` (bicubic, align_corners=False: the resize of docs/design.md section 4).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from llava_uhd.config import TINY, VisionConfig
from llava_uhd.errors import ConfigError, ModelInputError
from llava_uhd.model import attention as attention_module
from llava_uhd.model import pos_embed as pos_embed_module
from llava_uhd.model import vision as vision_module
from llava_uhd.model.attention import PackedAttention, block_diagonal_mask, choose_strategy
from llava_uhd.model.vision import EncoderBlock, VisionTransformer
from llava_uhd.model.weights import load_clip_vision, vision_config_from_hf

TOL = 1e-5
PATCH = 14
# Mixed piece shapes in patches (rows, cols): the native 8x8 grid twice, thin strips, a single patch,
# transposed pairs with equal lengths (one "grouped" run) and a piece longer than the native grid.
MIXED_GRIDS = [(8, 8), (1, 20), (3, 5), (20, 1), (1, 1), (5, 3), (8, 8), (7, 10)]
STRATEGIES = ["auto", "block_mask", "grouped"]
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _hf_clip_config(layers: int = 3) -> CLIPVisionConfig:
    v = TINY.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="quick_gelu",
        attn_implementation="eager",
    )


def _randomize_norms(model: torch.nn.Module) -> None:
    """LayerNorms start at 1/0; random affine parameters make a wrong mapping visible."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    model = CLIPVisionModel(_hf_clip_config()).eval()
    _randomize_norms(model)
    return model


@pytest.fixture(scope="module")
def ours(hf_clip: CLIPVisionModel) -> VisionTransformer:
    model = VisionTransformer(vision_config_from_hf(hf_clip.config)).eval()
    load_clip_vision(model, hf_clip.state_dict())
    return model


@pytest.fixture(scope="module")
def vision_benchmark() -> ModuleType:
    """benchmarks/vision.py, whose padded baseline must encode exactly what the packed model does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling readme_section
        spec = importlib.util.spec_from_file_location("vision_benchmark", BENCHMARKS / "vision.py")
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return module


def patchify(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * rows * cols, C * P * P): patches row-major, each flattened as (C, P, P)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * PATCH * PATCH)


def _pieces(grids: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, r * PATCH, c * PATCH, generator=gen) for r, c in grids]


def _packed(pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    grids = torch.tensor([[p.shape[2] // PATCH, p.shape[3] // PATCH] for p in pieces])
    return torch.cat([patchify(p) for p in pieces]), grids


def _oracle(hf: torch.nn.Module, pieces: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Per-piece loop: transformers' hidden states of every piece, each (1, n + CLS, D)."""
    with torch.no_grad():
        return [hf(p, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states for p in pieces]


def test_native_size_matches_transformers_every_layer(hf_clip, ours):
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = hf_clip(images, output_hidden_states=True).hidden_states
        patches, cls = ours.hidden_states(patchify(images), torch.tensor([[8, 8], [8, 8]]))
    assert len(patches) == len(expected) == 4
    for layer, (theirs, mine) in enumerate(zip(expected, patches, strict=True)):
        assert (theirs[:, 1:].reshape(-1, 32) - mine).abs().max() <= TOL, f"layer {layer}"
        assert (theirs[:, 0] - cls[layer]).abs().max() <= TOL, f"CLS at layer {layer}"


@pytest.mark.parametrize("feature_layer", [-4, -3, -2, -1, 0, 1, 2, 3])
def test_forward_returns_the_configured_layer_without_cls(hf_clip, ours, feature_layer):
    model = VisionTransformer(dataclasses.replace(ours.config, feature_layer=feature_layer)).eval()
    model.load_state_dict(ours.state_dict())
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = hf_clip(images, output_hidden_states=True).hidden_states[feature_layer][0, 1:]
        got = model(patchify(images), torch.tensor([[8, 8]]))
    assert got.shape == (64, 32)
    assert (got - expected).abs().max() <= TOL


def test_layers_after_the_feature_layer_are_not_run(ours):
    calls = []
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(ours.blocks)]
    try:
        with torch.no_grad():
            ours(torch.randn(4, 3 * PATCH * PATCH), torch.tensor([[2, 2]]))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1]  # 3 layers, feature_layer -2 = output of the second


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_mixed_shapes_equal_per_piece_oracle(hf_clip, ours, strategy):
    pieces = _pieces(MIXED_GRIDS)
    pixel_values, grids = _packed(pieces)
    with torch.no_grad():
        patches, cls = ours.hidden_states(pixel_values, grids, strategy=strategy)
        features = ours(pixel_values, grids, strategy=strategy)
    expected = _oracle(hf_clip, pieces)
    for layer in range(len(patches)):
        theirs = torch.cat([h[layer][0, 1:] for h in expected])
        assert (patches[layer] - theirs).abs().max() <= TOL, f"layer {layer}"
        assert (cls[layer] - torch.stack([h[layer][0, 0] for h in expected])).abs().max() <= TOL
    assert torch.equal(features, patches[-2])
    assert features.shape == (sum(r * c for r, c in MIXED_GRIDS), 32)


def test_padded_baseline_of_the_benchmark_equals_per_piece_oracle(hf_clip, ours, vision_benchmark):
    pieces = _pieces(MIXED_GRIDS)
    pixel_values, grids = _packed(pieces)
    with torch.no_grad():
        features = vision_benchmark.padded_encode(ours, pixel_values, grids)
    expected = torch.cat([h[-2][0, 1:] for h in _oracle(hf_clip, pieces)])
    assert features.shape == expected.shape
    assert (features - expected).abs().max() <= TOL


def test_varlen_path_plumbing_with_a_reference_kernel(monkeypatch, hf_clip, ours):
    """On CUDA the varlen kernel is used; here a per-segment reference kernel stands in for it."""
    seen = {}

    def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
        seen.update(offsets=cu_q.tolist(), max=(max_q, max_k), dtype=cu_q.dtype)
        bounds = cu_q.tolist()
        outs = [
            F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(outs)

    monkeypatch.setattr(attention_module, "varlen_kernel", lambda device, dtype: reference_kernel)
    grids = [(1, 1), (2, 3), (1, 20)]
    pieces = _pieces(grids, seed=3)
    pixel_values, grid_tensor = _packed(pieces)
    assert ours.layout(grid_tensor).attend.strategy == "varlen"
    with torch.no_grad():
        got = ours(pixel_values, grid_tensor)
    expected = torch.cat([h[-2][0, 1:] for h in _oracle(hf_clip, pieces)])
    assert (got - expected).abs().max() <= TOL
    # pieces packed sorted by length (CLS included): 2, 7, 21 tokens
    assert seen == {"offsets": [0, 2, 9, 30], "max": (21, 21), "dtype": torch.int32}


def test_position_rows_are_the_table_resized_bicubic_per_piece(ours):
    grids = torch.tensor([[3, 5], [8, 8], [3, 5], [20, 1]])
    got = ours.position_embeddings(grids)
    table = ours.pos_embed[1:].detach().reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = []
    for rows, cols in grids.tolist():
        resized = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
        expected.append(resized.permute(0, 2, 3, 1).reshape(rows * cols, -1))
    assert torch.equal(got, torch.cat(expected))
    assert torch.equal(got[15 : 15 + 64], ours.pos_embed[1:])  # the native grid is the table itself


def test_position_tables_are_resized_once_per_distinct_grid(monkeypatch, ours):
    calls = []
    real = pos_embed_module.F.interpolate
    monkeypatch.setattr(
        pos_embed_module.F, "interpolate", lambda x, **kw: calls.append(kw["size"]) or real(x, **kw)
    )
    ours.position_embeddings(torch.tensor([[3, 5], [5, 3], [3, 5], [3, 5], [5, 3], [8, 8]]))
    assert sorted(calls) == [(3, 5), (5, 3)]


def test_siglip_layout_matches_transformers():
    torch.manual_seed(0)
    hf = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=PATCH,
            attn_implementation="eager",
        )
    ).eval()
    _randomize_norms(hf)
    config = vision_config_from_hf(hf.config)
    assert (config.use_cls_token, config.use_pre_layernorm, config.patch_bias) == (False, False, True)
    model = VisionTransformer(config).eval()
    load_clip_vision(model, hf.state_dict())
    pieces = _pieces([(4, 4), (2, 7), (1, 1)], seed=5)
    pixel_values, grids = _packed(pieces)
    with torch.no_grad():
        patches, cls = model.hidden_states(pixel_values, grids)
    assert cls is None
    expected = _oracle(hf, pieces)
    for layer in range(3):
        assert (patches[layer] - torch.cat([h[layer][0] for h in expected])).abs().max() <= TOL


def test_bf16_forward_resizes_positions_in_float32(monkeypatch, ours):
    model = VisionTransformer(ours.config).eval()
    model.load_state_dict(ours.state_dict())
    model = model.to(torch.bfloat16)
    seen = []
    real = pos_embed_module.F.interpolate
    monkeypatch.setattr(
        pos_embed_module.F, "interpolate", lambda x, **kw: seen.append(x.dtype) or real(x, **kw)
    )
    pieces = _pieces([(3, 5), (8, 8), (1, 20)], seed=7)
    pixel_values, grids = _packed(pieces)
    assert model.position_embeddings(grids).dtype == torch.bfloat16
    with torch.no_grad():
        got = model(pixel_values, grids)
        reference = ours(pixel_values, grids)
    assert seen and set(seen) == {torch.float32}
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - reference).abs().max() <= 0.1 * reference.abs().max()


@pytest.mark.parametrize("strategy", ["block_mask", "grouped"])
def test_gradients_through_packed_equal_per_piece(ours, strategy):
    pieces = _pieces([(2, 3), (3, 2), (1, 4)], seed=11)
    pixel_values, grids = _packed(pieces)
    weights = torch.randn(pixel_values.shape[0], ours.config.hidden_size)

    def grads(run) -> list[torch.Tensor]:
        ours.zero_grad()
        (run() * weights).sum().backward()
        return [p.grad.clone() for p in ours.parameters() if p.grad is not None]

    packed = grads(lambda: ours(pixel_values, grids, strategy=strategy))
    starts = [0, 6, 12, 16]
    loop = grads(
        lambda: torch.cat(
            [
                ours(pixel_values[a:b], grids[i : i + 1])
                for i, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True))
            ]
        )
    )
    ours.zero_grad()
    assert len(packed) == len(loop) > 0
    for a, b in zip(packed, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # gradients reach ~20: relative tolerance


def test_gradient_checkpointing_gives_the_same_gradients(ours):
    pixel_values, grids = _packed(_pieces([(2, 3), (1, 1)], seed=2))
    results = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = checkpointing
        ours.train()
        ours(pixel_values, grids).square().sum().backward()
        results.append(ours.blocks[0].attn.q_proj.weight.grad.clone())
    ours.gradient_checkpointing = False
    ours.eval()
    ours.zero_grad()
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_input_errors_name_the_offending_values(ours):
    with pytest.raises(ModelInputError, match=r"7 patches but piece_grids \[\[2, 3\]\] add up to 6"):
        ours(torch.randn(7, 3 * PATCH * PATCH), torch.tensor([[2, 3]]))
    with pytest.raises(ModelInputError, match=r"C\*P\*P = 588\), got shape \(6, 10\)"):
        ours(torch.randn(6, 10), torch.tensor([[2, 3]]))
    with pytest.raises(ModelInputError, match=r"positive integers, got \[\[0, 3\]\]"):
        ours(torch.randn(0, 3 * PATCH * PATCH), torch.tensor([[0, 3]]))
    with pytest.raises(ConfigError, match=r"unknown attention strategy 'dense'"):
        ours(torch.randn(6, 3 * PATCH * PATCH), torch.tensor([[2, 3]]), strategy="dense")


# ---------------------------------------------------------------------------------------------------
# attention helpers


def test_block_diagonal_mask_exact_values():
    mask = block_diagonal_mask(torch.tensor([1, 2, 1]))
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    cross = block_diagonal_mask(torch.tensor([2, 2]), torch.tensor([1, 3]))  # 2 queries per piece
    assert torch.equal(cross.int(), torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(ModelInputError, match="as many query as key sequences, got 2 and 1"):
        block_diagonal_mask(torch.tensor([2, 2]), torch.tensor([4]))


def test_strategy_choice(monkeypatch):
    cpu, f32 = torch.device("cpu"), torch.float32
    assert choose_strategy(cpu, f32) == "grouped"  # one dense call per distinct length, never a mask
    assert PackedAttention.build([5, 6, 7, 8, 9, 10]).strategy == "grouped"
    monkeypatch.setattr(
        attention_module, "varlen_kernel", lambda device, dtype: F.scaled_dot_product_attention
    )
    assert choose_strategy(cpu, f32) == "varlen"
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="'varlen' needs CUDA"):
        PackedAttention.build([3, 4], strategy="varlen")
    with pytest.raises(ModelInputError, match=r"all non-empty; got lengths \[3, 0\]"):
        PackedAttention.build([3, 0])


def test_grouped_runs_follow_the_packed_order():
    attend = PackedAttention.build([2, 2, 3, 2], strategy="grouped")
    assert attend.runs == ((0, 2, 2), (4, 1, 3), (7, 1, 2))


@pytest.mark.parametrize("strategy", ["block_mask", "grouped"])
def test_packed_attention_equals_separate_attention(strategy):
    lengths = [3, 1, 4, 4, 2]
    q, k, v = torch.randn(3, sum(lengths), 2, 8).unbind(0)
    got = PackedAttention.build(lengths, strategy=strategy)(q, k, v)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        expected = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(
            0, 1
        )
        assert (got[a:b] - expected).abs().max() <= 1e-6


def test_padded_attention_of_the_benchmark_ignores_pad_keys(vision_benchmark):
    padded_attention = vision_benchmark.PaddedAttention
    q, k, v = torch.randn(3, 2 * 5, 2, 8).unbind(0)
    k2, v2 = k.clone(), v.clone()
    k2[3:5], v2[3:5], k2[9], v2[9] = 100.0, -100.0, 50.0, 50.0  # pads of sequence 0 (3 real) and 1 (4 real)
    attend = padded_attention.build([3, 4], pad_to=5)
    a, b = attend(q, k, v), attend(q, k2, v2)
    real = torch.tensor([0, 1, 2, 5, 6, 7, 8])
    assert torch.allclose(a[real], b[real], atol=1e-6)
    with pytest.raises(ValueError, match=r"pad_to=5, got lengths \[6\]"):
        padded_attention.build([6], pad_to=5)


def test_tiny_preset_tower_builds_from_config():
    model = VisionTransformer(TINY.vision)
    assert model.pos_embed.shape == (8 * 8 + 1, 32)
    assert model.patch_embed.weight.shape == (32, 3, PATCH, PATCH) and model.patch_embed.bias is None
    siglip = VisionTransformer(
        VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            image_size=56,
            use_cls_token=False,
            use_pre_layernorm=False,
            patch_bias=True,
            hidden_act="gelu_pytorch_tanh",
        )
    )
    assert siglip.cls_token is None and siglip.pos_embed.shape == (16, 32)
    out = siglip(torch.randn(3, 3 * PATCH * PATCH), torch.tensor([[1, 3]]))
    assert out.shape == (3, 32)


def test_split_gives_chunks_of_whole_sequences_within_the_bound():
    attend = PackedAttention.build([3, 3, 5, 5, 5, 9, 2], strategy="grouped")
    chunks = attend.split(10)
    assert [c.lengths for _, c in chunks] == [(3, 3), (5, 5), (5,), (9,), (2,)]
    assert [(r.start, r.stop) for r, _ in chunks] == [(0, 6), (6, 16), (16, 21), (21, 30), (30, 32)]
    assert [c.runs for _, c in chunks][1] == ((0, 2, 5),)  # runs restart at the chunk's first row
    assert PackedAttention.build([4, 4], strategy="block_mask").split(4)[0][0] == slice(0, 8)  # not cut


def test_fused_cpu_blocks_equal_the_module_calls_and_the_oracle(hf_clip, ours, monkeypatch):
    monkeypatch.setattr(vision_module, "CPU_CHUNK_ROWS", 12)  # several chunks, buffers reused across them
    monkeypatch.setattr(vision_module, "ACT_ROWS", 5)
    fused = []
    real = EncoderBlock._forward_fused
    monkeypatch.setattr(EncoderBlock, "_forward_fused", lambda self, *a: fused.append(1) or real(self, *a))
    pieces = _pieces(MIXED_GRIDS, seed=5)
    pixel_values, grids = _packed(pieces)
    with torch.inference_mode():
        got = ours(pixel_values, grids)
        assert len(fused) == ours.feature_index
        with ours.unfused():
            plain = ours(pixel_values, grids)
    assert len(fused) == ours.feature_index and len(ours.layout(grids).attend.split(12)) > 2
    expected = torch.cat([h[-2][0, 1:] for h in _oracle(hf_clip, pieces)])
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() <= TOL


def test_fused_path_runs_only_where_it_computes_the_same(ours, monkeypatch):
    """Not when autograd records the block, under autocast, for swapped projections (adapters, quantized
    weights) or ZeRO-3's partitioned parameters; a frozen tower in grad mode is fused."""
    block = ours.blocks[0]
    x = torch.randn(4, ours.config.hidden_size)
    assert not block._fusable(x)  # its parameters train and grad mode is on
    frozen = VisionTransformer(ours.config).requires_grad_(False).blocks[0]
    assert frozen._fusable(x) and not frozen._fusable(x.clone().requires_grad_())
    with torch.no_grad():
        assert block._fusable(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not block._fusable(x)
        other = EncoderBlock(ours.config)
        assert other._fusable(x)
        monkeypatch.setattr(other.attn.q_proj.weight, "ds_id", 7, raising=False)
        assert not other._fusable(x)
        adapted = EncoderBlock(ours.config)
        adapted.mlp.fc1 = torch.nn.Sequential(adapted.mlp.fc1)
        assert not adapted._fusable(x)


def test_gradients_through_the_module_calls_match_the_oracle(hf_clip, ours):
    pieces = _pieces(MIXED_GRIDS[:4], seed=6)
    pixel_values, grids = _packed(pieces)
    weights = torch.randn(pixel_values.shape[0], ours.config.hidden_size)
    (ours(pixel_values, grids) * weights).sum().backward()
    hidden = [
        hf_clip(p, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states for p in pieces
    ]
    (torch.cat([h[-2][0, 1:] for h in hidden]) * weights).sum().backward()
    mine = ours.blocks[0].mlp.fc1.weight.grad.clone()
    reference = hf_clip.get_parameter("encoder.layers.0.mlp.fc1.weight").grad.clone()
    ours.zero_grad()
    hf_clip.zero_grad()
    assert mine.abs().max() > 0
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
