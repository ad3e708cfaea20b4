"""A multi-turn conversation about an image whose visual features are computed once.

:class:`ChatSession` holds the turns so far and the image's features: the vision tower's and the
resampler's output (:meth:`~llava_uhd.model.llava_uhd.LlavaUHDForConditionalGeneration.encode_pieces`,
(N, Q, D)), computed when the image is set and reused by every turn. Each turn renders the whole
conversation through the processor as training renders one
(:meth:`~llava_uhd.processing.LlavaUHDProcessor.encode_conversation`, the step of
:meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare` after the image is read and planned, with
``generation_prompt=True``), so the prompt of turn k has the ids training makes of the same k - 1
exchanges and question. The kept features go to ``generate`` as ``image_features`` (the way the server's
image-feature cache feeds them), which fill the prompt's placeholders; the image is not read, sliced or
encoded again.

The image goes before the first question, as :func:`~llava_uhd.inference.generate.question_turns` puts
it for a single question, so the first answer is the one ``ask`` gives. Dimensions: N pieces, Q queries
per piece, D the LLM's width, T prompt length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from llava_uhd.errors import ConfigError
from llava_uhd.images import ImageSource
from llava_uhd.inference.generate import GenerationOptions, generate_text, question_turns
from llava_uhd.inference.streaming import TextStream
from llava_uhd.slicing import SlicePlan
from llava_uhd.templates import IMAGE_TOKEN, Turn
from llava_uhd.tokens import EncodedSample


@dataclass(frozen=True)
class ChatImage:
    """The image of a conversation: a name to show, its plan and its (N, Q, D) LLM features."""

    name: str
    plan: SlicePlan
    features: torch.Tensor


class ChatSession:
    """The state of one chat: the image's features (encoded once per image) and the turns so far.

    Args:
        model: a LLaVA-UHD model (:func:`llava_uhd.auto.load_pretrained`).
        processor: its processor; the conversation is rendered in the model's template.
        options: decoding settings of every answer (a ``seed`` is applied to each answer alike).
    """

    def __init__(self, model: Any, processor: Any, options: GenerationOptions | None = None) -> None:
        self.model = model
        self.processor = processor
        self.options = options or GenerationOptions()
        self.image: ChatImage | None = None
        self.turns: list[Turn] = []
        self.last_prompt: EncodedSample | None = None

    def set_image(self, source: ImageSource, name: str | None = None) -> ChatImage:
        """Read, plan and encode ``source`` and start a new conversation about it.

        Raises:
            LlavaUHDError: the image cannot be read or planned; the session is then unchanged.
        """
        loaded, plans = self.processor.load_and_plan([source])
        pieces = self.processor.encode(loaded, plans)
        with torch.inference_mode():
            features = self.model.encode_pieces(
                pieces.pixel_values.to(self.model.device), pieces.piece_grids.to(self.model.device)
            )  # (N, Q, D)
        self.image = ChatImage(str(source) if name is None else name, plans[0], features)
        self.reset()
        return self.image

    def reset(self) -> None:
        """Forget the conversation; keep the image."""
        self.turns = []
        self.last_prompt = None

    def prompt(self, question: str) -> EncodedSample:
        """The ids of the conversation so far plus ``question``, up to where the answer starts."""
        return self._encode(self._turns_with(question))

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` in the conversation and add both to it.

        ``on_text`` receives the answer as it is generated (in one piece under beam search, which
        transformers does not stream); the pieces join to the returned text.

        Raises:
            LlavaUHDError: an empty question, an ``<image>`` after the first question, or a conversation
                longer than the language model's positions; the conversation is then unchanged.
        """
        turns = self._turns_with(question)
        encoded = self._encode(turns)
        settings = self._settings(len(encoded.input_ids))
        device = self.model.device
        ids = torch.tensor([encoded.input_ids], dtype=torch.long, device=device)  # (1, T)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.image is not None:
            inputs["image_features"] = self.image.features
        stream = (
            TextStream(self.processor.tokenizer, on_text) if on_text and settings.num_beams == 1 else None
        )
        text = generate_text(self.model, self.processor.tokenizer, inputs, settings, stream)
        if on_text is not None and stream is None and text:
            on_text(text)
        self.turns = [*turns, Turn("assistant", text)]
        self.last_prompt = encoded
        return text

    def _turns_with(self, question: str) -> list[Turn]:
        if not question.strip():
            raise ConfigError("the question is empty")
        if not self.turns:
            return question_turns(question, 1 if self.image is not None else 0)
        if IMAGE_TOKEN in question:
            raise ConfigError(
                f"only the first question of a conversation may hold {IMAGE_TOKEN} (the image's place)"
            )
        return [*self.turns, Turn("user", question)]

    def _encode(self, turns: list[Turn]) -> EncodedSample:
        plans = [self.image.plan] if self.image is not None else []
        return self.processor.encode_conversation(
            turns, plans, self.model.config.template, generation_prompt=True
        )

    def _settings(self, prompt_length: int) -> GenerationOptions:
        """The options, with the new tokens capped to the positions the language model has left."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if limit is None or prompt_length + self.options.max_new_tokens <= limit:
            return self.options
        if prompt_length >= limit:
            raise ConfigError(
                f"the conversation is {prompt_length} tokens and the model's limit is {limit}; "
                "reset the conversation to go on"
            )
        return replace(self.options, max_new_tokens=limit - prompt_length)
