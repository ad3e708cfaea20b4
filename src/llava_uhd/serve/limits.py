"""What one request may ask of the server, and the OpenAI-format error that refuses it.

Every limit is a ``llava-uhd serve`` flag with a default safe for a public port; a request over a limit is
answered with a 4xx whose message names the limit and the flag that raises it. The body limit is enforced
while the body streams in (:class:`BodyLimit`), before any of it is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_uhd.errors import ConfigError

MB = 1_000_000


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits (sizes in bytes) and the queue bound.

    Attributes:
        max_body_bytes: the whole request body (``--max-body-mb``).
        max_image_bytes: one encoded image, after base64 decoding or download (``--max-image-mb``).
        max_image_pixels: width x height of one image, checked from its header before decoding
            (decompression bombs; ``--max-image-pixels``).
        max_images: images in one request, all turns together (``--max-images``).
        max_visual_tokens: LLM tokens all images of one request take (``--max-visual-tokens``).
        max_prompt_tokens: the whole prompt, visual tokens included (``--max-prompt-tokens``).
        max_tokens: the most tokens one request may ask to generate (``--max-tokens-limit``).
        max_beams: the widest beam search one request may ask (``--max-beams``; each beam is a row of
            the batch, so this bounds a request's memory as max_tokens bounds its time).
        max_queue: requests waiting for the model; one more is answered 503 (``--max-queue``).
        remote_timeout_s: the time one remote image download may take (``--remote-timeout``).
    """

    max_body_bytes: int = 20 * MB
    max_image_bytes: int = 10 * MB
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_visual_tokens: int = 4096
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_beams: int = 8
    max_queue: int = 64
    remote_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ConfigError(f"server limit {name} must be > 0, got {value}")


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI error object's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 for a request whose content is wrong."""
    return ApiError(400, message, param=param, code=code)


def over_limit(what: str, value: int | float, limit: int | float, flag: str, param: str | None) -> ApiError:
    """A 400 naming the limit ``what`` was over and the server flag that sets it."""
    return ApiError(
        400,
        f"{what} is {value}, over this server's limit of {limit} (the operator sets it with {flag})",
        param=param,
        code="limit_exceeded",
    )


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` (by ``Content-Length`` or as it streams in) is a 413.

    The body is read whole before the app runs, so the app never sees part of an oversized request; after
    it, ``receive`` is the client's again (a disconnect still reaches the app).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the whole body
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        import json

        error = ApiError(
            413,
            f"the request body is over this server's limit of {self.max_bytes} bytes "
            "(the operator sets it with --max-body-mb)",
            code="body_too_large",
        )
        payload = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
