"""Attention over several variable-length sequences laid end to end ("packed") in one tensor.

LLaVA-UHD encodes every slice at its own aspect ratio (arXiv 2403.11703, section 3.1), so a batch holds
pieces with different patch counts. Rather than padding each piece to the pre-training grid, the ViT lays
all pieces' tokens end to end in one (L, D) sequence: token-wise layers (LayerNorm, linears, MLP) run on it
unchanged, and only attention has to keep the pieces apart. :class:`PackedAttention` does that with one of
these strategies (all exact, they differ only in cost):

- ``block_mask``: one SDPA over the whole sequence with a boolean block-diagonal (L, L) mask. One kernel
  call, but O(L^2) time and mask memory, most of it spent on masked-out pairs. An exact alternative the
  tests and the benchmark compare the others with; "auto" never chooses it.
- ``grouped``: each run of consecutive sequences with the same length is viewed as a dense (g, n) batch and
  attended with no mask at all, one SDPA call per run. O(sum n_i^2). Callers that sort pieces by length
  (the ViT does) get one run per distinct length.
- ``varlen``: a variable-length flash kernel (CUDA, fp16/bf16; torch's ``varlen_attn`` or flash-attn's
  ``flash_attn_varlen_func``) driven by cumulative sequence offsets: no mask, no padding, no gather.

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

from llava_uhd.errors import ConfigError, ModelInputError
from llava_uhd.model.packing import cu_seqlens, segment_ids

Strategy = Literal["auto", "block_mask", "grouped", "varlen"]
STRATEGIES: tuple[str, ...] = ("auto", "block_mask", "grouped", "varlen")

VarlenKernel = Callable[..., torch.Tensor]


def block_diagonal_mask(q_lengths: torch.Tensor, k_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(Lq, Lk) boolean mask letting query sequence i attend only to key sequence i.

    ``k_lengths`` defaults to ``q_lengths`` (self-attention); give it for cross-attention, e.g. a
    resampler's Q queries per piece over each piece's patches.
    """
    k_lengths = q_lengths if k_lengths is None else k_lengths
    if q_lengths.numel() != k_lengths.numel():
        raise ModelInputError(
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


def choose_strategy(device: torch.device, dtype: torch.dtype) -> str:
    """What "auto" runs on tensors of this device and dtype: "varlen" where its kernel runs, else "grouped".

    One block-masked call pays only for sequences of a few tokens, which no real piece is
    (benchmarks/vision.py times both on real pieces and on tiny ones), so the lengths do not enter.
    """
    return "varlen" if varlen_kernel(device, dtype) is not None else "grouped"


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
            raise ModelInputError(
                f"packed attention needs at least one sequence, all non-empty; got lengths {sizes}"
            )
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown attention strategy {strategy!r}; choose one of {STRATEGIES}")
        if strategy == "auto":
            strategy = choose_strategy(device, dtype)
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
        """The packed rows cut into chunks of whole sequences of at most ``max_rows`` rows each (a longer
        sequence alone), with the attention over each chunk; only "grouped" is cut, others come back whole.

        Attention never crosses a sequence, so each chunk is a self-contained sub-batch that a whole
        transformer block can run on.
        """
        if self.strategy != "grouped":
            return [(slice(0, sum(self.lengths)), self)]
        chunks: list[tuple[slice, PackedAttention]] = []
        start, sizes, rows = 0, [], 0  # the open chunk: its first row, its sequences, their rows
        for n in (*self.lengths, None):
            if sizes and (n is None or rows + n > max_rows):
                chunks.append(
                    (
                        slice(start, start + rows),
                        replace(self, lengths=tuple(sizes), runs=tuple(_runs(sizes))),
                    )
                )
                start, sizes, rows = start + rows, [], 0
            if n is not None:
                sizes.append(n)
                rows += n
        return chunks

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(L, H, Dh) queries, keys, values -> (L, H, Dh) outputs, softmax scale Dh^-0.5."""
        if q.shape[0] != sum(self.lengths):
            raise ModelInputError(f"packed attention built for {sum(self.lengths)} tokens, got {q.shape[0]}")
        if self.strategy == "varlen":
            kernel = varlen_kernel(q.device, q.dtype)
            if kernel is None:
                raise ModelInputError(f"no varlen kernel for {q.device} {q.dtype}")
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
