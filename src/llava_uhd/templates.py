"""Prompt templates: a list of turns in, text pieces that do or do not carry loss out. A template belongs
to the checkpoint (its name is saved in the model config and the preset), so training data and inference
both render prompts through this module.

No tokenization happens here; :func:`llava_uhd.tokens.encode_conversation` tokenizes the pieces one by
one and concatenates them, so the boundary between prompt and answer is exact by construction (LLaVA
instead tokenizes the whole prompt and re-derives the boundary with length arithmetic and ``- 2``
offsets).

Three templates:

* ``plain`` (stage 1, LLaVA's ``conv_llava_plain``): the image placeholders, then the caption (the first
  assistant turn), then the end-of-sequence token. Any human text besides the images is dropped, as
  LLaVA's ``preprocess_plain`` does. Only the caption and the end token carry loss.
* ``vicuna_v1`` (stage 2, LLaVA's ``conv_vicuna_v1``, separator style TWO with ``sep=" "`` and
  ``sep2="</s>"``): ``SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>``. Each answer and
  the ``</s>`` after it carry loss.
* ``chat_template``: the tokenizer's own Jinja chat template, rendered incrementally to find where each
  assistant answer starts and ends.

``<image>`` placeholders (:data:`IMAGE_TOKEN`) stay in the text; tokenization replaces each with the
image's visual layout. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from llava_uhd.errors import ConfigError, LlavaUHDError

IMAGE_TOKEN = "<image>"  # the placeholder of one image, in conversation text and in the tokenizer
IGNORE_INDEX = -100  # the label of positions without loss (torch's cross-entropy default ignore_index)

# LLaVA's conv_vicuna_v1 system prompt, verbatim (docs/design.md section 6).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Role = Literal["system", "user", "assistant"]


class MalformedConversationError(LlavaUHDError, ValueError):
    """The turns cannot be rendered by the template (wrong order, no answer to train on, ...)."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``text`` may contain ``<image>`` placeholders (user turns only)."""

    role: Role
    text: str


@dataclass(frozen=True)
class Piece:
    """A run of prompt text: tokenized on its own; its tokens carry loss iff ``trainable``."""

    text: str
    trainable: bool


class Template(Protocol):
    """How turns become text pieces. ``add_bos``: put the tokenizer's BOS id (if any) in front."""

    name: str
    add_bos: bool

    def render(self, turns: Sequence[Turn], tokenizer: Any) -> list[Piece]:
        """Training pieces for a conversation that ends with an assistant turn."""
        ...

    def generation_prompt(self, turns: Sequence[Turn], tokenizer: Any) -> str:
        """The prompt text for a conversation ending with a user turn, up to where the answer starts."""
        ...


def split_system(turns: Sequence[Turn]) -> tuple[str | None, list[Turn]]:
    """Separate a leading system turn (if any) from the user/assistant turns."""
    if turns and turns[0].role == "system":
        return turns[0].text, list(turns[1:])
    return None, list(turns)


def _eos_text(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token; the plain and vicuna_v1 "
            "templates end every answer with it"
        )
    return str(eos)


@dataclass(frozen=True)
class PlainTemplate:
    """Stage-1 captioning: ``<image>...<image>`` + caption + EOS; loss on the caption and EOS only.

    LLaVA's plain conversation ends with its ``sep`` ("\\n"); we end with the tokenizer's EOS so that a
    captioning model learns where to stop (``end=None``); pass ``end="\\n"`` for LLaVA's exact text.
    """

    name: str = "plain"
    add_bos: bool = True
    end: str | None = None

    def render(self, turns: Sequence[Turn], tokenizer: Any) -> list[Piece]:
        _, dialog = split_system(turns)
        user = next((t for t in dialog if t.role == "user"), None)
        answer = next((t for t in dialog if t.role == "assistant"), None)
        if answer is None:
            raise MalformedConversationError("the plain template needs an assistant turn (the caption)")
        images = IMAGE_TOKEN * (user.text.count(IMAGE_TOKEN) if user is not None else 0)
        end = self.end if self.end is not None else _eos_text(tokenizer)
        return [Piece(images, False), Piece(answer.text + end, True)]

    def generation_prompt(self, turns: Sequence[Turn], tokenizer: Any) -> str:
        _, dialog = split_system(turns)
        user = next((t for t in dialog if t.role == "user"), None)
        return IMAGE_TOKEN * (user.text.count(IMAGE_TOKEN) if user is not None else 0)


