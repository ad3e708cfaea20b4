"""The shared perceiver resampler (LLaVA-UHD paper section 3.2; DESIGN.md section 5).

Every piece (slice or overview) is compressed to the same Q tokens by one cross-attention: Q learned
queries, with a fixed 2D sin-cos position table, attend to the piece's ViT features, whose keys carry
the same table bicubically resized to the piece's patch grid. Parameter names follow the released
checkpoint (``query``, ``pos_embed``, ``kv_proj``, ``attn``, ``ln_q``, ``ln_kv``, ``ln_post``, ``proj``).

Pieces of different sizes are batched without a Python loop per piece: the packed features are scattered
into an (N, Lmax, D) key tensor by index arithmetic and the padding is hidden by a key-padding mask, so
one attention call serves every piece. Position tables are resized once per distinct grid shape.

Dimensions: Pt patches in the batch (all pieces packed), N pieces, L patches of one piece (rows * cols),
Lmax the largest L, Q queries, Dv ViT width (``kv_dim``), D output width (``embed_dim``, the LLM's).
"""

from __future__ import annotations

import torch
from torch import nn

from llava_uhd.config import ResamplerConfig
from llava_uhd.errors import ConfigError
from llava_uhd.model.pos_embed import resize_grid_table, sincos_2d

# Released recipe (and timm's ViT init): truncated normal with this std for queries and linear weights.
INIT_STD = 0.02


def check_piece_grids(features: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
    """Validate (N, 2) (rows, cols) grids against packed (Pt, Dv) features; return per-piece lengths (N,)."""
    if piece_grids.ndim != 2 or piece_grids.shape[1] != 2:
        raise ConfigError(
            f"piece_grids must have shape (N, 2) as (rows, cols), got {tuple(piece_grids.shape)}"
        )
    if features.ndim != 2:
        raise ConfigError(f"features must be packed as (Pt, Dv), got shape {tuple(features.shape)}")
    if piece_grids.numel() and int(piece_grids.min()) < 1:
        raise ConfigError(f"piece_grids must be positive, got {piece_grids.tolist()}")
    lengths = piece_grids[:, 0] * piece_grids[:, 1]  # (N,)
    total = int(lengths.sum())
    if total != features.shape[0]:
        raise ConfigError(
            f"piece_grids cover {total} patches but features have {features.shape[0]} rows; "
            f"grids {piece_grids.tolist()}"
        )
    return lengths


class PerceiverResampler(nn.Module):
    """One cross-attention from Q learned queries to each piece's features: (Pt, Dv) -> (N, Q, D).

    Args:
        config: query count, heads (``resolved_heads(embed_dim)``) and LayerNorm epsilon.
        kv_dim: width of the incoming ViT features (Dv).
        embed_dim: width of the output tokens (D, the LLM's hidden size).

    ``pos_embed`` starts as the sin-cos table but is a stored parameter: the released stage 1 trains it,
    so checkpoints carry their own table (DESIGN.md section 5); it is loaded, never recomputed.
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
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released init: trunc-normal(0.02) queries and linears, LayerNorm 1/0, proj = D^-0.5 * randn.

        ``attn.in_proj_weight`` keeps torch's own (Xavier) init, as in the released code, whose init only
        visits ``nn.Linear`` and ``nn.LayerNorm`` modules (``attn.out_proj`` is a Linear).
        """
        nn.init.trunc_normal_(self.query, std=INIT_STD)
        self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_side, self.grid_side))
        self.attn._reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.proj.copy_(self.embed_dim**-0.5 * torch.randn(self.embed_dim, self.embed_dim))

    def key_positions(self, piece_grids: torch.Tensor) -> torch.Tensor:
        """The packed (Pt, D) key position table: ``pos_embed`` resized to each piece's (rows, cols).

        Each distinct grid shape is resized once; pieces pick their rows by index arithmetic.
        """
        shapes, shape_of_piece = torch.unique(piece_grids, dim=0, return_inverse=True)  # (U, 2), (N,)
        tables = [resize_grid_table(self.pos_embed, int(r), int(c)) for r, c in shapes.tolist()]
        shape_lengths = shapes[:, 0] * shapes[:, 1]  # (U,)
        shape_starts = torch.cumsum(shape_lengths, 0) - shape_lengths  # (U,) row of each table in the concat
        lengths = piece_grids[:, 0] * piece_grids[:, 1]  # (N,)
        piece_of_patch, local_index = _packed_indices(lengths)  # (Pt,), (Pt,)
        rows = shape_starts[shape_of_piece][piece_of_patch] + local_index  # (Pt,)
        return torch.cat(tables, dim=0)[rows]  # (Pt, D)

    def queries(self, num_pieces: int) -> torch.Tensor:
        """(N, Q, D) attention queries: normalised learned queries plus their 2D positions."""
        q = self.ln_q(self.query) + self.pos_embed  # (Q, D)
        return q.unsqueeze(0).expand(num_pieces, -1, -1)

    def forward(self, features: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
        """(Pt, Dv) packed features of N pieces with (N, 2) grids -> (N, Q, D) tokens."""
        lengths = check_piece_grids(features, piece_grids).to(features.device)
        piece_grids = piece_grids.to(features.device)
        x = self.ln_kv(self.kv_proj(features))  # (Pt, D)
        keys = x + self.key_positions(piece_grids).to(x.dtype)  # (Pt, D)

        num_pieces = piece_grids.shape[0]
        max_len = int(lengths.max())
        piece_of_patch, local_index = _packed_indices(lengths)
        flat_slot = piece_of_patch * max_len + local_index  # (Pt,) slot in the (N * Lmax) padded layout
        k_pad = x.new_zeros(num_pieces * max_len, self.embed_dim).index_copy(0, flat_slot, keys)
        v_pad = x.new_zeros(num_pieces * max_len, self.embed_dim).index_copy(0, flat_slot, x)
        k_pad = k_pad.view(num_pieces, max_len, self.embed_dim)  # (N, Lmax, D)
        v_pad = v_pad.view(num_pieces, max_len, self.embed_dim)
        padding = torch.arange(max_len, device=x.device)[None, :] >= lengths[:, None]  # (N, Lmax) True = pad

        q = self.queries(num_pieces).to(x.dtype)  # (N, Q, D)
        out, _ = self.attn(q, k_pad, v_pad, key_padding_mask=padding, need_weights=False)  # (N, Q, D)
        return self.ln_post(out) @ self.proj


def _packed_indices(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For pieces of (N,) lengths packed end to end: each patch's piece index and index within it, (Pt,)."""
    piece_of_patch = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths  # (N,)
    local_index = torch.arange(piece_of_patch.numel(), device=lengths.device) - starts[piece_of_patch]
    return piece_of_patch, local_index


def build_resampler(config: ResamplerConfig, kv_dim: int, embed_dim: int) -> nn.Module:
    """The resampler of ``config.kind``: the paper's perceiver, or the released checkpoint's windowed one."""
    if config.kind == "perceiver":
        return PerceiverResampler(config, kv_dim, embed_dim)
    if config.kind == "windowed":
        # Imported lazily: the windowed resampler lives in its own module and is optional for the paper preset.
        from llava_uhd.model.resampler_windowed import WindowedResampler

        return WindowedResampler(config, kv_dim, embed_dim)
    raise ConfigError(f"unknown resampler kind {config.kind!r}; expected 'perceiver' or 'windowed'")
