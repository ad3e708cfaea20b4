"""The vision encoder: a ViT in CLIP's layout that encodes pieces of any patch grid, packed in one sequence.

LLaVA-UHD feeds every slice to the ViT at its native aspect ratio (arXiv 2403.11703, section 3.1): the
pre-trained 24x24 position table is bicubically resized to the slice's (rows, cols) patch grid, the CLS
row kept as is. All pieces of a batch run as ONE packed sequence, each piece being its CLS token followed
by its patches; attention stays within a piece (see :mod:`.attention`), so no piece is padded and no
Python loop runs per piece. Pieces are packed sorted by length so that equal-length pieces are adjacent
and the "grouped" attention strategy needs one dense SDPA call per distinct length. A block's path is its
module calls: with autograd, on GPUs, under ZeRO-3. On CPU, when autograd records nothing (inference, a
frozen tower), it runs the same arithmetic hand-fused on chunks of whole pieces, which benchmarks/README.md
("Vision encoder") times against the module calls in the same run.

The layout follows Hugging Face's ``CLIPVisionModel`` (pre-layernorm, pre-norm blocks with q/k/v/out
projections, quick-GELU MLP) so that its weights load through an explicit key map
(:func:`llava_uhd.model.weights.clip_vision_key_map`); a SigLIP-style tower (no CLS, no pre-layernorm,
patch bias, tanh-GELU) is a :class:`~llava_uhd.config.VisionConfig` away.

Dimensions: N pieces, Pt patches over all pieces, L packed tokens (Pt plus one CLS per piece when the
config has one), U distinct piece grids, D hidden size, H heads, Dh head width, K = C * P * P values of
a flattened patch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN

from llava_uhd.config import VisionConfig
from llava_uhd.errors import ModelInputError
from llava_uhd.model.attention import PackedAttention
from llava_uhd.model.init import init_embedding, init_position_table, init_weights
from llava_uhd.model.packing import check_piece_grids, cu_seqlens, segment_slots
from llava_uhd.model.pos_embed import positions_per_patch
from llava_uhd.model.stem import ConvStem, center_pieces

# Rows of one chunk of whole pieces per fused block on CPU: the MLP's intermediate at 26k packed rows is
# ~430 MB, streamed through DRAM by each elementwise op; at this size it stays in cache and the matmuls stay
# large.
CPU_CHUNK_ROWS = 1536
# Rows per in-place slice of the fused block's MLP activation: 256 x 4096 floats (4 MiB) of temporaries.
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
        self.bias = nn.Parameter(torch.empty(d)) if config.patch_bias else None

    def init_own_parameters(self) -> None:
        """The recipe of :mod:`llava_uhd.model.init`: normal with std D^-0.5, bias 0."""
        init_embedding(self.weight, self.weight.shape[0], self.bias)

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

    def forward(self, x: torch.Tensor, attend: PackedAttention) -> torch.Tensor:
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
        # False: the module calls on CPU too (set through VisionTransformer.unfused)
        self.fused_on_cpu = True

    def forward(self, x: torch.Tensor, attend: PackedAttention) -> torch.Tensor:
        if self._fusable(x):
            return self._forward_fused(x, attend)
        x = x + self.attn(self.norm1(x), attend)
        return x + self.mlp(self.norm2(x))

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused path computes what the module calls would: CPU without autocast, nothing for
        autograd to record, plain ``nn.Linear`` projections (not adapters or quantized swaps) holding whole
        plain tensors (ZeRO-3 partitions parameters, marking them ``ds_id``, and gathers them only for the
        calls of their own modules)."""
        if not self.fused_on_cpu or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        linears = (*self._projections(), self.attn.out_proj, self.mlp.fc1, self.mlp.fc2)
        if any(type(m) is not nn.Linear or m.bias is None for m in linears):
            return False
        params = list(self.parameters())
        if any(hasattr(p, "ds_id") or type(p.data) is not torch.Tensor for p in params):
            return False
        return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params))

    def _projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.attn.q_proj, self.attn.k_proj, self.attn.v_proj

    def _forward_fused(self, x: torch.Tensor, attend: PackedAttention) -> torch.Tensor:
        """The block without autograd, on chunks of whole pieces, with the residual adds in the matmuls.

        Attention never crosses a piece, so a chunk of whole pieces is a self-contained sub-batch. Per
        chunk of at most :data:`CPU_CHUNK_ROWS` rows the intermediates stay cache-sized while the matmuls
        stay large; q/k/v and the MLP's hidden rows go into buffers reused by every chunk (fresh ones are
        page-faulted in again each time); the output projection and fc2 accumulate straight into the
        residual rows (``addmm`` with ``out=``, a form ``torch.utils.flop_counter`` counts); the activation
        runs in place on slices of :data:`ACT_ROWS` rows.
        """
        chunks = attend.split(CPU_CHUNK_ROWS)
        most = max(rows.stop - rows.start for rows, _ in chunks)
        qkv = x.new_empty(most, 3, x.shape[1])
        hidden = x.new_empty(most, self.mlp.fc1.out_features)
        out = x.clone()
        for rows, chunk_attend in chunks:
            y = out[rows]  # a view: the in-place adds below write the block's output
            n = y.shape[0]
            h = self.norm1(y)
            for i, proj in enumerate(self._projections()):
                torch.addmm(proj.bias, h, proj.weight.t(), out=qkv[:n, i])
            q, k, v = (qkv[:n, i].view(n, self.attn.num_heads, -1) for i in range(3))  # (n, H, Dh)
            context = chunk_attend(q, k, v).reshape(y.shape)
            torch.addmm(y, context, self.attn.out_proj.weight.t(), out=y).add_(self.attn.out_proj.bias)
            h = torch.addmm(self.mlp.fc1.bias, self.norm2(y), self.mlp.fc1.weight.t(), out=hidden[:n])
            for part in h.split(ACT_ROWS):
                part.copy_(self.mlp.act(part))
            torch.addmm(y, h, self.mlp.fc2.weight.t(), out=y).add_(self.mlp.fc2.bias)
        return out