@dataclass(frozen=True)
class VicunaTemplate:
    """LLaVA's ``conv_vicuna_v1`` (separator style TWO): ``sep`` after user turns, ``sep2`` after answers.

    ``sep2=None`` means the tokenizer's EOS, which is "</s>" for Vicuna. The answer piece starts with the
    space that follows "ASSISTANT:", so the prompt piece ends exactly where generation starts.
    """

    name: str = "vicuna_v1"
    add_bos: bool = True
    system: str = VICUNA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str | None = None

    def _prompt_pieces(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[str, str | None]]]:
        system, dialog = split_system(turns)
        pairs: list[tuple[str, str | None]] = []
        for i in range(0, len(dialog), 2):
            user, answer = dialog[i], dialog[i + 1] if i + 1 < len(dialog) else None
            if user.role != "user" or (answer is not None and answer.role != "assistant"):
                raise MalformedConversationError(
                    f"turns must alternate user/assistant, got {[t.role for t in dialog]}"
                )
            pairs.append((user.text, answer.text if answer is not None else None))
        return (self.system if system is None else system), pairs

    def render(self, turns: Sequence[Turn], tokenizer: Any) -> list[Piece]:
        system, pairs = self._prompt_pieces(turns)
        if not pairs or pairs[-1][1] is None:
            raise MalformedConversationError("a training conversation must end with an assistant turn")
        sep2 = self.sep2 if self.sep2 is not None else _eos_text(tokenizer)
        user_role, assistant_role = self.roles
        pieces: list[Piece] = []
        for j, (question, answer) in enumerate(pairs):
            head = system + self.sep if j == 0 else ""
            pieces.append(Piece(f"{head}{user_role}: {question}{self.sep}{assistant_role}:", False))
            pieces.append(Piece(f" {answer}{sep2}", True))
        return pieces

    def generation_prompt(self, turns: Sequence[Turn], tokenizer: Any) -> str:
        system, pairs = self._prompt_pieces(turns)
        if not pairs or pairs[-1][1] is not None:
            raise MalformedConversationError("a generation prompt must end with a user turn")
        sep2 = self.sep2 if self.sep2 is not None else _eos_text(tokenizer)
        user_role, assistant_role = self.roles
        text = system + self.sep
        for question, answer in pairs:
            text += f"{user_role}: {question}{self.sep}{assistant_role}:"
            if answer is not None:
                text += f" {answer}{sep2}"
        return text


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template, rendered incrementally.

    The whole conversation is rendered once (``full``). For each assistant turn ``j`` the prompt up to it
    (``render(turns[:j], add_generation_prompt=True)``) must be a prefix of ``full``: the answer starts
    after it. The answer's end is where its content ends plus the turn terminator the template writes after
    it (read from ``render(turns[:j + 1])``, e.g. ``<|im_end|>\\n``). Template scaffolding between the
    generation prompt and the content (Qwen3's empty ``<think>`` block on the last turn) carries no loss.
    """

    name: str = "chat_template"
    add_bos: bool = False  # chat templates write their own BOS when they want one

    @staticmethod
    def _render(tokenizer: Any, turns: Sequence[Turn], generation_prompt: bool) -> str:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__} has no chat template; use the "
                "plain or vicuna_v1 template"
            )
        messages = [{"role": t.role, "content": t.text} for t in turns]
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )

    def render(self, turns: Sequence[Turn], tokenizer: Any) -> list[Piece]:
        if not turns or turns[-1].role != "assistant":
            raise MalformedConversationError("a training conversation must end with an assistant turn")
        full = self._render(tokenizer, turns, generation_prompt=False)
        pieces: list[Piece] = []
        cursor = 0
        for j, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            prompt = self._render(tokenizer, turns[:j], generation_prompt=True)
            if not full.startswith(prompt) or len(prompt) < cursor:
                raise MalformedConversationError(
                    f"the chat template does not render turn {j}'s prompt as a prefix of the "
                    "whole conversation; it cannot be masked by incremental rendering"
                )
            alone = self._render(tokenizer, turns[: j + 1], generation_prompt=False)
            content_at = alone.rfind(turn.text)
            terminator = alone[content_at + len(turn.text) :]
            start = full.find(turn.text, len(prompt))
            end = start + len(turn.text)
            if content_at < 0 or start < 0 or not full.startswith(terminator, end):
                raise MalformedConversationError(
                    f"assistant turn {j}'s text is not where the chat template renders it"
                )
            pieces.append(Piece(full[cursor:start], False))
            pieces.append(Piece(full[start : end + len(terminator)], True))
            cursor = end + len(terminator)
        if cursor < len(full):
            pieces.append(Piece(full[cursor:], False))
        return [p for p in pieces if p.text]

    def generation_prompt(self, turns: Sequence[Turn], tokenizer: Any) -> str:
        return self._render(tokenizer, turns, generation_prompt=True)


TEMPLATES: dict[str, Template] = {t.name: t for t in (PlainTemplate(), VicunaTemplate(), ChatTemplate())}


def get_template(name: str | Template) -> Template:
    """A template by name (``plain``, ``vicuna_v1``, ``chat_template``), or a template object as is."""
    if not isinstance(name, str):
        return name
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
