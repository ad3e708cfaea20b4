"""Samples -> a model batch (docs/INTERFACES.md).

Text is padded to the longest sample of the batch: on the right for training (positions stay 0..T-1 for
real tokens), on the left for generation (every prompt ends at the last column, where decoding continues).
Pieces are concatenated in sample order, so the model's single ordered scatter of resampler outputs into
the ``<image>`` positions lines up: samples in batch order, images in text order, pieces in plan order.
Text-only samples contribute no pieces; a batch with no image at all has no ``pixel_values`` or
``piece_grids`` key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llava_uhd.errors import ConfigError
from llava_uhd.templates import IGNORE_INDEX
from llava_uhd.tokens import pad_token_id

PaddingSide = Literal["right", "left"]


def _pad(rows: Sequence[torch.Tensor], width: int, value: int, side: PaddingSide) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, row in enumerate(rows):
        if side == "right":
            out[b, : len(row)] = row
        else:
            out[b, width - len(row) :] = row
    return out


@dataclass(frozen=True)
class LlavaCollator:
    """Collate dataset samples into ``input_ids``, ``attention_mask``, ``labels`` (B, T) and
    ``pixel_values`` (Pt, C*P*P), ``piece_grids`` (N, 2).

    ``labels`` is left out when the samples have none (generation). ``None`` samples are refused: the
    dataset's skip policy replaces bad records instead of dropping them, so every rank keeps its batch size.
    """

    pad_id: int
    padding_side: PaddingSide = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, padding_side: PaddingSide = "right") -> LlavaCollator:
        """Pad with the id the processor pads with (:func:`llava_uhd.tokens.pad_token_id`)."""
        return cls(pad_token_id(tokenizer), padding_side)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ConfigError("cannot collate an empty batch")
        missing = [b for b, s in enumerate(samples) if s is None]
        if missing:
            raise ConfigError(
                f"batch positions {missing} hold no sample (None); use on_bad_sample='skip', "
                "which substitutes a good record"
            )
        width = max(len(s["input_ids"]) for s in samples)
        ids = [s["input_ids"] for s in samples]
        batch = {
            "input_ids": _pad(ids, width, self.pad_id, self.padding_side),
            "attention_mask": _pad([torch.ones_like(x) for x in ids], width, 0, self.padding_side),
        }
        if all(s.get("labels") is not None for s in samples):
            batch["labels"] = _pad([s["labels"] for s in samples], width, IGNORE_INDEX, self.padding_side)
        with_pixels = [s for s in samples if s.get("piece_grids") is not None and len(s["piece_grids"]) > 0]
        if with_pixels:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_pixels])
            batch["piece_grids"] = torch.cat([s["piece_grids"] for s in with_pixels])
        return batch
