"""The spatial schema (paper section 3.3; docs/design.md section 6): how a plan becomes an LLM token layout.

Slices are laid out row by row, each followed by its separator ("," inside a row, "\\n" after the last
slice of a row), then the overview. An unsliced image is its overview alone. With Q query tokens per
piece and N slices the visual length is N * (Q + 1) + Q, when each separator is one token.
No torch here; the processor maps this layout to token ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from llava_uhd.slicing import SlicePlan


@dataclass(frozen=True)
class Segment:
    """One run of the layout: ``kind == "piece"`` is Q placeholders of piece ``index``; else a separator."""

    kind: Literal["piece", "separator"]
    index: int = 0  # piece index (slices row-major, overview last) for pieces
    text: str = ""  # the separator's text for separators


def layout_segments(plan: SlicePlan) -> tuple[Segment, ...]:
    """The layout in LLM order: slice, separator, slice, separator, ..., overview."""
    segments: list[Segment] = []
    for i, sep in enumerate(plan.separators):
        segments.append(Segment("piece", index=i))
        segments.append(Segment("separator", text=sep))
    segments.append(Segment("piece", index=plan.num_slices))
    return tuple(segments)


def visual_token_count(
    plan: SlicePlan, num_queries: int, separator_lengths: Mapping[str, int] | None = None
) -> int:
    """LLM tokens one image takes: Q per piece plus the separators' tokens (1 each unless told otherwise)."""
    lengths = separator_lengths or {}
    return (plan.num_slices + 1) * num_queries + sum(lengths.get(s, 1) for s in plan.separators)


def layout_string(plan: SlicePlan, num_queries: int | None = None) -> str:
    """A human-readable layout line, e.g. ``[s1] , [s2] \\n [s3] , [s4] \\n [overview]`` (with counts)."""
    parts: list[str] = []
    for seg in layout_segments(plan):
        if seg.kind == "separator":
            parts.append("\\n" if seg.text == "\n" else seg.text)
        elif seg.index == plan.num_slices:
            parts.append("[overview]")
        else:
            parts.append(f"[s{seg.index + 1}]")
    line = " ".join(parts)
    if num_queries is not None:
        line += (
            f"  ({plan.num_slices + 1} pieces x {num_queries} tokens + {len(plan.separators)} separators = "
        )
        line += f"{visual_token_count(plan, num_queries)} tokens)"
    return line
