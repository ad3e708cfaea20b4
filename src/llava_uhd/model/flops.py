"""Closed-form forward FLOPs of LLaVA-UHD and of the LLaVA-1.5 baseline (paper section 4, Table 1).

Pure Python, no torch: ``llava-uhd plan --flops`` calls it from the model config alone. Conventions:

- a multiply-add counts as 2 FLOPs; only matrix products are counted (linear layers, the patch
  convolution, attention scores ``QK^T`` and the weighted sum ``AV``), as ``torch.utils.flop_counter``
  counts them. Norms, softmax, activations, residual adds and position-table resizing are left out (they
  are linear in the token count and well under 1% at these sizes).
- attention is counted over the full score matrix (T x T), what a dense causal kernel computes and what
  the flop counter reports; the LLM's causal mask could in principle skip half of it.
- the ViT counts only the layers up to its feature layer (23 of 24 for layer -2): our encoder stops
  there (the released code runs the 24th and discards it); the baseline is counted the same way. Each
  piece is encoded on its own (the packed encoder's block-diagonal mask means no cross-piece
  attention), the CLS token included.
- the LLM counts every position once (a prefill of the whole prompt), the LM head included.

Dimensions: T tokens, L patches of a piece, Q resampler queries, Dv ViT width, D LLM width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_uhd.config import Preset, TextConfig, VisionConfig
from llava_uhd.errors import ConfigError
from llava_uhd.layout import visual_token_count
from llava_uhd.model.windows import pooled_size
from llava_uhd.slicing import SlicePlan

# LLaVA-1.5's projector: Linear(Dv, D) -> GELU -> Linear(D, D) on each of its visual tokens.
LLAVA15_PROJECTOR_LAYERS = 2

# Dimensions of the named checkpoints (their config.json), so FLOPs need no download.
KNOWN_TEXT_MODELS: dict[str, dict[str, Any]] = {
    "lmsys/vicuna-7b-v1.5": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "lmsys/vicuna-13b-v1.5": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
    },
}

# Decoder families whose MLP is gated (gate, up and down projections); others have two matrices.
GATED_MLP_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"})


@dataclass(frozen=True)
class TextDims:
    """The shape of a decoder-only LM, as far as FLOPs need it."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TextDims:
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or hidden // heads)
            return cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                vocab_size=int(config["vocab_size"]),
                gated_mlp=config.get("model_type", "llama") in GATED_MLP_TYPES,
            )
        except KeyError as exc:
            raise ConfigError(f"text config lacks {exc.args[0]!r} needed to count FLOPs") from None


def text_dims(text: TextConfig) -> TextDims:
    """LLM dims from the inline config, else ``config.json`` in a local folder, else the built-in table."""
    if text.config is not None:
        return TextDims.from_config(text.config)
    assert text.name_or_path is not None  # TextConfig guarantees one of the two
    config_file = Path(text.name_or_path) / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        return TextDims.from_config(data.get("text_config", data))
    if text.name_or_path in KNOWN_TEXT_MODELS:
        return TextDims.from_config(KNOWN_TEXT_MODELS[text.name_or_path])
    raise ConfigError(
        f"cannot count LLM FLOPs for {text.name_or_path!r}: not a local folder with config.json and not "
        f"one of the known models {sorted(KNOWN_TEXT_MODELS)}; give an inline text config"
    )


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A dense layer on ``tokens`` rows."""
    return 2 * tokens * d_in * d_out


def attention_core_flops(q_tokens: int, kv_tokens: int, width: int) -> int:
    """Scores ``QK^T`` plus the weighted sum ``AV`` over all heads (``width`` = heads * head dim)."""
    return 2 * (2 * q_tokens * kv_tokens * width)


def vit_layers_run(vision: VisionConfig) -> int:
    """Transformer layers evaluated to reach the feature layer (hidden state 0 is the embeddings)."""
    return vision.feature_layer if vision.feature_layer >= 0 else vision.num_layers + 1 + vision.feature_layer


def vit_piece_flops(vision: VisionConfig, rows: int, cols: int) -> int:
    """One piece of (rows, cols) patches through the ViT up to its feature layer."""
    patches = rows * cols
    tokens = patches + (1 if vision.use_cls_token else 0)
    d, f = vision.hidden_size, vision.intermediate_size
    embed = linear_flops(patches, vision.num_channels * vision.patch_size**2, d)  # the patch convolution
    per_layer = (
        linear_flops(tokens, d, 3 * d)  # q, k, v
        + attention_core_flops(tokens, tokens, d)
        + linear_flops(tokens, d, d)  # attention output
        + linear_flops(tokens, d, f)
        + linear_flops(tokens, f, d)
    )
    return embed + vit_layers_run(vision) * per_layer


def resampler_piece_flops(num_queries: int, patches: int, kv_dim: int, embed_dim: int) -> int:
    """The perceiver resampler on one piece of ``patches`` features (paper section 3.2)."""
    d = embed_dim
    kv_proj = linear_flops(patches, kv_dim, d) if kv_dim != d else 0
    return (
        kv_proj
        + linear_flops(num_queries, d, d)  # query projection
        + linear_flops(patches, d, 2 * d)  # key and value projections
        + attention_core_flops(num_queries, patches, d)
        + linear_flops(num_queries, d, d)  # attention output
        + linear_flops(num_queries, d, d)  # the final ``@ proj``
    )


def windowed_resampler_piece_flops(grid_side: int, rows: int, cols: int, kv_dim: int, embed_dim: int) -> int:
    """The released checkpoint's windowed resampler on one (rows x cols) piece (the official-v1 preset).

    Keys and values are projected after pooling: each of the Q = grid_side**2 queries attends to the
    ph x pw pooled cells of its own window only. The RoIAlign pooling itself is bilinear interpolation,
    not a matrix product, and is not counted (like the position-table resizes).
    """
    d = embed_dim
    queries = grid_side * grid_side
    pooled_h, pooled_w = pooled_size(rows, cols)
    cells = pooled_h * pooled_w
    kv_proj = linear_flops(rows * cols, kv_dim, d) if kv_dim != d else 0
    return (
        kv_proj
        + linear_flops(queries, d, d)  # query projection
        + linear_flops(queries * cells, d, 2 * d)  # key and value projections of the pooled cells
        + queries * attention_core_flops(1, cells, d)  # one query against its window's cells
        + linear_flops(queries, d, d)  # attention output
        + linear_flops(queries, d, d)  # the final ``@ proj``
    )


def resampler_flops(preset: Preset, rows: int, cols: int, embed_dim: int) -> int:
    """The preset's resampler (perceiver or windowed) on one (rows x cols) piece."""
    config, kv_dim = preset.resampler, preset.vision.hidden_size
    if config.kind == "windowed":
        return windowed_resampler_piece_flops(config.grid_side, rows, cols, kv_dim, embed_dim)
    return resampler_piece_flops(config.num_queries, rows * cols, kv_dim, embed_dim)


