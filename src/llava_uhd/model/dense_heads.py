"""A vision tower with per-patch prediction heads: how a ViT is pretrained here when no CLIP weights exist.

LLaVA-UHD starts from a contrastively pretrained CLIP ViT (arXiv 2403.11703, section 4.1). Where no such
weights can be had, a tower in the same layout is pretrained on dense labels instead (the ``stage0``
training stage): linear heads on the features the resampler will read predict, for every patch, which
character is centred in each of its sub-cells and which box colour surrounds it. Linear heads make the
features themselves carry that information, which is what the frozen tower must hand on to the resampler.

The same labels then teach the fresh resampler a spatial code (the ``stage0_resampler`` stage): a small
decoder must redraw every patch's labels from its piece's Q resampler tokens alone, so the tokens have
to say which character sits where and inside which colour, the facts the language model later asks of
them. Without it, a resampler trained only through a small language model from scratch averaged the
characters away (captions stayed at chance on the digits; docs/synthdoc.md).

Dimensions: Pt patches over all pieces, N pieces, Q resampler tokens per piece, D tower (or resampler)
width, S sub-cells per patch, G glyph classes, K colour classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_uhd.config import Preset, VisionConfig
from llava_uhd.errors import ConfigError
from llava_uhd.model.init import init_sincos_table
from llava_uhd.model.packing import padding_mask
from llava_uhd.model.pos_embed import positions_per_patch
from llava_uhd.model.resamplers import build_resampler
from llava_uhd.model.vision import VisionTransformer


@dataclass
class DenseOutput:
    glyph_logits: torch.Tensor  # (Pt, S, G)
    colour_logits: torch.Tensor  # (Pt, K)


class DenseHeads(nn.Module):
    """Linear per-patch heads: S x G glyph logits and K colour logits from each D-wide feature."""

    def __init__(self, width: int, subcells: int, glyph_classes: int, colour_classes: int) -> None:
        super().__init__()
        self.subcells, self.glyph_classes = subcells, glyph_classes
        self.glyph = nn.Linear(width, subcells * glyph_classes)
        self.colour = nn.Linear(width, colour_classes)

    def forward(self, features: torch.Tensor) -> DenseOutput:
        glyph = self.glyph(features).view(features.shape[0], self.subcells, self.glyph_classes)
        return DenseOutput(glyph, self.colour(features))


class DenseVisionModel(nn.Module):
    """``vision_tower`` (the tower LLaVA-UHD later uses, frozen) plus ``dense_heads``."""

    def __init__(self, config: VisionConfig, subcells: int, glyph_classes: int, colour_classes: int) -> None:
        super().__init__()
        self.vision_tower = VisionTransformer(config)
        self.dense_heads = DenseHeads(config.hidden_size, subcells, glyph_classes, colour_classes)

    def forward(self, pixel_values: torch.Tensor, piece_grids: torch.Tensor) -> DenseOutput:
        """(Pt, C*P*P) patches and (N, 2) grids -> per-patch logits, patches in input order."""
        return self.dense_heads(self.vision_tower(pixel_values, piece_grids))


class DenseDecoder(nn.Module):
    """Per-patch dense logits of each piece from that piece's resampler tokens only: (N, Q, D) -> (Pt, ...).

    Every patch asks one cross-attention with its position (a sin-cos table resized to the piece, as the
    resampler's keys get theirs) over the piece's tokens; an MLP and :class:`DenseHeads` read the answer.
    """

    def __init__(
        self,
        width: int,
        grid_side: int,
        num_heads: int,
        subcells: int,
        glyph_classes: int,
        colour_classes: int,
    ) -> None:
        super().__init__()
        self.grid_side = grid_side
        self.patch_pos = nn.Parameter(torch.empty(grid_side * grid_side, width))
        self.token_pos = nn.Parameter(torch.empty(grid_side * grid_side, width))
        init_sincos_table(self.patch_pos, grid_side, grid_side)
        init_sincos_table(self.token_pos, grid_side, grid_side)
        self.ln_tokens = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.heads = DenseHeads(width, subcells, glyph_classes, colour_classes)

    def forward(self, tokens: torch.Tensor, piece_grids: torch.Tensor) -> DenseOutput:
        """(N, Q, D) tokens and (N, 2) grids -> logits of every patch, packed in piece order."""
        positions = positions_per_patch(self.patch_pos, piece_grids).to(tokens.dtype)  # (Pt, D)
        lengths = (piece_grids[:, 0] * piece_grids[:, 1]).to(tokens.device)  # (N,)
        pad = padding_mask(lengths, int(lengths.max()))  # (N, L) True on pads
        queries = positions.new_zeros(*pad.shape, positions.shape[-1])
        queries[~pad] = positions  # (N, L, D)
        memory = self.ln_tokens(tokens) + self.token_pos.to(tokens.dtype)  # (N, Q, D)
        attended, _ = self.attn(queries, memory, memory, need_weights=False)  # (N, L, D)
        hidden = positions + attended[~pad]  # (Pt, D)
        return self.heads(hidden + self.mlp(self.ln(hidden)))


class DenseResamplerModel(nn.Module):
    """``vision_tower`` (frozen by the stage), the LLaVA-UHD ``resampler`` and its ``dense_decoder``.

    Module names match :class:`~llava_uhd.model.llava_uhd.LlavaUHDForConditionalGeneration`, so stage 1
    starts from this run with ``init_modules: [vision_tower, resampler]``.
    """

    def __init__(self, preset: Preset, subcells: int, glyph_classes: int, colour_classes: int) -> None:
        super().__init__()
        text = preset.text.config
        if text is None or "hidden_size" not in text:
            raise ConfigError(
                f"preset {preset.name!r}: the resampler's width comes from an inline text config with "
                "hidden_size, which this preset does not have"
            )
        width = int(text["hidden_size"])
        self.vision_tower = VisionTransformer(preset.vision)
        self.resampler = build_resampler(preset.resampler, preset.vision.hidden_size, width)
        self.dense_decoder = DenseDecoder(
            width,
            preset.resampler.grid_side,
            self.resampler.num_heads,
            subcells,
            glyph_classes,
            colour_classes,
        )

    def forward(self, pixel_values: torch.Tensor, piece_grids: torch.Tensor) -> DenseOutput:
        """(Pt, C*P*P) patches and (N, 2) grids -> per-patch logits read back through the resampler."""
        tokens = self.resampler(self.vision_tower(pixel_values, piece_grids), piece_grids)
        return self.dense_decoder(tokens, piece_grids)
