"""The request body of ``POST /v1/chat/completions`` (the OpenAI chat format) and what it becomes here.

Messages are ``system`` (or ``developer``), ``user`` and ``assistant``; ``content`` is a string or a list
of ``text`` and ``image_url`` parts. Images belong to user messages and go in front of that message's
text, each on its own line, as the model saw them in training (one ``<image>`` per image part, in order).
Fields are checked strictly: a wrong type is refused, never coerced. Fields of the OpenAI API this server
has no use for (``model``, ``user``, ``logprobs`` false, ...) are accepted and ignored. Beyond the OpenAI
API, ``num_beams`` asks for beam search (the openai client sends it with ``extra_body``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_uhd.serve.limits import ApiError, bad_request
from llava_uhd.templates import IMAGE_TOKEN, Turn

_STRICT = ConfigDict(strict=True, extra="ignore")
MAX_STOP_SEQUENCES = 4  # the OpenAI API's bound on ``stop``


class _TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class _ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class _ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: _ImageURL


_Part = Annotated[_TextPart | _ImagePart, Field(discriminator="type")]


class _Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]


class _StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionBody(BaseModel):
    """The fields of a chat completion request this server reads."""

    model_config = _STRICT
    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    num_beams: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: the conversation as turns, its image URLs in placeholder order, the options."""

    turns: tuple[Turn, ...]
    image_urls: tuple[str, ...]
    image_params: tuple[str, ...]  # where each image is in the body, e.g. messages.0.content.1
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    num_beams: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and check a request body; every problem is an :class:`ApiError` naming the field."""
    try:
        parsed = ChatCompletionBody.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    both = parsed.max_tokens is not None and parsed.max_completion_tokens is not None
    if both and parsed.max_tokens != parsed.max_completion_tokens:
        raise bad_request("give max_tokens or max_completion_tokens, not two different values", "max_tokens")
    stop = (parsed.stop,) if isinstance(parsed.stop, str) else tuple(parsed.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise bad_request(f"stop must be up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
    turns, urls, params = _conversation(parsed.messages)
    if parsed.stream_options is not None and not parsed.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    return ChatRequest(
        turns=turns,
        image_urls=urls,
        image_params=params,
        max_tokens=parsed.max_completion_tokens or parsed.max_tokens,
        temperature=parsed.temperature,
        top_p=parsed.top_p,
        seed=parsed.seed,
        num_beams=parsed.num_beams,
        stop=stop,
        stream=bool(parsed.stream),
        include_usage=parsed.stream_options is not None and parsed.stream_options.include_usage,
    )


def _conversation(messages: list[_Message]) -> tuple[tuple[Turn, ...], tuple[str, ...], tuple[str, ...]]:
    """Messages -> turns with ``<image>`` placeholders, the image URLs and their places in the body."""
    turns: list[Turn] = []
    urls: list[str] = []
    params: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}.content"
        role = "system" if message.role == "developer" else message.role
        if role == "system" and i != 0:
            raise bad_request("a system message may only come first", f"messages.{i}.role")
        parts = [_TextPart(type="text", text=message.content)] if isinstance(message.content, str) else []
        parts += [] if isinstance(message.content, str) else message.content
        texts: list[str] = []
        images = 0
        for j, part in enumerate(parts):
            if isinstance(part, _ImagePart):
                if role != "user":
                    raise bad_request(
                        f"images may only be in user messages, not {message.role}", f"{where}.{j}"
                    )
                urls.append(part.image_url.url)
                params.append(f"{where}.{j}.image_url.url")
                images += 1
            else:
                if IMAGE_TOKEN in part.text:
                    raise bad_request(
                        f"message text may not contain {IMAGE_TOKEN}; send images as image_url parts", where
                    )
                texts.append(part.text)
        turns.append(Turn(role, f"{IMAGE_TOKEN}\n" * images + "\n".join(texts)))
    if turns[-1].role != "user":
        raise bad_request("the last message must be a user message (the one to answer)", "messages")
    return tuple(turns), tuple(urls), tuple(params)


def _validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, as one line naming the field."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the body is not valid JSON ({first['msg']})", None, "invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("the body must be a JSON object", None, "invalid_type")
    # pydantic reports each branch of a union (content: a string or a list of parts) and names the branch
    # in the location; the deepest report is the most specific, and the field path drops branch names
    errors = exc.errors(include_url=False)
    deepest = max(errors, key=lambda e: len(e["loc"]))
    path = _path(deepest["loc"])
    messages = dict.fromkeys(
        e["msg"] for e in errors if _path(e["loc"]) == path and len(e["loc"]) == len(deepest["loc"])
    )
    return bad_request(f"{path}: {'; or '.join(messages)}", path or None, "invalid_type")


def _path(loc: tuple) -> str:
    kept: list[str] = []
    for part in loc:
        name = str(part)
        branch = isinstance(part, str) and not part.isidentifier()  # "list[...]", "function-after[...]"
        # a tagged part is located by its tag and then its field of the same name: keep one
        if not branch and name not in _TYPE_NAMES and (not kept or kept[-1] != name):
            kept.append(name)
    return ".".join(kept)


_TYPE_NAMES = frozenset({"str", "list", "int", "bool", "float"})
