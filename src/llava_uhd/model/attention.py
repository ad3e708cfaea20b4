"""Attention over several variable-length sequences laid end to end ("packed") in one tensor.

LLaVA-UHD encodes every slice at its own aspect ratio (arXiv 2403.11703, section 3.1), so a batch holds
pieces with different patch counts. Rather than padding each piece to the pre-training grid, the ViT lays
all pieces' tokens end to end in one (L, D) sequence: token-wise layers (LayerNorm, linears, MLP) run on it
unchanged, and only attention has to keep the pieces apart. :class:`PackedAttention` does that with one of
these strategies (all exact, they differ only in cost):

- ``block_mask``: one SDPA over the whole sequence with a boolean block-diagonal (L, L) mask. One kernel
  call, but O(L^2) time and mask memory, most of it spent on masked-out pairs.
- ``grouped``: each run of consecutive sequences with the same length is viewed as a dense (g, n) batch and
  attended with no mask at all, one SDPA call per run. O(sum n_i^2). Callers that sort pieces by length
  (the ViT does) get one run per distinct length.
- ``varlen``: a variable-length flash kernel (CUDA, fp16/bf16; torch's ``varlen_attn`` or flash-attn's
  ``flash_attn_varlen_func``) driven by cumulative sequence offsets: no mask, no padding, no gather.

:class:`PaddedAttention` is the baseline the benchmark compares against: every sequence padded to one
length with a key-padding mask.

Dimensions: L packed tokens, N sequences, H heads, Dh head width, n one sequence's length, g sequences of a
run. Boolean masks follow SDPA: True means "may attend".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from llava_uhd.errors import ConfigError

Strategy = Literal["auto", "block_mask", "grouped", "varlen"]
STRATEGIES: tuple[str, ...] = ("auto", "block_mask", "grouped", "varlen")

# A block mask over L tokens costs L^2 bytes; beyond this many tokens (64 MiB of mask) "auto" never builds
# one. A batch of 8 sliced images is ~25k tokens: a 625 MB mask and ~50x the useful attention work.
MAX_BLOCK_MASK_TOKENS = 8192
# One extra SDPA call costs roughly as much as attending this many wasted (query, key) pairs at ViT-L width
# (16 heads of 64): on 2 CPU cores, 32 distinct lengths of 8-40 tokens ran 1.3x faster as one masked call
# (17.6k wasted pairs per extra run), 4 lengths of 9-65 tokens 2.3x faster grouped (3.2k per extra run).
# Real pieces (hundreds of patches) are always far beyond it, so "auto" groups them.
RUN_OVERHEAD_PAIRS = 128 * 128

VarlenKernel = Callable[..., torch.Tensor]


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) lengths -> (N + 1,) int64 offsets of each sequence's first token, ending with the total."""
    return F.pad(lengths.to(torch.int64).cumsum(0), (1, 0))


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """(N,) lengths -> (L,) index of the sequence each packed token belongs to."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def block_diagonal_mask(q_lengths: torch.Tensor, k_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(Lq, Lk) boolean mask letting query sequence i attend only to key sequence i.

    ``k_lengths`` defaults to ``q_lengths`` (self-attention); give it for cross-attention, e.g. a
    resampler's Q queries per piece over each piece's patches.
    """
    k_lengths = q_lengths if k_lengths is None else k_lengths
    if q_lengths.numel() != k_lengths.numel():
        raise ConfigError(
            f"block mask needs as many query as key sequences, got {q_lengths.numel()} and {k_lengths.numel()}"
        )
    return segment_ids(q_lengths)[:, None] == segment_ids(k_lengths)[None, :]


@functools.lru_cache(maxsize=1)
def _find_varlen_kernel() -> VarlenKernel | None:
    """Torch's own varlen flash attention if present, else flash-attn's; None when neither imports."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func  # optional, CUDA-only package
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_kernel(device: torch.device, dtype: torch.dtype) -> VarlenKernel | None:
    """The varlen kernel usable for tensors on ``device`` with ``dtype``, or None (CPU, float32, missing)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    return _find_varlen_kernel()


def _runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(first token, sequences, length) of each run of consecutive equal-length sequences."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for n in lengths:
        if runs and runs[-1][2] == n:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, n)
        else:
            runs.append((start, 1, n))
        start += n
    return runs


def choose_strategy(lengths: list[int], device: torch.device, dtype: torch.dtype) -> str:
    """The cheapest exact strategy for sequences of these lengths (in packed order) on this device."""
    if varlen_kernel(device, dtype) is not None:
        return "varlen"
    total = sum(lengths)
    runs = len(_runs(lengths))
    if runs == 1 or total > MAX_BLOCK_MASK_TOKENS:
        return "grouped"
    wasted_pairs = total * total - sum(n * n for n in lengths)
    return "block_mask" if wasted_pairs < RUN_OVERHEAD_PAIRS * (runs - 1) else "grouped"


