"""Images + text -> model inputs (docs/INTERFACES.md, "Processor output"; DESIGN.md section 6).

:class:`LlavaUHDProcessor` plans every image (:func:`~llava_uhd.slicing.plan_slices`), turns its pieces
into flattened patches (:mod:`llava_uhd.pixels`) and expands each ``<image>`` in the text into the
spatial schema of paper section 3.3: per piece Q copies of the image token, each slice followed by the
token ids of its separator ("," inside a row, "\\n" at a row's end), the overview last.

The text expansion is a pair of plain functions on token ids, reused by the training data pipeline:
:func:`image_layout_ids` (one image's ids) and :func:`expand_image_tokens` (replace every image token of
a sequence, optionally carrying a parallel label list). Separator ids always come from the tokenizer
(:func:`separator_token_ids`), never from constants.

This module may import torch and transformers but never :mod:`llava_uhd.model`.
Dimensions: B batch, T text length, N pieces, Pt patches, C channels, P patch side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AddedToken, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from llava_uhd.config import Preset, SlicingConfig, get_preset
from llava_uhd.errors import ConfigError, PlaceholderMismatchError, TokenBudgetError
from llava_uhd.images import ImageSource, load_image, probe_image_size
from llava_uhd.layout import layout_segments, visual_token_count
from llava_uhd.pixels import RESIZE_MODES, ResizeMode, draft_size, image_patches
from llava_uhd.slicing import SlicePlan, plan_slices

IMAGE_TOKEN = "<image>"
PRESET_FILE = "llava_uhd_preset.yaml"
PROCESSOR_FILE = "llava_uhd_processor.json"
IGNORE_INDEX = -100  # the label value cross-entropy skips (PyTorch's default ignore_index)
# Separators are tokenised as they appear after another token: "a" + sep, minus the ids of "a".
_SEPARATOR_CONTEXT = "a"
_PADDING_SIDES = ("left", "right")
_ENCODED_SOURCES = (str, Path, bytes, bytearray, memoryview)


# --------------------------------------------------------------------------------------------------
# Text layout on token ids


def separator_token_ids(
    tokenizer: PreTrainedTokenizerBase, separators: Sequence[str] = (",", "\n")
) -> dict[str, tuple[int, ...]]:
    """Token ids of each separator as it appears right after another token.

    SentencePiece tokenizers mark a word start with "▁", so encoding "," alone gives "▁,"; inside the
    layout the separator follows an image token, so we encode ``"a" + sep`` and drop the ids of ``"a"``
    (Llama: "," -> ",", "\\n" -> "<0x0A>").

    Raises:
        ConfigError: the tokenizer splits the context differently with the separator attached, or the
            separator encodes to nothing.
    """
    context = tokenizer.encode(_SEPARATOR_CONTEXT, add_special_tokens=False)
    result: dict[str, tuple[int, ...]] = {}
    for sep in separators:
        ids = tokenizer.encode(_SEPARATOR_CONTEXT + sep, add_special_tokens=False)
        if ids[: len(context)] != context or len(ids) == len(context):
            raise ConfigError(
                f"cannot isolate the token ids of separator {sep!r}: {_SEPARATOR_CONTEXT!r} encodes to "
                f"{context} but {_SEPARATOR_CONTEXT + sep!r} to {ids}"
            )
        result[sep] = tuple(ids[len(context) :])
    return result


def image_layout_ids(
    plan: SlicePlan, num_queries: int, image_token_id: int, separator_ids: Mapping[str, Sequence[int]]
) -> list[int]:
    """The token ids one image occupies: Q image tokens per piece, separator ids after each slice."""
    ids: list[int] = []
    for segment in layout_segments(plan):
        if segment.kind == "piece":
            ids.extend([image_token_id] * num_queries)
        else:
            ids.extend(separator_ids[segment.text])
    return ids


def expand_image_tokens(
    input_ids: Sequence[int],
    plans: Sequence[SlicePlan],
    *,
    image_token_id: int,
    num_queries: int,
    separator_ids: Mapping[str, Sequence[int]],
    labels: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[list[int], list[int] | None]:
    """Replace the i-th ``image_token_id`` of ``input_ids`` by image i's layout (:func:`image_layout_ids`).

    Args:
        input_ids: a tokenised sequence holding exactly one ``image_token_id`` per image.
        plans: the images' plans, in the order their tokens appear.
        labels: optional labels parallel to ``input_ids``; the expanded positions get ``ignore_index``
            (visual tokens carry no loss).

    Returns:
        (expanded ids, expanded labels or None).

    Raises:
        PlaceholderMismatchError: the number of image tokens differs from the number of plans.
    """
    positions = [i for i, token in enumerate(input_ids) if token == image_token_id]
    if len(positions) != len(plans):
        raise PlaceholderMismatchError(
            f"the text has {len(positions)} {IMAGE_TOKEN} placeholder(s) but {len(plans)} image(s) were given"
        )
    if labels is not None and len(labels) != len(input_ids):
        raise PlaceholderMismatchError(f"labels have length {len(labels)} but input_ids {len(input_ids)}")
    ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    start = 0
    for position, plan in zip(positions, plans, strict=True):
        layout = image_layout_ids(plan, num_queries, image_token_id, separator_ids)
        ids.extend(input_ids[start:position])
        ids.extend(layout)
        if out_labels is not None and labels is not None:
            out_labels.extend(labels[start:position])
            out_labels.extend([ignore_index] * len(layout))
        start = position + 1
    ids.extend(input_ids[start:])
    if out_labels is not None and labels is not None:
        out_labels.extend(labels[start:])
    return ids, out_labels


# --------------------------------------------------------------------------------------------------
# Token budget


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


# --------------------------------------------------------------------------------------------------
# Images


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


class LlavaUHDProcessor:
    """Turns prompts with ``<image>`` placeholders and images into the model's inputs.

    Args:
        tokenizer: any Hugging Face tokenizer; ``<image>`` is added to it as a special token if missing.
        preset: a :class:`~llava_uhd.config.Preset` or its name; slicing, normalisation and Q come from it.
        padding_side: "right" for training, "left" for batched generation.
        resize_mode: "fast" (default) or "exact" (bit-faithful to the released pipeline); see
            :mod:`llava_uhd.pixels`.
        max_visual_tokens: default per-sample visual-token budget (None: unlimited).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        preset: Preset | str = "paper",
        *,
        padding_side: str = "right",
        resize_mode: ResizeMode = "fast",
        max_visual_tokens: int | None = None,
        image_token: str = IMAGE_TOKEN,
    ) -> None:
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        _check_padding_side(padding_side)
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        _check_budget(max_visual_tokens)
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.resize_mode: ResizeMode = resize_mode
        self.max_visual_tokens = max_visual_tokens
        self.image_token = image_token
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
            )
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(image_token)
        self.separator_ids = separator_token_ids(tokenizer)
        self.separator_lengths = {sep: len(ids) for sep, ids in self.separator_ids.items()}

    @property
    def num_queries(self) -> int:
        return self.preset.resampler.num_queries

    @property
    def slicing(self) -> SlicingConfig:
        return self.preset.slicing

    # ---- images ----------------------------------------------------------------------------------

    def plan_images(
        self,
        sizes: Sequence[tuple[int, int]],
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
    ) -> list[SlicePlan]:
        """Plans for images of ``sizes`` (width, height) under a per-call slice limit and token budget."""
        config = self.slicing if max_slices is None else replace(self.slicing, max_slices=max_slices)
        _check_budget(max_visual_tokens)
        return plan_with_budget(
            sizes,
            config,
            num_queries=self.num_queries,
            max_visual_tokens=max_visual_tokens,
            separator_lengths=self.separator_lengths,
        )

    def load_and_plan(
        self,
        images: Sequence[ImageSource],
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
    ) -> tuple[list[Image.Image], list[SlicePlan]]:
        """Decode and plan the images of one request (the token budget is shared across them).

        In fast mode, encoded sources are planned from their header and then decoded at the JPEG DCT
        scale the plan allows (:func:`llava_uhd.pixels.draft_size`).
        """
        budget = self.max_visual_tokens if max_visual_tokens is None else max_visual_tokens
        limit = self.slicing.max_image_pixels
        decoded: list[Image.Image | None] = [None] * len(images)
        sizes: list[tuple[int, int]] = []
        for i, source in enumerate(images):
            if isinstance(source, _ENCODED_SOURCES) and self.resize_mode == "fast":
                sizes.append(probe_image_size(source, max_pixels=limit))
            else:
                image = load_image(source, max_pixels=limit)
                decoded[i] = image
                sizes.append(image.size)
        plans = self.plan_images(sizes, max_slices=max_slices, max_visual_tokens=budget)
        loaded = self._decode_planned(images, decoded, plans)
        # The header probe cannot see an EXIF orientation stored after a PNG's pixel data (the decoder
        # meets it at the end): an image that decodes as the transpose of its probed size is planned
        # again from what was decoded, and any other image whose plan that changes is decoded again.
        turned = [
            i
            for i, (image, size) in enumerate(zip(loaded, sizes, strict=True))
            if decoded[i] is None and size[0] != size[1] and image.size == (size[1], size[0])
        ]
        if turned:
            for i in turned:
                sizes[i], decoded[i] = loaded[i].size, loaded[i]
            first, plans = plans, self.plan_images(sizes, max_slices=max_slices, max_visual_tokens=budget)
            decoded = [
                image if full is not None or old == new else None  # a draft for the old plan may not fit
                for image, full, old, new in zip(loaded, decoded, first, plans, strict=True)
            ]
            loaded = self._decode_planned(images, decoded, plans)
        return loaded, plans

    def _decode_planned(
        self, images: Sequence[ImageSource], decoded: list[Image.Image | None], plans: Sequence[SlicePlan]
    ) -> list[Image.Image]:
        """The decoded images, decoding the rest at the DCT scale each one's plan allows."""
        limit = self.slicing.max_image_pixels
        return [
            image if image is not None else load_image(source, max_pixels=limit, draft_size=draft_size(plan))
            for image, source, plan in zip(decoded, images, plans, strict=True)
        ]

    def encode(self, images: Sequence[Image.Image], plans: Sequence[SlicePlan]) -> ImageBatch:
        """Pixels of decoded images and their plans, all in one preallocated buffer."""
        return ImageBatch(
            pixel_values=image_patches(images, plans, self.slicing, self.resize_mode),
            piece_grids=_grids_tensor(plans),
            pieces_per_image=torch.tensor([p.num_slices + 1 for p in plans], dtype=torch.long),
            plans=tuple(plans),
        )

    def process_images(
        self,
        images: Sequence[ImageSource],
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
    ) -> ImageBatch:
        """Load, plan and encode the images of one request (no text)."""
        return self.encode(*self.load_and_plan(images, max_slices, max_visual_tokens))

    # ---- text + images ---------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | ImageSource | None = None,
        *,
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        return_plans: bool = False,
    ) -> BatchFeature:
        """Tokenise ``text`` (one prompt or a batch) and encode its images.

        ``images`` is a flat list in the order the ``<image>`` placeholders appear across the batch, or
        one list per prompt. The token budget applies to each prompt's images together.
        Returns a BatchFeature with ``input_ids``, ``attention_mask`` (B, T) and, when there are images,
        ``pixel_values`` (Pt, C*P*P), ``piece_grids`` (N, 2), ``pieces_per_image`` (n_images,).
        With ``return_plans`` the plans are attached as the ``plans`` attribute (a tuple per image).
        """
        texts = [text] if isinstance(text, str) else list(text)
        per_sample = self._images_per_sample(texts, images)
        side = self.padding_side if padding_side is None else padding_side
        _check_padding_side(side)
        rows: list[list[int]] = []
        all_images: list[Image.Image] = []
        all_plans: list[SlicePlan] = []
        for sample_text, sample_images in zip(texts, per_sample, strict=True):
            ids = self.tokenizer.encode(sample_text, add_special_tokens=add_special_tokens)
            loaded, plans = (
                self.load_and_plan(sample_images, max_slices, max_visual_tokens)
                if sample_images
                else ([], [])
            )
            all_images.extend(loaded)
            all_plans.extend(plans)
            expanded, _ = expand_image_tokens(
                ids,
                plans,
                image_token_id=self.image_token_id,
                num_queries=self.num_queries,
                separator_ids=self.separator_ids,
            )
            rows.append(expanded)
        data = self._pad(rows, side)
        if all_plans:  # one buffer for the whole batch: no per-sample tensors to concatenate
            batch = self.encode(all_images, all_plans)
            data.update(pixel_values=batch.pixel_values, piece_grids=batch.piece_grids)
            data["pieces_per_image"] = batch.pieces_per_image
        features = BatchFeature(data=data)
        if return_plans:
            features.plans = tuple(all_plans)
        return features

    def _images_per_sample(self, texts: list[str], images: Any) -> list[list[ImageSource]]:
        """Group images by prompt, checking each prompt's placeholder count (naming both counts)."""
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, list | tuple):
            images = [images]
        nested = len(images) > 0 and all(isinstance(x, list | tuple) for x in images)
        if nested:
            if len(images) != len(texts):
                raise PlaceholderMismatchError(f"got {len(texts)} prompt(s) but {len(images)} image lists")
            for i, (count, sample) in enumerate(zip(counts, images, strict=True)):
                if count != len(sample):
                    raise PlaceholderMismatchError(
                        f"prompt {i} has {count} {self.image_token} placeholder(s) but {len(sample)} image(s) were given"
                    )
            return [list(sample) for sample in images]
        if sum(counts) != len(images):
            raise PlaceholderMismatchError(
                f"the text has {sum(counts)} {self.image_token} placeholder(s) but {len(images)} image(s) were given"
            )
        grouped, start = [], 0
        for count in counts:
            grouped.append(list(images[start : start + count]))
            start += count
        return grouped

    def _pad(self, rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:  # Llama has no pad token; padded positions are masked out anyway
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the tokenizer, the preset YAML and the processor options into ``directory``."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        self.preset.save(folder / PRESET_FILE)
        options = {
            "image_token": self.image_token,
            "padding_side": self.padding_side,
            "resize_mode": self.resize_mode,
            "max_visual_tokens": self.max_visual_tokens,
        }
        (folder / PROCESSOR_FILE).write_text(json.dumps(options, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> LlavaUHDProcessor:
        """Load a processor saved by :meth:`save_pretrained`; keyword arguments override saved options."""
        folder = Path(directory)
        if not (folder / PRESET_FILE).is_file():
            raise ConfigError(f"{folder}: no {PRESET_FILE}; not a saved LLaVA-UHD processor")
        options = (
            json.loads((folder / PROCESSOR_FILE).read_text()) if (folder / PROCESSOR_FILE).is_file() else {}
        )
        options.update(overrides)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(tokenizer, Preset.load(folder / PRESET_FILE), **options)


def _check_padding_side(side: str) -> None:
    if side not in _PADDING_SIDES:
        raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")


def _check_budget(budget: int | None) -> None:
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"max_visual_tokens must be a positive integer or None, got {budget!r}")
