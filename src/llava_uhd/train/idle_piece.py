"""A piece of image with no effect, so that text-only micro-batches run the vision path on sharded backends.

FSDP and DeepSpeed ZeRO run a collective for every unit or parameter that takes part in a step: ZeRO-3 and
FSDP all-gather a unit's weights when it runs, FSDP and ZeRO-2 reduce gradients per unit or bucket. So every
rank must run the same modules in the same order. The model encodes pieces only when a batch has some, and
stage 2 mixes in text-only samples (LLaVA's instruction data does too), so a rank whose micro-batch is
text-only would skip the vision tower and the resampler while the other ranks run them: ZeRO-3 hangs,
FSDP and ZeRO-2 abort on mismatched collectives. DDP instead finds unused parameters and needs none of this.
LLaVA's training code feeds a blank image with text-only samples for the same reason.

Here each row of such a micro-batch gets one piece of a single all-zero patch (a 1x1 grid of patches),
whose Q placeholders are appended after the row's last token with attention mask 0 and label -100.
Causal attention keeps every real position from seeing them, so the logits, the loss and the gradients of
the real tokens are those of the plain batch (the pieces get exactly zero gradient); only the modules run.

Dimensions: B micro-batch, T text length, Q queries per piece, K = C * P * P values of a patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_uhd.data.conversation import IGNORE_INDEX

IDLE_GRID = (1, 1)  # (rows, cols) in patches: the smallest piece every resampler accepts


@dataclass(frozen=True)
class IdlePiece:
    """What an idle piece needs from the model: the placeholder id, queries per piece, values per patch."""

    image_token_id: int
    num_queries: int
    patch_values: int

    @classmethod
    def for_model(cls, model: nn.Module) -> IdlePiece | None:
        """From a LlavaUHD model; None when it has no image placeholder token (it never encodes pieces)."""
        config = model.config
        if config.image_token_id is None:
            return None
        vision = config.to_preset().vision
        return cls(config.image_token_id, model.num_queries, vision.num_channels * vision.patch_size**2)

    def fill(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` unchanged when it has pieces, else with one idle piece per row appended."""
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.numel() > 0:
            return batch
        ids = batch["input_ids"]  # (B, T)
        rows = ids.shape[0]
        tail = torch.full((rows, self.num_queries), self.image_token_id, dtype=ids.dtype)  # (B, Q)
        filled = dict(batch)
        filled["input_ids"] = torch.cat([ids, tail], dim=1)  # (B, T + Q)
        filled["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros_like(tail)], dim=1)
        if "labels" in batch:
            filled["labels"] = torch.cat([batch["labels"], torch.full_like(tail, IGNORE_INDEX)], dim=1)
        filled["pixel_values"] = torch.zeros(rows * IDLE_GRID[0] * IDLE_GRID[1], self.patch_values)  # (B, K)
        filled["piece_grids"] = torch.tensor([IDLE_GRID] * rows, dtype=torch.long)  # (B, 2)
        return filled
