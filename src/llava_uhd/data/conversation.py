"""LLaVA records -> token ids and labels (paper section 4 training data; DESIGN.md section 6).

A record is LLaVA's ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`` (``image`` a
path, a list of paths, or absent) or the ``{"role": "user"|"assistant"|"system", "content"}`` form.
:func:`parse_record` checks it and normalises the ``<image>`` placeholders; :func:`encode_conversation`
renders a template, tokenizes each piece on its own and concatenates, replacing every ``<image>`` by the
image's visual layout ids (labels ``-100`` there), so the answer/prompt boundary never depends on how the
whole string would have been tokenized. :func:`truncate` cuts to ``max_length`` without ever cutting a
visual block.

Tokenizing a piece that continues a sequence: SentencePiece tokenizers (Llama) put a "▁" in front of the
first word of every call, which is right at the start of a sequence but wrong in the middle ("," would
become "▁,"). Text that follows an added special token gets no such prefix, so a continuation is
tokenized as ``<image>`` + text and the first id dropped; for byte-level BPE this changes nothing. The
result equals tokenizing the whole string with every image and EOS as a hard boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llava_uhd.data.templates import IMAGE_PLACEHOLDER, Template, Turn
from llava_uhd.errors import BadSampleError, ConfigError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips (its default ignore_index)

_ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Conversation:
    """A checked record: its id, image paths (as written in the record) and turns, placeholders normalised."""

    id: str
    images: tuple[str, ...]
    turns: tuple[Turn, ...]


@dataclass
class EncodedSample:
    """Token ids and labels of one sample; ``visual_spans[i]`` is image ``i``'s ``[start, end)`` in ids."""

    input_ids: list[int]
    labels: list[int]
    visual_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_visual_tokens(self) -> int:
        return sum(end - start for start, end in self.visual_spans)

    @property
    def num_text_tokens(self) -> int:
        return len(self.input_ids) - self.num_visual_tokens


def record_id(record: Mapping[str, Any], index: int) -> str:
    """The record's ``id`` as a string, or ``#<index>`` when it has none."""
    value = record.get("id") if isinstance(record, Mapping) else None
    return str(value) if value is not None else f"#{index}"


def _record_images(record: Mapping[str, Any], sample_id: str) -> tuple[str, ...]:
    image = record.get("image", record.get("images"))
    if image is None:
        return ()
    if isinstance(image, str):
        return (image,)
    if isinstance(image, list | tuple) and all(isinstance(p, str) for p in image):
        return tuple(image)
    raise BadSampleError(sample_id, f"'image' must be a path or a list of paths, got {image!r}")


def _record_turns(record: Mapping[str, Any], sample_id: str) -> list[Turn]:
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise BadSampleError(
            sample_id, f"malformed turns: 'conversations' must be a non-empty list, got {raw!r}"
        )
    turns = []
    for k, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise BadSampleError(sample_id, f"malformed turns: turn {k} is not an object: {message!r}")
        role = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if role not in _ROLE_NAMES or not isinstance(text, str):
            raise BadSampleError(sample_id, f"malformed turns: turn {k} has role {role!r} and text {text!r}")
        turns.append(Turn(_ROLE_NAMES[role], text))
    return turns


def _check_order(turns: Sequence[Turn], sample_id: str) -> None:
    """System (optional, first), then user/assistant alternating from a user turn, ending with an answer."""
    dialog = turns[1:] if turns[0].role == "system" else turns
    roles = [t.role for t in dialog]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(roles))]
    if not roles or roles != expected or roles[-1] != "assistant":
        raise BadSampleError(
            sample_id,
            f"malformed turns: roles {roles} must alternate user/assistant, "
            "start with user and end with assistant",
        )


