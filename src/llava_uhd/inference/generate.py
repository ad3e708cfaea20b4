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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llava_uhd.errors import ConfigError
from llava_uhd.images import ImageSource
from llava_uhd.templates import IMAGE_TOKEN, Turn, get_template
from llava_uhd.tokens import pad_token_id

if TYPE_CHECKING:
    from transformers.generation.streamers import BaseStreamer

    from llava_uhd.processing import LlavaUHDProcessor, PreparedConversation


# torch.manual_seed accepts seeds below 2**64; keep to what every RNG (and JSON) takes as an int.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings. ``temperature`` 0 decodes greedily (or by beam search with ``num_beams`` > 1);
    ``seed`` makes sampling reproducible: each generate call draws from a generator seeded with it."""

    max_new_tokens: int = 256
    num_beams: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (the seed is applied around the call, :func:`seeded`)."""
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


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG (CPU, and ``device``'s if it is a GPU) seeded with ``seed``, then put
    the caller's RNG state back; nothing changes when ``seed`` is None. ``generate`` samples from the
    global generator, so this is how a seed reaches it without leaking into the caller's randomness."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def generate_text(
    model: Any,
    tokenizer: Any,
    inputs: dict[str, torch.Tensor],
    settings: GenerationOptions,
    streamer: BaseStreamer | None = None,
) -> str:
    """Generate from the model inputs of one prompt and decode the new tokens (special tokens dropped).

    ``inputs`` are on the model's device: the processor's keys, or ``input_ids``, ``attention_mask`` and
    cached ``image_features``. ``streamer`` receives the tokens as
    they come (greedy or sampling only: transformers streams no beam search).
    """
    prompt_length = inputs["input_ids"].shape[1]
    with torch.inference_mode(), seeded(settings.seed, model.device):
        output = model.generate(
            **inputs,
            **settings.generate_kwargs(),
            pad_token_id=pad_token_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True).strip()


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
    ``top_p``, ``seed``). Returns the generated text without the prompt and special tokens.
    """
    settings = GenerationOptions(**options)
    sources = list(images) if isinstance(images, list | tuple) else [images]
    prepared = prompt_inputs(processor, sources, question, model.config.template)
    return answer_prepared(model, processor, prepared, settings)


def answer_prepared(
    model: Any, processor: LlavaUHDProcessor, prepared: PreparedConversation, settings: GenerationOptions
) -> str:
    """The answer to a conversation already prepared up to its open answer (:func:`prompt_inputs`)."""
    inputs = {k: v.to(model.device) for k, v in prepared.model_inputs().items()}
    return generate_text(model, processor.tokenizer, inputs, settings)