@dataclass(frozen=True)
class PackedLayout:
    """Where every input patch and CLS token sits in the packed sequence.

    Attributes:
        num_tokens: L, the packed sequence's length.
        patch_slots: (Pt,) packed position of each input patch, in input order.
        cls_slots: (N,) packed position of each piece's CLS token, in input order (empty without CLS).
        attend: the attention over the packed sequences.
    """

    num_tokens: int
    patch_slots: torch.Tensor
    cls_slots: torch.Tensor
    attend: PackedAttention


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
        self.cls_token = nn.Parameter(torch.empty(d)) if config.use_cls_token else None
        self.pos_embed = nn.Parameter(torch.empty(config.grid_side**2 + self.num_prefix, d))
        self.pre_norm = (
            nn.LayerNorm(d, eps=config.layer_norm_eps) if config.use_pre_layernorm else nn.Identity()
        )
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        # Recompute each block in the backward pass instead of storing its activations (training only).
        self.gradient_checkpointing = False
        self.apply(init_weights)

    def init_own_parameters(self) -> None:
        """The recipe of :mod:`llava_uhd.model.init` for the CLS token and the position table."""
        if self.cls_token is not None:
            init_embedding(self.cls_token, self.config.hidden_size)
        init_position_table(self.pos_embed)

    @contextlib.contextmanager
    def unfused(self) -> Iterator[None]:
        """Within the block, every encoder block runs its module calls on CPU too (to compare with, or check
        against, the fused path)."""
        for block in self.blocks:
            block.fused_on_cpu = False
        try:
            yield
        finally:
            for block in self.blocks:
                block.fused_on_cpu = True

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
        :class:`~llava_uhd.model.attention.PackedAttention`.
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

        The square table is resized once per distinct grid (float32, cast back).
        """
        return positions_per_patch(self.pos_embed[self.num_prefix :], piece_grids)

    def layout(self, piece_grids: torch.Tensor, strategy: str = "auto") -> PackedLayout:
        """Plan the packed sequence for (N, 2) grids: each piece its CLS token then its patches, pieces
        sorted by length."""
        counts = piece_grids.to(torch.int64).prod(dim=1)  # (N,)
        lengths = counts + self.num_prefix  # tokens per piece
        # Stable sort: equal-length pieces become adjacent (one dense attention call per length) and keep
        # their input order among themselves.
        order = torch.argsort(lengths, stable=True)
        starts = torch.empty_like(lengths)
        starts[order] = cu_seqlens(lengths[order])[:-1]
        attend = PackedAttention.build(lengths[order], piece_grids.device, self.pos_embed.dtype, strategy)
        patch_slots = segment_slots(counts, starts + self.num_prefix)
        cls_slots = starts if self.num_prefix else starts[:0]
        return PackedLayout(int(lengths.sum()), patch_slots, cls_slots, attend)

    def embed(
        self, pixel_values: torch.Tensor, piece_grids: torch.Tensor, layout: PackedLayout
    ) -> torch.Tensor:
        """Patch embedding + resized positions (+ CLS with its own position row), packed, after pre-LN.

        Returns (L, D); rows of ``layout`` that no patch or CLS token fills stay zero.
        """
        if self.config.center_pieces:
            pixel_values = center_pieces(pixel_values, piece_grids, self.config.num_channels)
        positions = self.position_embeddings(piece_grids)
        if self.stem is not None:
            patches = self.stem(pixel_values, piece_grids) + positions  # (Pt, D)
        else:
            patches = self.patch_embed(pixel_values, positions)  # (Pt, D)
        # Written straight into packed order: at ~26k tokens every extra (L, D) temporary is ~100 MB.
        tokens = patches.new_zeros(layout.num_tokens, patches.shape[1])
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


def _check_inputs(pixel_values: torch.Tensor, piece_grids: torch.Tensor, config: VisionConfig) -> None:
    """Shape checks with the offending values named (a wrong count would silently misalign pieces)."""
    counts = check_piece_grids(piece_grids)
    patch_values = config.num_channels * config.patch_size**2
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_values:
        raise ModelInputError(
            f"pixel_values must be (Pt, C*P*P = {patch_values}), got shape {tuple(pixel_values.shape)}"
        )
    expected = int(counts.sum())
    if pixel_values.shape[0] != expected:
        raise ModelInputError(
            f"pixel_values has {pixel_values.shape[0]} patches but piece_grids {piece_grids.tolist()} "
            f"add up to {expected}"
        )
