"""What both resamplers share: the released checkpoint's parameters and the steps around the attention.

Paper section 3.2: every piece (slice or overview) is compressed to the same Q
tokens by Q learned queries cross-attending to the piece's ViT features,

    x = ln_kv(kv_proj(features))                       # (Pt, D) values
    k = x + pos_embed resized bicubic to (rows, cols)  # (Pt, D) keys
    q = ln_q(query) + pos_embed                        # (Q, D)
    out = attn(q, keys, values)                        # which keys a query sees is the subclass's choice
    y = ln_post(out) @ proj                            # (N, Q, D)

:class:`~llava_uhd.model.resampler.PerceiverResampler` (the paper's) lets every query see the whole
piece; :class:`~llava_uhd.model.resampler_windowed.WindowedResampler` (the released checkpoint's) one
window of it. Parameter names are the released checkpoint's (``query``, ``pos_embed``, ``kv_proj``,
``attn``, ``ln_q``, ``ln_kv``, ``ln_post``, ``proj``), so both load the same state dicts.

Dimensions: Pt patches in the batch (all pieces packed), N pieces, Q queries, Dv ViT width (``kv_dim``),
D output width (``embed_dim``, the LLM's).
"""

from __future__ import annotations

import torch
from torch import nn

from llava_uhd.config import ResamplerConfig
from llava_uhd.errors import ConfigError, ModelInputError
from llava_uhd.model.init import init_output_projection, init_query, init_sincos_table, init_weights
from llava_uhd.model.packing import check_piece_grids
from llava_uhd.model.pos_embed import positions_per_patch


class Resampler(nn.Module):
    """The shared parameters and steps of a resampler, (Pt, Dv) packed features -> (N, Q, D) tokens.

    Args:
        config: query count, heads (``resolved_heads(embed_dim)``) and LayerNorm epsilon.
        kv_dim: width of the incoming ViT features (Dv).
        embed_dim: width of the output tokens (D, the LLM's hidden size).

    ``pos_embed`` starts as the sin-cos table but is a stored parameter: the released stage 1 trains it,
    so checkpoints carry their own table; it is loaded, never recomputed.
    Subclasses implement ``forward(features, piece_grids)`` from :meth:`keys_and_values`,
    :meth:`queries` and :meth:`output`.
    """

    def __init__(self, config: ResamplerConfig, kv_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.kv_dim = kv_dim
        self.embed_dim = embed_dim
        self.num_queries = config.num_queries
        self.grid_side = config.grid_side
        self.num_heads = config.resolved_heads(embed_dim)
        if embed_dim % 4:
            raise ConfigError(
                f"resampler embed_dim must be a multiple of 4 for 2D sin-cos positions, got {embed_dim}"
            )

        self.query = nn.Parameter(torch.empty(self.num_queries, embed_dim))
        self.pos_embed = nn.Parameter(torch.empty(self.num_queries, embed_dim))
        # The released code projects only when the widths differ (no bias), else passes features through.
        self.kv_proj: nn.Module = (
            nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        )
        self.attn = nn.MultiheadAttention(embed_dim, self.num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.apply(init_weights)

    def init_own_parameters(self) -> None:
        """The recipe of :mod:`llava_uhd.model.init` for the queries, their positions and ``proj``."""
        init_query(self.query)
        init_sincos_table(self.pos_embed, self.grid_side, self.grid_side)
        init_output_projection(self.proj)

    def key_positions(self, piece_grids: torch.Tensor) -> torch.Tensor:
        """The packed (Pt, D) key position table: ``pos_embed`` resized to each piece's (rows, cols)."""
        return positions_per_patch(self.pos_embed, piece_grids)

    def keys_and_values(
        self, features: torch.Tensor, piece_grids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check the inputs; return the (N,) patch counts, (Pt, D) keys and (Pt, D) values, packed."""
        counts = check_piece_grids(piece_grids).to(features.device)
        if features.ndim != 2:
            raise ModelInputError(f"features must be packed as (Pt, Dv), got shape {tuple(features.shape)}")
        total = int(counts.sum())
        if total != features.shape[0]:
            raise ModelInputError(
                f"piece_grids cover {total} patches but features have {features.shape[0]} rows; "
                f"grids {piece_grids.tolist()}"
            )
        values = self.ln_kv(self.kv_proj(features))  # (Pt, D)
        keys = values + self.key_positions(piece_grids.to(features.device)).to(values.dtype)
        return counts, keys, values

    def queries(self) -> torch.Tensor:
        """(Q, D) attention queries: normalised learned queries plus their 2D positions."""
        return self.ln_q(self.query) + self.pos_embed

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """(N, Q, D) attention outputs -> (N, Q, D) tokens for the LLM."""
        return self.ln_post(attended) @ self.proj
