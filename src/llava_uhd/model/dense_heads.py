"""A vision tower with per-patch prediction heads: how a ViT is pretrained here when no CLIP weights exist.

LLaVA-UHD starts from a contrastively pretrained CLIP ViT (arXiv 2403.11703, section 4.1). Where no such
weights can be had, a tower in the same layout is pretrained on dense labels instead (the ``stage0``
training stage): linear heads on the features the resampler will read predict, for every patch, which
character is centred in each of its sub-cells and which box colour surrounds it. Linear heads make the
features themselves carry that information, which is what the frozen tower must hand on to the resampler.

Dimensions: Pt patches over all pieces, D tower width, S sub-cells per patch, G glyph classes, K colour
classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_uhd.config import VisionConfig
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
