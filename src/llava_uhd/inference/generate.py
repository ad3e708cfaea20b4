"""Answer one question about one or more images with a saved LLaVA-UHD model.

:func:`answer` is the whole path: the question becomes a user turn with one ``<image>`` per image in
front, the processor prepares that conversation with the answer left open
(:meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare` with ``generation_prompt=True``: the model's
template, ``vicuna_v1`` for the released checkpoint, and the slicing saved beside the weights), the model
generates, and the new tokens are decoded. It is the same call that made the training samples, so the
prompt, pixels and grids are what the model was trained on. Load a folder with
:func:`llava_uhd.auto.load_pretrained`. Chat and serving build on this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llava_uhd.errors import ConfigError
from llava_uhd.images import ImageSource
from llava_uhd.templates import IMAGE_TOKEN, Turn, get_template
from llava_uhd.tokens import pad_token_id

if TYPE_CHECKING:
    from llava_uhd.processing import LlavaUHDProcessor, PreparedConversation


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings. ``temperature`` 0 decodes greedily (or by beam search with ``num_beams`` > 1)."""

    max_new_tokens: int = 256
    num_beams: int = 1
    temperature: float = 0.0
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        sample = self.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": sample,
        }
        if sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs


def question_turns(question: str, num_images: int) -> list[Turn]:
    """The conversation of one question: a user turn with one ``<image>`` per image, then the question.

    Images go first, each on its own line, as LLaVA's evaluation writes them; a question that already
    holds ``<image>`` placeholders is used as is and must hold exactly one per image.
    """
    placeholders = question.count(IMAGE_TOKEN)
    if placeholders == 0:
        question = f"{IMAGE_TOKEN}\n" * num_images + question
    elif placeholders != num_images:
        raise ConfigError(
            f"the question has {placeholders} {IMAGE_TOKEN} placeholder(s) for {num_images} image(s)"
        )
    return [Turn("user", question)]


def build_prompt(question: str, num_images: int, template: str, tokenizer: Any) -> str:
    """The generation prompt text of :func:`question_turns` in ``template``."""
    return get_template(template).generation_prompt(question_turns(question, num_images), tokenizer)


def prompt_inputs(
    processor: LlavaUHDProcessor, images: Sequence[ImageSource], question: str, template: str
) -> PreparedConversation:
    """The model inputs for ``question`` about ``images``: the conversation prepared up to the answer."""
    turns = question_turns(question, len(images))
    return processor.prepare(turns, images, template, generation_prompt=True)


def answer(
    model: Any,
    processor: LlavaUHDProcessor,
    images: ImageSource | Sequence[ImageSource],
    question: str,
    **options: Any,
) -> str:
    """Answer ``question`` about ``images`` (one source or a list: paths, bytes, PIL images, arrays).

    ``options`` are :class:`GenerationOptions` fields (``max_new_tokens``, ``num_beams``, ``temperature``,
    ``top_p``). Returns the generated text without the prompt and special tokens.
    """
    settings = GenerationOptions(**options)
    sources = list(images) if isinstance(images, list | tuple) else [images]
    tokenizer = processor.tokenizer
    prepared = prompt_inputs(processor, sources, question, model.config.template)
    inputs = {k: v.to(model.device) for k, v in prepared.model_inputs().items()}
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            **settings.generate_kwargs(),
            pad_token_id=pad_token_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