def llm_flops(dims: TextDims, tokens: int) -> int:
    """A decoder-only LM's forward over ``tokens`` positions, LM head included."""
    d = dims.hidden_size
    q_width = dims.num_heads * dims.head_dim
    kv_width = dims.num_kv_heads * dims.head_dim
    mlp_matrices = 3 if dims.gated_mlp else 2
    per_layer = (
        linear_flops(tokens, d, q_width)
        + linear_flops(tokens, d, 2 * kv_width)
        + attention_core_flops(tokens, tokens, q_width)
        + linear_flops(tokens, q_width, d)
        + mlp_matrices * linear_flops(tokens, d, dims.intermediate_size)
    )
    return dims.num_layers * per_layer + linear_flops(tokens, d, dims.vocab_size)


def _total(parts: dict[str, int]) -> dict[str, int]:
    return {**parts, "total": sum(parts.values())}


def uhd_flops(preset: Preset, plan: SlicePlan, text_tokens: int) -> dict[str, int]:
    """Forward FLOPs of one image planned by ``plan`` plus ``text_tokens`` text tokens.

    Returns ``{"vit", "resampler", "llm", "total"}``. The perceiver resampler runs at the LLM's width, so
    its key and value projections of every patch are not negligible (about 3.5% of the total for the 13B
    paper preset at 672x1088); the windowed one (``official-v1``) projects only the pooled cells.
    """
    vision, dims = preset.vision, text_dims(preset.text)
    grids = plan.piece_grids
    vit = sum(vit_piece_flops(vision, g.rows, g.cols) for g in grids)
    resampler = sum(resampler_flops(preset, g.rows, g.cols, dims.hidden_size) for g in grids)
    tokens = visual_token_count(plan, preset.resampler.num_queries) + text_tokens
    return _total({"vit": vit, "resampler": resampler, "llm": llm_flops(dims, tokens)})


def llava15_flops(preset: Preset, text_tokens: int) -> dict[str, int]:
    """The LLaVA-1.5 baseline: one image at the ViT's native size (336x336: 576 patches + CLS), every
    patch a visual token through the 2-layer MLP projector, then the LLM.

    Returns ``{"vit", "projector", "llm", "total"}``.
    """
    vision, dims = preset.vision, text_dims(preset.text)
    side = vision.grid_side
    visual_tokens = side * side
    projector = linear_flops(visual_tokens, vision.hidden_size, dims.hidden_size) + (
        LLAVA15_PROJECTOR_LAYERS - 1
    ) * linear_flops(visual_tokens, dims.hidden_size, dims.hidden_size)
    return _total(
        {
            "vit": vit_piece_flops(vision, side, side),
            "projector": projector,
            "llm": llm_flops(dims, visual_tokens + text_tokens),
        }
    )
