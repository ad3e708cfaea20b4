"""A convolutional stem for ViTs trained from scratch: one token per P x P patch, like CLIP's patch embedding.

A linear patch embedding sees each 14 x 14 patch alone; a tower trained from scratch on small glyphs
learns to read them much faster through a few small convolutions (Xiao et al., "Early convolutions help
transformers see better", 2021). The stem keeps everything the rest of the encoder relies on: its overall
stride is the patch size, so a piece of (rows, cols) patches still gives rows x cols tokens, in the same
row-major order, and the position table is resized per piece as before.

    3x3 stride 2 -> c1, LayerNorm, GELU -> 3x3 -> c2, LayerNorm, GELU -> (P/2 + 2) stride P/2 -> D

The last kernel overlaps its neighbours by one half-resolution pixel on each side, so a glyph cut by a
patch border is still seen whole by the patches on both sides. Pieces of the same grid run as one batch:
one Python iteration per distinct grid (an image has at most two), none per piece.

Dimensions: Pt patches over all pieces, C channels, P patch side, D hidden size, G pieces of one grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_uhd.config import VisionConfig
from llava_uhd.errors import ConfigError
from llava_uhd.model.packing import gather_segments, segment_ids


def center_pieces(pixel_values: torch.Tensor, piece_grids: torch.Tensor, channels: int) -> torch.Tensor:
    """Subtract each piece's mean value per channel from its patches: (Pt, C*P*P) -> (Pt, C*P*P).

    A near-white page otherwise gives every token nearly the same input and a from-scratch tower's
    tokens collapse; centring keeps the contrast of the ink and drops the page's brightness.
    """
    counts = piece_grids.prod(dim=1)
    piece_of_patch = segment_ids(counts)
    per_channel = pixel_values.view(pixel_values.shape[0], channels, -1)  # (Pt, C, P*P)
    sums = per_channel.new_zeros(counts.numel(), channels).index_add_(0, piece_of_patch, per_channel.sum(-1))
    means = sums / (counts[:, None] * per_channel.shape[-1])  # (N, C)
    return (per_channel - means[piece_of_patch][:, :, None]).view_as(pixel_values)


class _PixelNorm(nn.Module):
    """LayerNorm over channels at every pixel of a (G, C, H, W) map, then GELU."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class ConvStem(nn.Module):
    """(Pt, C*P*P) flattened patches of N pieces -> (Pt, D) tokens, in input order."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        p = config.patch_size
        if p % 2:
            raise ConfigError(f"the conv stem needs an even patch size, got {p}")
        c1, c2 = config.stem_channels
        self.patch_size, self.channels = p, config.num_channels
        self.conv1 = nn.Conv2d(config.num_channels, c1, 3, stride=2, padding=1)
        self.norm1 = _PixelNorm(c1, config.layer_norm_eps)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.norm2 = _PixelNorm(c2, config.layer_norm_eps)
        # on a map of (rows * P/2) pixels, kernel P/2 + 2 with stride P/2 and padding 1 gives rows outputs
        self.conv3 = nn.Conv2d(c2, config.hidden_size, p // 2 + 2, stride=p // 2, padding=1)

    def forward(self, patches: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.channels
        counts = piece_grids.prod(dim=1)
        out = patches.new_empty(patches.shape[0], self.conv3.out_channels, dtype=self.conv3.weight.dtype)
        shapes, shape_of_piece = torch.unique(piece_grids, dim=0, return_inverse=True)
        for u, (rows, cols) in enumerate(shapes.tolist()):
            pieces = torch.nonzero(shape_of_piece == u).flatten()  # (G,)
            rows_index = gather_segments(counts, pieces)  # the G pieces' patch rows, in order
            grid = patches[rows_index].to(self.conv1.weight.dtype)
            image = (
                grid.view(-1, rows, cols, c, p, p)
                .permute(0, 3, 1, 4, 2, 5)
                .reshape(-1, c, rows * p, cols * p)
            )
            x = self.norm1(self.conv1(image))
            x = self.norm2(self.conv2(x))
            tokens = self.conv3(x)  # (G, D, rows, cols)
            out[rows_index] = tokens.permute(0, 2, 3, 1).reshape(-1, tokens.shape[1])
        return out
