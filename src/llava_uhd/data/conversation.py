"""LLaVA records -> checked conversations, and truncation of their encoded samples (paper section 4
training data).

A record is LLaVA's ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`` (``image`` a
path, a list of paths, or absent) or the ``{"role": "user"|"assistant"|"system", "content"}`` form.
:func:`parse_record` checks it and normalises the ``<image>`` placeholders; the processor
(:meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare`) turns the conversation into ids, labels and
pixels, exactly as it does at inference. :func:`truncate` cuts to ``max_length`` without ever cutting a
visual block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llava_uhd.errors import BadSampleError, ConfigError
from llava_uhd.templates import IGNORE_INDEX, IMAGE_TOKEN, Turn
from llava_uhd.tokens import EncodedSample

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
        if turn.role != "user" and IMAGE_TOKEN in turn.text:
            raise BadSampleError(
                sample_id, f"image-count mismatch: {turn.role} turn {k} contains {IMAGE_TOKEN}"
            )
    placeholders = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if placeholders == 0 and images:
        first_user = next(k for k, t in enumerate(turns) if t.role == "user")
        prefix = (IMAGE_TOKEN + "\n") * len(images)
        turns[first_user] = Turn("user", prefix + turns[first_user].text)
    elif placeholders != len(images):
        raise BadSampleError(
            sample_id,
            f"image-count mismatch: {placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)",
        )
    return Conversation(sample_id, images, tuple(turns))


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
