"""The vision encoder: a ViT in CLIP's layout that encodes pieces of any patch grid, packed in one sequence.

LLaVA-UHD feeds every slice to the ViT at its native aspect ratio (arXiv 2403.11703, section 3.1): the
pre-trained 24x24 position table is bicubically resized to the slice's (rows, cols) patch grid, the CLS
row kept as is (DESIGN.md section 4). All pieces of a batch run as ONE packed sequence, each piece being
its CLS token followed by its patches; attention stays within a piece (see :mod:`.attention`), so no
piece is padded and no Python loop runs per piece. Pieces are packed sorted by length so that equal-length
pieces are adjacent and the "grouped" attention strategy needs one dense SDPA call per distinct length.

The layout follows Hugging Face's ``CLIPVisionModel`` (pre-layernorm, pre-norm blocks with q/k/v/out
projections, quick-GELU MLP) so that its weights load through an explicit key map
(:func:`llava_uhd.model.weights.clip_vision_key_map`); a SigLIP-style tower (no CLS, no pre-layernorm,
patch bias, tanh-GELU) is a :class:`~llava_uhd.config.VisionConfig` away.

Dimensions: N pieces, Pt patches over all pieces, L packed tokens (Pt plus one CLS per piece when the
config has one), U distinct piece grids, D hidden size, H heads, Dh head width, K = C * P * P values of
a flattened patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN

from llava_uhd.config import VisionConfig
from llava_uhd.errors import ConfigError
from llava_uhd.model.attention import PackedAttention, PaddedAttention, cu_seqlens
from llava_uhd.model.pos_embed import resize_grid_table
from llava_uhd.model.stem import ConvStem, center_pieces

PADDED = "padded"  # every piece padded to the pre-training grid: the baseline of benchmarks/vision.py
# Most rows per chunk of whole pieces when a block runs without autograd on CPU. At ViT-L width the
# chunk's MLP intermediate is then <= 1536 x 4096 floats = 24 MiB: under glibc's 32 MiB ceiling for
# reusing freed heap memory (bigger buffers are mmapped and page-faulted afresh every time) and about the
# last-level cache, while the matmuls stay large. On 2 cores, 1 layer over 3 mixed images (10.5k rows):
# 4.29 CPU s vs 4.37 with 4096-row chunks and 4.77 unchunked (benchmarks/vision.py's batch).
CHUNK_ROWS = 1536
# Rows per slice of the in-place MLP activation: its temporaries (256 x 4096 floats = 4 MiB) stay in cache.
ACT_ROWS = 256


class PatchEmbed(nn.Module):
    """Conv2d(C, D, P, stride P) applied to already-flattened patches, i.e. one linear layer.

    The weight keeps the conv's (D, C, P, P) shape so that CLIP checkpoints load by name alone; a patch
    flattened as (C, P, P) (docs/INTERFACES.md) dotted with ``weight.reshape(D, K)`` is exactly the conv.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.weight = nn.Parameter(torch.empty(d, c, p, p))
        self.bias = nn.Parameter(torch.zeros(d)) if config.patch_bias else None
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(Pt, K) -> (Pt, D), plus (Pt, D) ``positions`` when given, added by the matmul itself."""
        weight = self.weight.flatten(1)
        if positions is None:
            return F.linear(patches.to(weight.dtype), weight, self.bias)
        out = torch.addmm(positions, patches.to(weight.dtype), weight.t())
        return out if self.bias is None else out + self.bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (CLIP's parameter layout)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, attend: PackedAttention | PaddedAttention) -> torch.Tensor:
        """(L, D) -> (L, D), attending only within each packed sequence."""
        heads = (x.shape[0], self.num_heads, -1)
        q, k, v = (proj(x).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))  # (L, H, Dh)
        return self.out_proj(attend(q, k, v).reshape(x.shape))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attend: PackedAttention | PaddedAttention) -> torch.Tensor:
        # The chunked path writes into buffers of x's dtype with explicit matmuls, which autocast does
        # not see; under autocast (and for autograd or GPUs) the plain module calls run instead.
        if x.device.type != "cpu" or _tracks_grad(x, self) or torch.is_autocast_enabled("cpu"):
            x = x + self.attn(self.norm1(x), attend)
            return x + self.mlp(self.norm2(x))
        return self._forward_in_chunks(x, attend)

    def _forward_in_chunks(self, x: torch.Tensor, attend: PackedAttention | PaddedAttention) -> torch.Tensor:
        """The same block without autograd, run on chunks of whole pieces with the residual adds in place.

        Attention never crosses a piece, so a chunk of whole pieces is a self-contained sub-batch. Run
        over the whole packed batch (tens of thousands of rows), every intermediate would be hundreds of
        MB (the MLP's is L x 4096 floats, ~430 MB at 26k rows): a fresh allocation page-faulted in and
        streamed through DRAM by each elementwise op. Per chunk of at most ``CHUNK_ROWS`` rows they stay
        small enough for the allocator to reuse and mostly for the cache, the matmuls stay large, and the
        residual adds ride on the matmuls (``addmm`` accumulates into the output rows; the ``out=`` form, not
        ``addmm_``, so that ``torch.utils.flop_counter`` still counts it).
        """
        chunks = attend.split(CHUNK_ROWS)
        most = max(rows.stop - rows.start for rows, _ in chunks)
        # Buffers reused by every chunk: allocated afresh per chunk, glibc hands this much memory back to
        # the OS and page-faults it in again (measured: ~0.9 s of system time per layer on the batch of
        # benchmarks/vision.py, about 13% of the layer).
        qkv = x.new_empty(most, 3, x.shape[1])
        hidden = x.new_empty(most, self.mlp.fc1.out_features)
        projections = (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)
        out = x.clone()
        for rows, chunk_attend in chunks:
            y = out[rows]  # a view: the in-place adds below write the block's output
            n = y.shape[0]
            h = self.norm1(y)
            for i, proj in enumerate(projections):
                torch.addmm(proj.bias, h, proj.weight.t(), out=qkv[:n, i])
            q, k, v = (qkv[:n, i].view(n, self.attn.num_heads, -1) for i in range(3))  # (n, H, Dh)
            context = chunk_attend(q, k, v).reshape(y.shape)
            torch.addmm(y, context, self.attn.out_proj.weight.t(), out=y).add_(self.attn.out_proj.bias)
            h = torch.addmm(self.mlp.fc1.bias, self.norm2(y), self.mlp.fc1.weight.t(), out=hidden[:n])
            for part in h.split(ACT_ROWS):  # in place, with cache-sized temporaries
                part.copy_(self.mlp.act(part))
            torch.addmm(y, h, self.mlp.fc2.weight.t(), out=y).add_(self.mlp.fc2.bias)
        return out


@dataclass(frozen=True)
class PackedLayout:
    """Where every input patch and CLS token sits in the packed sequence.

    Attributes:
        num_tokens: L, the packed sequence's length (pads included for "padded").
        patch_slots: (Pt,) packed position of each input patch, in input order.
        cls_slots: (N,) packed position of each piece's CLS token, in input order (empty without CLS).
        attend: the attention over the packed sequences.
    """

    num_tokens: int
    patch_slots: torch.Tensor
    cls_slots: torch.Tensor
    attend: PackedAttention | PaddedAttention


class VisionTransformer(nn.Module):
    """CLIP-layout ViT over packed pieces of any patch grid (docs/INTERFACES.md, "Model").

    Args:
        config: the tower's shape; ``config.feature_layer`` picks the hidden state :meth:`forward` returns.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.num_prefix = 1 if config.use_cls_token else 0
        # exactly one of the two front ends exists, so state dicts name only real parameters
        self.patch_embed = PatchEmbed(config) if config.stem == "patch" else None
        self.stem = ConvStem(config) if config.stem == "conv" else None
        self.cls_token = nn.Parameter(torch.randn(d) * d**-0.5) if config.use_cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(config.grid_side**2 + self.num_prefix, d) * 0.02)
        self.pre_norm = (
            nn.LayerNorm(d, eps=config.layer_norm_eps) if config.use_pre_layernorm else nn.Identity()
        )
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        # Recompute each block in the backward pass instead of storing its activations (training only).
        self.gradient_checkpointing = False

    @property
    def feature_index(self) -> int:
        """``config.feature_layer`` as an index into :meth:`hidden_states` (0 = embeddings)."""
        layer = self.config.feature_layer
        return layer if layer >= 0 else self.config.num_layers + 1 + layer

    def forward(
        self, pixel_values: torch.Tensor, piece_grids: torch.Tensor, strategy: str = "auto"
    ) -> torch.Tensor:
        """(Pt, K) patches and (N, 2) (rows, cols) grids -> (Pt, D) features of ``config.feature_layer``.

        CLS tokens are dropped and patches come back in input order. Layers after the feature layer are
        not run (they would not change the result). ``strategy`` is an attention strategy of
        :class:`~llava_uhd.model.attention.PackedAttention` or "padded" (the benchmark's baseline).
        """
        layout, hidden = self._run(pixel_values, piece_grids, strategy, self.feature_index, keep_all=False)
        return hidden[-1][layout.patch_slots]

    def hidden_states(
        self, pixel_values: torch.Tensor, piece_grids: torch.Tensor, strategy: str = "auto"
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Every hidden state, indexed like transformers' ``hidden_states`` (0 = embeddings after pre-LN).

        Returns ``(patches, cls)``: ``patches`` holds num_layers + 1 tensors of shape (Pt, D) in input order;
        ``cls`` is (num_layers + 1, N, D), or None for towers without a CLS token.
        """
        layout, hidden = self._run(pixel_values, piece_grids, strategy, self.config.num_layers, keep_all=True)
        patches = tuple(h[layout.patch_slots] for h in hidden)
        cls = torch.stack([h[layout.cls_slots] for h in hidden]) if self.num_prefix else None
        return patches, cls

    def position_embeddings(self, piece_grids: torch.Tensor) -> torch.Tensor:
        """(N, 2) grids -> (Pt, D) position rows of every patch, pieces in input order.

        The square table is resized once per distinct grid (float32, cast back; DESIGN.md section 4) into
        one bank; every patch then gathers its row from the bank by index, with no loop over pieces.
        """
        table = self.pos_embed[self.num_prefix :]
        shapes, shape_of_piece = torch.unique(piece_grids, dim=0, return_inverse=True)  # (U, 2), (N,)
        bank = torch.cat([resize_grid_table(table, rows, cols) for rows, cols in shapes.tolist()])
        bank_start = cu_seqlens(shapes.prod(dim=1))[:-1]  # (U,)
        counts = piece_grids.prod(dim=1)  # (N,)
        piece_of_patch = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        local = torch.arange(int(counts.sum()), device=counts.device) - cu_seqlens(counts)[piece_of_patch]
        return bank[bank_start[shape_of_piece][piece_of_patch] + local]

    def layout(self, piece_grids: torch.Tensor, strategy: str = "auto") -> PackedLayout:
        """Plan the packed sequence for (N, 2) grids: sorted by length, or padded to the pre-training grid."""
        grids = piece_grids.to(torch.int64)
        counts = grids.prod(dim=1)  # (N,)
        lengths = counts + self.num_prefix  # tokens per piece
        total_patches = int(counts.sum())
        if strategy == PADDED:
            pad_to = max(self.config.grid_side**2 + self.num_prefix, int(lengths.max()))
            starts = torch.arange(counts.numel(), device=grids.device) * pad_to
            attend: PackedAttention | PaddedAttention = PaddedAttention.build(lengths, pad_to, grids.device)
            total = pad_to * counts.numel()
        else:
            # Stable sort: equal-length pieces become adjacent (one dense attention call per length) and
            # keep their input order among themselves.
            order = torch.argsort(lengths, stable=True)
            starts = torch.empty_like(lengths)
            starts[order] = cu_seqlens(lengths[order])[:-1]
            attend = PackedAttention.build(
                lengths[order],
                grids.device,
                self.pos_embed.dtype,
                strategy,  # type: ignore[arg-type]
            )
            total = int(lengths.sum())
        piece_of_patch = torch.repeat_interleave(torch.arange(counts.numel(), device=grids.device), counts)
        local = torch.arange(total_patches, device=grids.device) - cu_seqlens(counts)[piece_of_patch]
        patch_slots = starts[piece_of_patch] + self.num_prefix + local
        cls_slots = starts if self.num_prefix else starts[:0]
        return PackedLayout(total, patch_slots, cls_slots, attend)

    def embed(
        self, pixel_values: torch.Tensor, piece_grids: torch.Tensor, layout: PackedLayout
    ) -> torch.Tensor:
        """Patch embedding + resized positions (+ CLS with its own position row), packed, after pre-LN: (L, D)."""
        if self.config.center_pieces:
            pixel_values = center_pieces(pixel_values, piece_grids, self.config.num_channels)
        positions = self.position_embeddings(piece_grids)
        if self.stem is not None:
            patches = self.stem(pixel_values, piece_grids) + positions  # (Pt, D)
        else:
            patches = self.patch_embed(pixel_values, positions)  # (Pt, D)
        # Written straight into packed order: at ~26k tokens every extra (L, D) temporary is ~100 MB.
        tokens = patches.new_zeros(layout.num_tokens, patches.shape[1])  # pad rows ("padded") stay zero
        tokens[layout.patch_slots] = patches
        if self.cls_token is not None:
            # under autocast the patch matmul gives bf16/fp16 while the CLS parameters stay float32
            tokens[layout.cls_slots] = (self.cls_token + self.pos_embed[0]).to(tokens.dtype)
        return self.pre_norm(tokens)

    def _run(
        self, pixel_values: torch.Tensor, piece_grids: torch.Tensor, strategy: str, depth: int, keep_all: bool
    ) -> tuple[PackedLayout, list[torch.Tensor]]:
        _check_inputs(pixel_values, piece_grids, self.config)
        layout = self.layout(piece_grids, strategy)
        x = self.embed(pixel_values, piece_grids, layout)
        hidden = [x]
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks[:depth]:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, layout.attend, use_reentrant=False)
            else:
                x = block(x, layout.attend)
            hidden = [*hidden, x] if keep_all else [x]
        return layout, hidden


def _tracks_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd records this call (the in-place chunked path is for inference and frozen towers)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


def _check_inputs(pixel_values: torch.Tensor, piece_grids: torch.Tensor, config: VisionConfig) -> None:
    """Shape checks with the offending values named (a wrong count would silently misalign pieces)."""
    patch_values = config.num_channels * config.patch_size**2
    if piece_grids.ndim != 2 or piece_grids.shape[1] != 2 or piece_grids.shape[0] == 0:
        raise ConfigError(
            f"piece_grids must be (N >= 1, 2) (rows, cols), got shape {tuple(piece_grids.shape)}"
        )
    if piece_grids.is_floating_point() or bool((piece_grids < 1).any()):
        raise ConfigError(f"piece_grids must be positive integers, got {piece_grids.tolist()}")
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_values:
        raise ConfigError(
            f"pixel_values must be (Pt, C*P*P = {patch_values}), got shape {tuple(pixel_values.shape)}"
        )
    expected = int(piece_grids.prod(dim=1).sum())
    if pixel_values.shape[0] != expected:
        raise ConfigError(
            f"pixel_values has {pixel_values.shape[0]} patches but piece_grids {piece_grids.tolist()} "
            f"add up to {expected}"
        )
