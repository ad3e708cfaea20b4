"""Which samples each rank sees at each optimiser step, as a pure function of (seed, epoch, step).

An epoch's global order is a seeded permutation cut into global batches of G samples (the incomplete last
one is dropped, so every step has exactly G samples). With length grouping, the data pipeline's sampler
puts samples of similar length in the same global batch, sorted, so the micro-batches cut from it pad
little. Which samples form a global batch never depends on the world size, so neither does a step's loss. Micro-
batch j of a global batch goes to rank j mod W: ranks get similar lengths, and the union over ranks of one
step's micro-batches is the global batch, whatever the world size. Resuming at step s of an epoch is
slicing the per-rank list, no data is read to skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_uhd.data.sampler import LengthGroupedSampler
from llava_uhd.errors import ConfigError


@dataclass(frozen=True)
class BatchGeometry:
    """Samples per step (global), per forward (micro), ranks, and the accumulation they imply."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global batch {self.global_batch_size} is not a multiple of micro batch "
                f"{self.micro_batch_size} x {self.world_size} ranks"
            )

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def steps_per_epoch(self, num_samples: int) -> int:
        return num_samples // self.global_batch_size


def epoch_order(
    num_samples: int,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None,
    global_batch_size: int,
    usable: Sequence[int] | None = None,
) -> list[int]:
    """The epoch's sample order, seeded by (seed, epoch); whole global batches only.

    Without ``lengths`` a plain permutation. With them, the data pipeline's :class:`LengthGroupedSampler`
    (one "rank" whose batch is the whole global batch), so every global batch holds samples of similar
    length, longest first, and cutting it into micro-batches pads little. ``lengths`` has one entry per
    sample of the dataset.

    ``usable`` (default: all ``num_samples``) are the dataset indices an epoch draws from, e.g. those of
    the good records under ``on_bad_sample: skip``: the order is drawn over their positions and mapped
    back, so each is drawn at most once, the others never, and every rank computes the same order.
    """
    if usable is None:
        usable = range(num_samples)
    n = len(usable)
    if lengths is None:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        return [usable[k] for k in order[: (n // global_batch_size) * global_batch_size]]
    sampler = LengthGroupedSampler(
        [lengths[i] for i in usable], batch_size=global_batch_size, world_size=1, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return [usable[k] for batch in sampler.global_batches() for k in batch]


def rank_steps(order: Sequence[int], geometry: BatchGeometry, rank: int) -> list[list[list[int]]]:
    """Per optimiser step, this rank's micro-batches (lists of sample indices)."""
    g, m, w = geometry.global_batch_size, geometry.micro_batch_size, geometry.world_size
    steps = []
    for s in range(len(order) // g):
        chunk = order[s * g : (s + 1) * g]
        micro = [chunk[j * m : (j + 1) * m] for j in range(g // m)]
        steps.append(micro[rank::w])
    return steps


class StepLoader:
    """Iterates one epoch from a given step: yields (step_in_epoch, list of collated micro-batches).

    Data loading runs in a ``DataLoader`` over the flattened micro-batch list (workers slice the images);
    the loader gets its own generator so creating it never draws from the global torch RNG, which an exact
    resume depends on.
    """

    def __init__(
        self,
        dataset: Any,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        steps: list[list[list[int]]],
        start_step: int,
        num_workers: int,
        seed: int,
    ) -> None:
        self.steps = steps
        self.start_step = start_step
        self.accumulation = len(steps[0]) if steps else 0
        flat = [batch for step in steps[start_step:] for batch in step]
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=flat,
            collate_fn=collate,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=False,
        )

    def __len__(self) -> int:
        return len(self.steps) - self.start_step

    def __iter__(self) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
        step = self.start_step
        pending: list[dict[str, torch.Tensor]] = []
        for batch in self.loader:
            pending.append(batch)
            if len(pending) == self.accumulation:
                yield step, pending
                pending = []
                step += 1
