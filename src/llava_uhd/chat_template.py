"""Chat messages in the Hugging Face / OpenAI form -> our turns and images, and each template as Jinja.

A message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}`` and
``{"type": "image", "image": <PIL image, path or bytes>}`` (also ``"path"``, ``"url"`` for a local
path or a ``data:`` URL, ``"base64"``). One rule turns parts into turn text, here and in the Jinja
templates alike: an image part becomes ``<image>`` and a newline (LLaVA's data and evaluation put each
image on its own line before the question), a text part its text, in the order given.

:func:`jinja_template` writes the template of a checkpoint (``plain``, ``vicuna_v1``) as the Jinja
source transformers saves as ``chat_template.jinja``; for ``chat_template`` it is the tokenizer's own.
Rendered on the same conversation, the Jinja text is the text :mod:`llava_uhd.templates` renders
(tests/test_hf_native.py checks it). No torch here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llava_uhd.errors import ConfigError, ImageLoadError
from llava_uhd.images import ImageSource
from llava_uhd.templates import (
    IMAGE_TOKEN,
    ChatTemplate,
    MalformedConversationError,
    PlainTemplate,
    Template,
    Turn,
    VicunaTemplate,
    get_template,
)

ROLES = ("system", "user", "assistant")
# Keys an image part may hold its source under (transformers' processors read the same ones).
IMAGE_KEYS = ("image", "path", "url", "base64")


def image_source(part: Mapping[str, Any]) -> ImageSource:
    """The source of an image part: a PIL image, array, bytes or local path; base64 and data URLs decoded.

    Raises:
        ImageLoadError: the part names no source, or a remote URL (nothing is downloaded).
    """
    key = next((k for k in IMAGE_KEYS if part.get(k) is not None), None)
    if key is None:
        raise ImageLoadError(f"image part {dict(part)!r} has none of the keys {list(IMAGE_KEYS)}")
    value = part[key]
    if key == "base64" or (isinstance(value, str) and value.startswith("data:")):
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageLoadError(f"image part {key!r}: not valid base64 data") from None
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise ImageLoadError(
            f"image part {key!r}: {value!r} is a remote URL; pass a local path, bytes or a PIL image"
        )
    if isinstance(value, str) and value.startswith("file://"):
        return value.removeprefix("file://")
    return value


def message_text(content: Any, image_token: str = IMAGE_TOKEN) -> tuple[str, list[ImageSource]]:
    """A message's content as turn text (image parts as ``<image>`` + newline) and its images, in order."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, Sequence):
        raise MalformedConversationError(
            f"message content must be a string or a list of parts, got {type(content).__name__}"
        )
    text, images = "", []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text += str(part.get("text", ""))
        elif kind == "image":
            text += image_token + "\n"
            images.append(image_source(part))
        else:
            raise MalformedConversationError(
                f"content part {part!r}: the type must be 'text' or 'image' (no other modality is read)"
            )
    return text, images


def messages_to_turns(
    messages: Sequence[Mapping[str, Any]], image_token: str = IMAGE_TOKEN
) -> tuple[list[Turn], list[ImageSource]]:
    """Chat messages -> turns and the images of their image parts, in conversation order.

    Raises:
        MalformedConversationError: a message without a known role or with content of another form.
        ImageLoadError: an image part without a usable source.
    """
    turns: list[Turn] = []
    images: list[ImageSource] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise MalformedConversationError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        text, found = message_text(message.get("content", ""), image_token)
        turns.append(Turn(role, text))
        images.extend(found)
    return turns, images


def string_messages(messages: Sequence[Mapping[str, Any]], image_token: str = IMAGE_TOKEN) -> list[dict]:
    """The messages with every content as its turn text (what a tokenizer's own template expects)."""
    turns, _ = messages_to_turns(messages, image_token)
    return [{**message, "content": turn.text} for message, turn in zip(messages, turns, strict=True)]


# The content rule of message_text, in Jinja.
_CONTENT_MACRO = (
    "{%- macro content_text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ IMAGE }}{{ '\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _vicuna_jinja(template: VicunaTemplate) -> str:
    user, assistant = (json.dumps(role) for role in template.roles)
    sep = json.dumps(template.sep)
    sep2 = json.dumps(template.sep2) if template.sep2 is not None else "eos_token"
    return (
        _CONTENT_MACRO + f"{{%- set system = {json.dumps(template.system)} -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = content_text(messages[0]['content']) -%}{%- endif -%}"
        f"{{{{ system ~ {sep} }}}}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{ {user} ~ ': ' ~ content_text(message['content']) ~ {sep} ~ {assistant} ~ ':' }}}}"
        f"{{%- else -%}}{{{{ ' ' ~ content_text(message['content']) ~ {sep2} }}}}"
        "{%- endif -%}{%- endfor -%}"
    )


def _plain_jinja(template: PlainTemplate) -> str:
    end = json.dumps(template.end) if template.end is not None else "eos_token"
    return (
        _CONTENT_MACRO + "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
        "{%- set answers = messages | selectattr('role', 'equalto', 'assistant') | list -%}"
        "{%- if users -%}{{ IMAGE * (content_text(users[0]['content']).count(IMAGE)) }}{%- endif -%}"
        f"{{%- if answers -%}}{{{{ content_text(answers[0]['content']) ~ {end} }}}}{{%- endif -%}}"
    )


def jinja_template(template: str | Template, tokenizer: Any, image_token: str = IMAGE_TOKEN) -> str | None:
    """The Jinja chat template of ``template``: ``plain`` and ``vicuna_v1`` written out, ``chat_template``
    the tokenizer's own (None when it has none)."""
    chosen = get_template(template)
    if isinstance(chosen, VicunaTemplate):
        body = _vicuna_jinja(chosen)
    elif isinstance(chosen, PlainTemplate):
        body = _plain_jinja(chosen)
    elif isinstance(chosen, ChatTemplate):
        return getattr(tokenizer, "chat_template", None)
    else:
        raise ConfigError(f"template {chosen.name!r} has no Jinja form")
    return f"{{%- set IMAGE = {json.dumps(image_token)} -%}}" + body
