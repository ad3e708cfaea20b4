"""Answer many (images, question) requests in batches through the model's batched generation.

Requests of one batch may carry images of different slice counts: each is prepared by the processor's
primitive (``LlavaUHDProcessor.prepare``), then every piece of every image goes into one pixel buffer and
the prompts are left-padded, and the model fills each prompt's visual
placeholders in order (docs/INTERFACES.md). A request whose image cannot be read fails alone: its answer
is the error, and the rest of its batch still runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_uhd.errors import LlavaUHDError
from llava_uhd.images import ImageSource
from llava_uhd.inference.generate import GenerationOptions, question_turns, seeded
from llava_uhd.tokens import pad_token_id


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
    """Answer ``requests`` in one generate call; ``options`` are :class:`GenerationOptions` fields (a
    ``seed`` seeds this call, so a batch's sampled answers repeat for the same batch).

    Each request is prepared by the processor's one primitive (as training prepares a sample), then the
    batch is left-padded. ``max_slices`` caps the slices of every image (1: the overview alone). A request
    whose images cannot be read or planned gets that error as its answer; the others still run.
    """
    settings = GenerationOptions(**options)
    tokenizer = processor.tokenizer
    answers: list[Answer | None] = [None] * len(requests)
    prepared, live = [], []
    for i, request in enumerate(requests):
        try:
            turns = question_turns(request.question, len(request.images))
            prepared.append(
                processor.prepare(
                    turns,
                    request.images,
                    model.config.template,
                    generation_prompt=True,
                    max_slices=max_slices,
                )
            )
        except LlavaUHDError as exc:
            answers[i] = Answer(None, str(exc))
            continue
        live.append(i)
    if live:
        inputs = {k: v.to(model.device) for k, v in processor.batch_inputs(prepared).items()}
        with torch.inference_mode(), seeded(settings.seed, model.device):
            output = model.generate(
                **inputs,
                **settings.generate_kwargs(),
                pad_token_id=pad_token_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text, p in zip(live, texts, prepared, strict=True):
            answers[i] = Answer(text.strip(), None, p.text.num_visual_tokens)
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