def parse_record(record: Mapping[str, Any], index: int = 0) -> Conversation:
    """Check a LLaVA record and normalise its ``<image>`` placeholders.

    No placeholder with N images: N ``<image>\\n`` are put in front of the first user turn (as LLaVA does).
    Otherwise the number of placeholders in user turns must equal the number of images, and assistant or
    system turns must have none.

    Raises:
        BadSampleError: naming the record's id and what is wrong.
    """
    sample_id = record_id(record, index)
    if not isinstance(record, Mapping):
        raise BadSampleError(sample_id, f"a record must be an object, got {type(record).__name__}")
    images = _record_images(record, sample_id)
    turns = _record_turns(record, sample_id)
    _check_order(turns, sample_id)
    for k, turn in enumerate(turns):
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.text:
            raise BadSampleError(
                sample_id, f"image-count mismatch: {turn.role} turn {k} contains {IMAGE_PLACEHOLDER}"
            )
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders == 0 and images:
        first_user = next(k for k, t in enumerate(turns) if t.role == "user")
        prefix = (IMAGE_PLACEHOLDER + "\n") * len(images)
        turns[first_user] = Turn("user", prefix + turns[first_user].text)
    elif placeholders != len(images):
        raise BadSampleError(
            sample_id,
            f"image-count mismatch: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"for {len(images)} image(s)",
        )
    return Conversation(sample_id, images, tuple(turns))


def image_token_id(tokenizer: Any) -> int:
    """The id of the ``<image>`` special token, which the processor adds to the tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no {IMAGE_PLACEHOLDER} token; build it "
            "through the processor, which adds it"
        )
    return int(token_id)


def encode_text(tokenizer: Any, text: str, at_start: bool) -> list[int]:
    """Token ids of ``text`` without special tokens; ``at_start=False`` tokenizes it as a continuation."""
    if not text:
        return []
    if at_start:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    anchor = image_token_id(tokenizer)
    ids = list(tokenizer(IMAGE_PLACEHOLDER + text, add_special_tokens=False)["input_ids"])
    if not ids or ids[0] != anchor:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} does not keep {IMAGE_PLACEHOLDER} as one token"
        )
    return ids[1:]


ImageIds = Callable[[int], Sequence[int]]  # image index -> its visual layout ids


def encode_conversation(
    turns: Sequence[Turn], template: Template, tokenizer: Any, image_ids: ImageIds
) -> EncodedSample:
    """Render ``turns`` with ``template`` and tokenize piece by piece.

    ``image_ids(i)`` gives image ``i``'s layout ids (placeholders and separators, from the processor);
    they replace the ``i``-th ``<image>`` and carry no loss. Trainable pieces carry their own ids as labels.
    """
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if template.add_bos and bos is not None:
        ids.append(int(bos))
        labels.append(IGNORE_INDEX)
    started = False  # a BOS alone does not count: the first text is still tokenized as a sequence start
    for piece in template.render(turns, tokenizer):
        for k, chunk in enumerate(piece.text.split(IMAGE_PLACEHOLDER)):
            if k > 0:  # an <image> stood before this chunk
                visual = [int(t) for t in image_ids(len(spans))]
                spans.append((len(ids), len(ids) + len(visual)))
                ids.extend(visual)
                labels.extend([IGNORE_INDEX] * len(visual))
                started = True
            chunk_ids = encode_text(tokenizer, chunk, at_start=not started)
            ids.extend(chunk_ids)
            labels.extend(chunk_ids if piece.trainable else [IGNORE_INDEX] * len(chunk_ids))
            started = started or bool(chunk_ids)
    return EncodedSample(ids, labels, spans)


def truncate(sample: EncodedSample, max_length: int, sample_id: str) -> EncodedSample:
    """Cut ``sample`` to ``max_length`` tokens, never through a visual block.

    Raises:
        BadSampleError: when a visual block does not end within ``max_length`` (the sample would otherwise be
            trained on part of an image), or when no supervised token is left.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    for i, (start, end) in enumerate(sample.visual_spans):
        if end > max_length:
            raise BadSampleError(
                sample_id,
                f"visual block too long: image {i} occupies tokens {start}..{end - 1}, "
                f"beyond max_length={max_length}",
            )
    if len(sample.input_ids) <= max_length:
        return sample
    labels = sample.labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSampleError(
            sample_id,
            f"no supervised token left after truncation to max_length={max_length} "
            f"(the sample has {len(sample.input_ids)} tokens)",
        )
    return EncodedSample(sample.input_ids[:max_length], labels, list(sample.visual_spans))
