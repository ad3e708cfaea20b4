"""The paper's shared perceiver resampler (LLaVA-UHD paper section 3.2).

Every piece (slice or overview) is compressed to the same Q tokens by one cross-attention: Q learned
queries, with a fixed 2D sin-cos position table, attend to all of the piece's ViT features, whose keys
carry the same table bicubically resized to the piece's patch grid. The parameters and the steps around
the attention are :class:`~llava_uhd.model.resampler_base.Resampler`'s.

Pieces of different sizes are batched without a Python loop per piece: the packed features are scattered
into an (N, Lmax, D) key tensor by index arithmetic and the padding is hidden by a key-padding mask, so
one attention call serves every piece. Position tables are resized once per distinct grid shape.

Dimensions: Pt patches in the batch (all pieces packed), N pieces, Lmax the most patches of a piece, Q
queries, D output width (the LLM's).
"""

from __future__ import annotations

import torch

from llava_uhd.model.packing import padding_mask, segment_slots
from llava_uhd.model.resampler_base import Resampler


class PerceiverResampler(Resampler):
    """One cross-attention from Q learned queries to all of each piece's features: (Pt, Dv) -> (N, Q, D).

    Constructor and parameters are :class:`~llava_uhd.model.resampler_base.Resampler`'s.
    """

    def forward(self, features: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
        """(Pt, Dv) packed features of N pieces with (N, 2) (rows, cols) grids -> (N, Q, D) tokens."""
        counts, keys, values = self.keys_and_values(features, piece_grids)  # (N,), (Pt, D), (Pt, D)
        num_pieces, max_len = counts.numel(), int(counts.max())
        # slot of every patch in the (N * Lmax) padded layout
        slots = segment_slots(counts, torch.arange(num_pieces, device=counts.device) * max_len)  # (Pt,)
        k_pad, v_pad = (
            t.new_zeros(num_pieces * max_len, self.embed_dim)
            .index_copy(0, slots, t)
            .view(num_pieces, max_len, self.embed_dim)
            for t in (keys, values)
        )  # (N, Lmax, D) each
        q = self.queries().to(values.dtype).expand(num_pieces, -1, -1)  # (N, Q, D)
        out, _ = self.attn(
            q, k_pad, v_pad, key_padding_mask=padding_mask(counts, max_len), need_weights=False
        )  # (N, Q, D)
        return self.output(out)