@dataclass(frozen=True)
class PackedAttention:
    """Exact attention within each of N sequences laid end to end; build once, call once per layer.

    Attributes:
        lengths: the sequence lengths in packed order.
        strategy: the resolved strategy ("block_mask", "grouped" or "varlen").
        runs: (first token, sequences, length) of each run of equal-length sequences ("grouped").
        mask: the (L, L) block-diagonal mask ("block_mask"), else None.
        offsets: (N + 1,) int32 cumulative offsets on the device ("varlen"), else None.
    """

    lengths: tuple[int, ...]
    strategy: str
    runs: tuple[tuple[int, int, int], ...] = ()
    mask: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        lengths: torch.Tensor | list[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        strategy: Strategy | str = "auto",
    ) -> PackedAttention:
        """Prepare attention for sequences of ``lengths`` (packed order) on tensors of ``device``/``dtype``."""
        device = torch.device(device)
        sizes = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if not sizes or min(sizes) < 1:
            raise ConfigError(
                f"packed attention needs at least one sequence, all non-empty; got lengths {sizes}"
            )
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown attention strategy {strategy!r}; choose one of {STRATEGIES}")
        if strategy == "auto":
            strategy = choose_strategy(sizes, device, dtype)
        if strategy == "block_mask":
            mask = block_diagonal_mask(torch.tensor(sizes, device=device))
            return cls(tuple(sizes), strategy, mask=mask)
        if strategy == "grouped":
            return cls(tuple(sizes), strategy, runs=tuple(_runs(sizes)))
        if varlen_kernel(device, dtype) is None:
            raise ConfigError(
                f"attention strategy 'varlen' needs CUDA, fp16/bf16 and a varlen flash kernel; got {device} {dtype}"
            )
        offsets = cu_seqlens(torch.tensor(sizes, device=device)).to(torch.int32)
        return cls(tuple(sizes), strategy, offsets=offsets)

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    def split(self, max_rows: int) -> list[tuple[slice, PackedAttention]]:
        """Cut the packed rows into chunks of whole sequences, each at most ``max_rows`` long (or one
        sequence when that alone is longer), with the attention over each chunk.

        Attention never crosses a sequence, so a chunk is a self-contained sub-batch: a caller can run a
        whole transformer block on it with every intermediate sized by the chunk, not the batch. Only
        "grouped" is cut (its runs just split); other strategies come back whole.
        """
        if self.strategy != "grouped":
            return [(slice(0, sum(self.lengths)), self)]
        chunks = []
        for first, last in _chunk_bounds(self.lengths, max_rows):
            sizes = self.lengths[first:last]
            start = sum(self.lengths[:first])
            chunks.append(
                (
                    slice(start, start + sum(sizes)),
                    replace(self, lengths=sizes, runs=tuple(_runs(list(sizes)))),
                )
            )
        return chunks

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(L, H, Dh) queries, keys, values -> (L, H, Dh) outputs, softmax scale Dh^-0.5."""
        if q.shape[0] != sum(self.lengths):
            raise ConfigError(f"packed attention built for {sum(self.lengths)} tokens, got {q.shape[0]}")
        if self.strategy == "varlen":
            kernel = varlen_kernel(q.device, q.dtype)
            if kernel is None:
                raise ConfigError(f"no varlen kernel for {q.device} {q.dtype}")
            return kernel(q, k, v, self.offsets, self.offsets, self.max_length, self.max_length)
        if self.strategy == "block_mask":
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=self.mask
            )  # (H, L, Dh)
            return out.transpose(0, 1)
        outs = []
        for first, count, n in self.runs:
            last = first + count * n

            def batch(t: torch.Tensor, first: int = first, last: int = last, count: int = count, n: int = n):
                return t[first:last].view(count, n, *t.shape[1:]).transpose(1, 2)  # (g, H, n, Dh)

            out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v))
            outs.append(out.transpose(1, 2).reshape(count * n, *q.shape[1:]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass(frozen=True)
class PaddedAttention:
    """Attention for N sequences each padded to ``pad_to`` tokens, pads masked out as keys.

    The packed tensor is (N * pad_to, H, Dh): sequence i occupies rows [i * pad_to, (i + 1) * pad_to), its
    real tokens first. Pad rows produce finite values that callers discard.
    """

    lengths: tuple[int, ...]
    pad_to: int
    key_mask: torch.Tensor  # (N, 1, 1, pad_to) bool

    @classmethod
    def build(
        cls, lengths: torch.Tensor | list[int], pad_to: int, device: torch.device | str = "cpu"
    ) -> PaddedAttention:
        sizes = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if not sizes or min(sizes) < 1 or max(sizes) > pad_to:
            raise ConfigError(f"padded attention needs 1 <= length <= pad_to={pad_to}, got lengths {sizes}")
        valid = torch.arange(pad_to, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
        return cls(tuple(sizes), pad_to, valid[:, None, None, :])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(N * pad_to, H, Dh) queries, keys, values -> (N * pad_to, H, Dh)."""
        count = len(self.lengths)

        def batch(t: torch.Tensor) -> torch.Tensor:
            return t.view(count, self.pad_to, *t.shape[1:]).transpose(1, 2)  # (N, H, pad_to, Dh)

        out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), attn_mask=self.key_mask)
        return out.transpose(1, 2).reshape(q.shape)

    def split(self, max_rows: int) -> list[tuple[slice, PaddedAttention]]:
        """Chunks of whole padded sequences, at most ``max_rows`` rows (at least one sequence) each."""
        return [
            (
                slice(first * self.pad_to, last * self.pad_to),
                replace(self, lengths=self.lengths[first:last], key_mask=self.key_mask[first:last]),
            )
            for first, last in _chunk_bounds((self.pad_to,) * len(self.lengths), max_rows)
        ]


def _chunk_bounds(lengths: tuple[int, ...], max_rows: int) -> list[tuple[int, int]]:
    """[first, last) sequence indices of consecutive chunks of at most ``max_rows`` tokens (>= 1 sequence)."""
    bounds: list[tuple[int, int]] = []
    first, rows = 0, 0
    for i, n in enumerate(lengths):
        if i > first and rows + n > max_rows:
            bounds.append((first, i))
            first, rows = i, 0
        rows += n
    bounds.append((first, len(lengths)))
    return bounds
