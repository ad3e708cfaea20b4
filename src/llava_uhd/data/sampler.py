"""Length-grouped sampling: batches of similar total length (text + visual tokens) waste less padding.

Per epoch: a permutation drawn from ``seed + epoch``; cut into megabatches of ``megabatch_size`` global
batches; each megabatch sorted by length (longest first); then cut into global batches of
``batch_size * world_size`` and the order of the global batches shuffled again (so lengths do not march
down within every megabatch). Rank ``r`` takes the ``r``-th ``batch_size`` run of every global batch, so
ranks step through batches of matching lengths. The index list is padded by repeating its start so every
rank gets the same number of full batches (as ``DistributedSampler`` does), or truncated with
``drop_last``.

Use it as ``DataLoader(dataset, batch_size=batch_size, sampler=sampler)``: consecutive ``batch_size``
indices form one grouped batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from llava_uhd.errors import ConfigError

# HF transformers' get_length_grouped_indices uses megabatches of 50 batches: long enough to group well,
# short enough to keep the order random.
DEFAULT_MEGABATCH = 50


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Deterministic per (seed, epoch, rank); call :meth:`set_epoch` each epoch."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        megabatch_size: int = DEFAULT_MEGABATCH,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or world_size < 1 or megabatch_size < 1:
            raise ConfigError(
                f"batch_size, world_size and megabatch_size must be >= 1, got {batch_size}, "
                f"{world_size}, {megabatch_size}"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if not lengths:
            raise ConfigError("cannot sample from an empty dataset")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.megabatch_size, self.drop_last = seed, megabatch_size, drop_last
        self.epoch = 0
        global_batch = batch_size * world_size
        n = len(self.lengths)
        self.num_global_batches = n // global_batch if drop_last else math.ceil(n / global_batch)
        if self.num_global_batches == 0:
            raise ConfigError(f"{n} samples cannot fill one global batch of {global_batch} with drop_last")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_global_batches * self.batch_size

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (``batch_size * world_size`` indices each), identical on every rank."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n, global_batch = len(self.lengths), self.batch_size * self.world_size
        total = self.num_global_batches * global_batch
        order = torch.randperm(n, generator=generator).tolist()
        order = (order * math.ceil(total / n))[:total]  # pad by wrapping (or drop the tail)
        span = self.megabatch_size * global_batch
        grouped: list[int] = []
        for start in range(0, total, span):
            mega = order[start : start + span]
            grouped.extend(
                sorted(mega, key=lambda i: -int(self.lengths[i]))
            )  # stable: ties keep random order
        batches = [grouped[k : k + global_batch] for k in range(0, total, global_batch)]
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in shuffle]

    def __iter__(self) -> Iterator[int]:
        start = self.rank * self.batch_size
        for batch in self.global_batches():
            yield from batch[start : start + self.batch_size]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of padded tokens when each batch (of indices into ``lengths``) is padded to its longest."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded


def rank_batches(sampler: LengthGroupedSampler) -> list[list[int]]:
    """The batches a rank's DataLoader will form from ``sampler`` (consecutive ``batch_size`` indices)."""
    indices = list(sampler)
    return [indices[k : k + sampler.batch_size] for k in range(0, len(indices), sampler.batch_size)]
