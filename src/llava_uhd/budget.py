"""A visual-token budget for the images of one request: per-image slice limits so that their plans fit.

Pure Python on top of :func:`~llava_uhd.slicing.plan_slices` and the token count of
:mod:`llava_uhd.layout`; no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from llava_uhd.config import SlicingConfig
from llava_uhd.errors import TokenBudgetError
from llava_uhd.layout import visual_token_count
from llava_uhd.slicing import SlicePlan, plan_slices


def budget_slice_limits(
    sizes: Sequence[tuple[int, int]],
    config: SlicingConfig,
    *,
    num_queries: int,
    max_visual_tokens: int | None = None,
    separator_lengths: Mapping[str, int] | None = None,
) -> list[int]:
    """Per-image ``max_slices`` so that the images of one request fit ``max_visual_tokens``.

    Every image starts at ``config.max_slices``. While the planned total is over the budget, the image
    with the highest limit loses one slice (among equal limits, the smallest area first), so a larger
    image never ends with a lower limit than a smaller one. At limit 1 an image is its overview alone.

    Raises:
        TokenBudgetError: even overview-only plans need more tokens than the budget.
    """
    limits = [config.max_slices] * len(sizes)
    if max_visual_tokens is None:
        return limits
    costs = [visual_token_count(plan_slices(w, h, config), num_queries, separator_lengths) for w, h in sizes]
    smallest_first = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i))
    while sum(costs) > max_visual_tokens:
        reducible = [i for i in smallest_first if limits[i] > 1]
        if not reducible:
            raise TokenBudgetError(
                f"max_visual_tokens={max_visual_tokens} cannot hold {len(sizes)} image(s) "
                f"({', '.join(f'{w}x{h}' for w, h in sizes)}): one overview each already needs {sum(costs)} tokens"
            )
        highest = max(limits[i] for i in reducible)
        victim = next(i for i in reducible if limits[i] == highest)
        limits[victim] -= 1
        plan = plan_slices(*sizes[victim], replace(config, max_slices=limits[victim]))
        costs[victim] = visual_token_count(plan, num_queries, separator_lengths)
    return limits


def plan_with_budget(
    sizes: Sequence[tuple[int, int]],
    config: SlicingConfig,
    *,
    num_queries: int,
    max_visual_tokens: int | None = None,
    separator_lengths: Mapping[str, int] | None = None,
) -> list[SlicePlan]:
    """Plans for the images of one request within ``max_visual_tokens`` (see :func:`budget_slice_limits`)."""
    limits = budget_slice_limits(
        sizes,
        config,
        num_queries=num_queries,
        max_visual_tokens=max_visual_tokens,
        separator_lengths=separator_lengths,
    )
    return [
        plan_slices(w, h, config if limit == config.max_slices else replace(config, max_slices=limit))
        for (w, h), limit in zip(sizes, limits, strict=True)
    ]
