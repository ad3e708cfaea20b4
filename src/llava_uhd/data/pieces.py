"""Images -> ViT pieces and LLM layout ids for the data pipeline, through the processor's public pieces
(:func:`llava_uhd.processing.image_layout_ids`, :func:`llava_uhd.pixels.image_patches`).

Shapes (docs/INTERFACES.md): ``pixel_values`` (Pt, C*P*P) with each patch flattened as (C, P, P) and
patches row-major in a piece; ``piece_grids`` (N, 2) as (rows, cols) in patches.

Stage 1 of the paper trains on the overview alone (DESIGN.md section 7): ``overview_only=True`` keeps the
plan's overview and drops its slices, so an image is one piece and its layout Q placeholders with no
separators.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from llava_uhd.layout import visual_token_count
from llava_uhd.pixels import image_patches
from llava_uhd.processing import LlavaUHDProcessor, image_layout_ids
from llava_uhd.slicing import SlicePlan, plan_slices


@dataclass
class ImagePieces:
    """One image's pieces: patches (Pt_i, C*P*P), grids (N_i, 2) and its layout ids."""

    plan: SlicePlan
    pixel_values: torch.Tensor
    piece_grids: torch.Tensor
    layout_ids: list[int]


def overview_plan(plan: SlicePlan) -> SlicePlan:
    """The same plan without slices: its only piece is the overview (the stage-1 input)."""
    return dataclasses.replace(plan, grid=None, slice_size=None)


def plan_image(size: tuple[int, int], processor: LlavaUHDProcessor, overview_only: bool = False) -> SlicePlan:
    """The plan for an image of ``size`` (width, height); slices dropped when ``overview_only``."""
    plan = plan_slices(size[0], size[1], processor.slicing)
    return overview_plan(plan) if overview_only else plan


def encode_image(
    image: Image.Image, processor: LlavaUHDProcessor, overview_only: bool = False
) -> ImagePieces:
    """Plan, cut and patchify one RGB image; slices row-major then the overview (or the overview alone)."""
    plan = plan_image(image.size, processor, overview_only)
    pixels = image_patches([image], [plan], processor.slicing, processor.resize_mode)
    grids = torch.tensor([list(g) for g in plan.piece_grids], dtype=torch.long).view(-1, 2)
    ids = image_layout_ids(plan, processor.num_queries, processor.image_token_id, processor.separator_ids)
    return ImagePieces(plan, pixels, grids, ids)


def visual_length(size: tuple[int, int], processor: LlavaUHDProcessor, overview_only: bool = False) -> int:
    """LLM tokens of an image of ``size`` (width, height), without decoding it: for the length sampler."""
    plan = plan_image(size, processor, overview_only)
    return visual_token_count(plan, processor.num_queries, processor.separator_lengths)
