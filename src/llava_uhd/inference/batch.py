"""Answer many (images, question) requests in batches through the model's batched generation.

Requests of one batch may carry images of different slice counts: the processor packs every piece of
every image into one pixel buffer and left-pads the prompts, and the model fills each prompt's visual
placeholders in order (docs/INTERFACES.md). A request whose image cannot be read fails alone: its answer
is the error, and the rest of its batch still runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_uhd.errors import LlavaUHDError
from llava_uhd.images import ImageSource, load_image
from llava_uhd.inference.generate import GenerationOptions, build_prompt
from llava_uhd.layout import visual_token_count


@dataclass(frozen=True)
class Request:
    """One question about ``images`` (paths, bytes, PIL images or arrays), in order before the question."""

    images: tuple[ImageSource, ...]
    question: str


@dataclass(frozen=True)
class Answer:
    """The answer text (None on error), the error message (None on success) and the LLM tokens the
    request's images took (placeholders and separators: N * (Q + 1) + Q for one image of N slices)."""

    text: str | None
    error: str | None = None
    visual_tokens: int = 0


def answer_batch(
    model: Any,
    processor: Any,
    requests: Sequence[Request],
    *,
    max_slices: int | None = None,
    **options: Any,
) -> list[Answer]:
    """Answer ``requests`` in one generate call; ``options`` are :class:`GenerationOptions` fields.

    ``max_slices`` caps the slices of every image (1: the overview alone). Images are decoded first, so
    a broken one turns into that request's error instead of failing the batch.
    """
    settings = GenerationOptions(**options)
    tokenizer = processor.tokenizer
    answers: list[Answer | None] = [None] * len(requests)
    prompts, images, live = [], [], []
    for i, request in enumerate(requests):
        try:
            loaded = [
                load_image(source, max_pixels=processor.slicing.max_image_pixels) for source in request.images
            ]
            prompt = build_prompt(request.question, len(loaded), model.config.template, tokenizer)
        except LlavaUHDError as exc:
            answers[i] = Answer(None, str(exc))
            continue
        prompts.append(prompt)
        images.append(loaded)
        live.append(i)
    if live:
        inputs = processor(prompts, images, padding_side="left", max_slices=max_slices, return_plans=True)
        plans = iter(inputs.plans)
        tokens = [
            sum(
                visual_token_count(next(plans), processor.num_queries, processor.separator_lengths)
                for _ in imgs
            )
            for imgs in images
        ]
        inputs = {k: v.to(model.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                **settings.generate_kwargs(),
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text, n in zip(live, texts, tokens, strict=True):
            answers[i] = Answer(text.strip(), None, int(n))
    return [a for a in answers if a is not None]


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise LlavaUHDError(f"batch size must be >= 1, got {size}")
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
