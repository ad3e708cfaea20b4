"""The image half of the processor: images + their plans -> flattened patches and piece grids.

:class:`LlavaUHDImageProcessor` is the ``image_processor`` of
:class:`~llava_uhd.processing.LlavaUHDProcessor` (transformers' processor layout: a tokenizer and an
image processor). It owns the slicing geometry (paper section 3.1) and the resize mode; the processor
decides the plans (the token budget needs the tokenizer's separators and the resampler's Q) and asks it
to decode and encode. Called alone, it plans each image on its own, without a budget.

Dimensions: N pieces, Pt patches, C channels, P patch side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from llava_uhd.config import SlicingConfig
from llava_uhd.errors import ConfigError
from llava_uhd.images import ImageSource, load_planned
from llava_uhd.pixels import RESIZE_MODES, ResizeMode, draft_size, image_patches
from llava_uhd.serialize import from_plain, to_plain
from llava_uhd.slicing import SlicePlan, plan_slices


@dataclass(frozen=True)
class ImageBatch:
    """Pixels and plans of a list of images (no text): the image half of the processor's output."""

    pixel_values: torch.Tensor  # (Pt, C*P*P) float32
    piece_grids: torch.Tensor  # (N, 2) long: rows, cols in patches
    pieces_per_image: torch.Tensor  # (n_images,) long
    plans: tuple[SlicePlan, ...]


def _grids_tensor(plans: Sequence[SlicePlan]) -> torch.Tensor:
    grids = [grid for plan in plans for grid in plan.piece_grids]
    return torch.tensor(grids, dtype=torch.long).view(len(grids), 2)


class LlavaUHDImageProcessor(BaseImageProcessor):
    """Decodes images, slices them by their plans and writes every piece's patches into one buffer.

    Args:
        slicing: the slicing geometry (a :class:`~llava_uhd.config.SlicingConfig` or its dict).
        resize_mode: "fast" (default) or "exact" (bit-faithful to the released pipeline); see
            :mod:`llava_uhd.pixels`. Fast mode also decodes JPEGs at the DCT scale the plan needs.
    """

    model_input_names = ["pixel_values", "piece_grids", "pieces_per_image"]

    def __init__(
        self,
        slicing: SlicingConfig | Mapping[str, Any] | None = None,
        resize_mode: ResizeMode = "fast",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if not isinstance(slicing, SlicingConfig):
            slicing = from_plain(SlicingConfig, slicing or {}, "image processor slicing")
        self.slicing: SlicingConfig = slicing
        self.resize_mode: ResizeMode = resize_mode

    def load_and_plan(
        self,
        images: Sequence[ImageSource],
        plan: Callable[[list[tuple[int, int]]], list[SlicePlan]],
    ) -> tuple[list[Image.Image], list[SlicePlan]]:
        """Decode ``images`` and plan them with ``plan`` (sizes -> plans, called once for all of them).

        In fast mode, encoded sources are planned from their header and then decoded at the JPEG DCT
        scale the plan allows (:func:`llava_uhd.images.load_planned`); exact mode decodes in full.
        """
        return load_planned(
            images,
            plan,
            max_pixels=self.slicing.max_image_pixels,
            draft_size=draft_size if self.resize_mode == "fast" else None,
        )

    def encode(self, images: Sequence[Image.Image], plans: Sequence[SlicePlan]) -> ImageBatch:
        """Pixels of decoded images and their plans, all in one preallocated buffer."""
        return ImageBatch(
            pixel_values=image_patches(images, plans, self.slicing, self.resize_mode),
            piece_grids=_grids_tensor(plans),
            pieces_per_image=torch.tensor([p.num_slices + 1 for p in plans], dtype=torch.long),
            plans=tuple(plans),
        )

    def preprocess(self, images: ImageSource | Sequence[ImageSource], **kwargs: Any) -> BatchFeature:
        """Encode ``images`` (one source or a list), each planned on its own with the slicing config; what
        calling the image processor does.

        Returns a BatchFeature with ``pixel_values`` (Pt, C*P*P), ``piece_grids`` (N, 2) and
        ``pieces_per_image``. ``return_tensors`` may be None or "pt" (the tensors are torch either way).
        """
        return_tensors = kwargs.pop("return_tensors", None)
        if return_tensors not in (None, "pt"):
            raise ConfigError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if kwargs:
            raise ConfigError(f"unknown image processor option(s) {sorted(kwargs)}")
        sources = list(images) if isinstance(images, list | tuple) else [images]
        loaded, plans = self.load_and_plan(
            sources, lambda sizes: [plan_slices(w, h, self.slicing) for w, h in sizes]
        )
        batch = self.encode(loaded, plans)
        return BatchFeature(
            data={
                "pixel_values": batch.pixel_values,
                "piece_grids": batch.piece_grids,
                "pieces_per_image": batch.pieces_per_image,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the slicing config as a plain dict)."""
        return {
            "image_processor_type": type(self).__name__,
            "slicing": to_plain(self.slicing),
            "resize_mode": self.resize_mode,
        }
