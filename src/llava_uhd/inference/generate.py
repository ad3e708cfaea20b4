"""Answer one question about one or more images with a saved LLaVA-UHD model.

:func:`answer` is the whole path: the question goes into the model's conversation template (``vicuna_v1``
for the released checkpoint) with one ``<image>`` per image in front, the processor slices the images with
the slicing saved beside the weights and expands the placeholders, the model generates, and the new
tokens are decoded. Chat and serving build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llava_uhd.data.templates import IMAGE_PLACEHOLDER, Turn, get_template
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.images import ImageSource


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


def build_prompt(question: str, num_images: int, template: str, tokenizer: Any) -> str:
    """The generation prompt: one ``<image>`` per image, then the question, in ``template``.

    Images go first, each on its own line, as LLaVA's evaluation writes them; a question that already
    holds ``<image>`` placeholders is used as is and must hold exactly one per image.
    """
    placeholders = question.count(IMAGE_PLACEHOLDER)
    if placeholders == 0:
        question = f"{IMAGE_PLACEHOLDER}\n" * num_images + question
    elif placeholders != num_images:
        raise ConfigError(
            f"the question has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)"
        )
    return get_template(template).generation_prompt([Turn("user", question)], tokenizer)


def load_model_and_processor(
    folder: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load a saved model folder (weights, config, tokenizer and processor files) for inference."""
    from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
    from llava_uhd.processing import LlavaUHDProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json (expected a folder written by save_pretrained or convert)"
        )
    options: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    model = LlavaUHDForConditionalGeneration.from_pretrained(str(folder), **options).eval()
    if device is not None:
        model = model.to(device)
    processor = LlavaUHDProcessor.from_pretrained(str(folder))
    return model, processor


def answer(
    model: Any,
    processor: Any,
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
    prompt = build_prompt(question, len(sources), model.config.template, tokenizer)
    inputs = processor(prompt, sources)  # loads, slices (the saved slicing) and expands the placeholders
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(
            **inputs, **settings.generate_kwargs(), pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
