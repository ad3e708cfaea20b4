"""The HTTP API: OpenAI's ``/v1/chat/completions`` and ``/v1/models``, ``/v1/plan``, ``/health``,
``/metrics`` and the web page at ``/``.

Request handlers parse and check a request, prepare its images on a worker thread (CPU work stays off
the event loop), queue the job for the :class:`~llava_uhd.serve.batcher.Batcher` and relay its events:
as server-sent events in OpenAI's chunk format (``stream: true``), or as one response. Every error is the
OpenAI error object with the right status; a client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_uhd.errors import LlavaUHDError
from llava_uhd.images import probe_image_size
from llava_uhd.layout import visual_token_count
from llava_uhd.serve.batcher import Batcher
from llava_uhd.serve.engine import Delta, Done, Engine, Event, Failed, Job
from llava_uhd.serve.image_urls import sniff_format
from llava_uhd.serve.limits import ApiError, BodyLimit, bad_request, over_limit
from llava_uhd.serve.metrics import Metrics
from llava_uhd.serve.page import page_html
from llava_uhd.serve.schema import parse_chat_request

# Endpoint labels for /metrics: known paths by name, anything else as "other" (bounded label values).
_ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/plan")
_DISCONNECT_POLL_S = 0.25
_CLIENT_CLOSED = 499  # nginx's status for "client closed the request": counted, never seen by a client


def create_app(engine: Engine, batcher: Batcher, *, api_key: str | None = None) -> Any:
    """The ASGI application of one server (the body limit wraps everything)."""
    metrics = engine.metrics
    metrics.gauges.update(
        queue_depth=lambda: batcher.depth,
        image_cache_hits_total=lambda: engine.cache.hits,
        image_cache_misses_total=lambda: engine.cache.misses,
        image_cache_bytes=lambda: engine.cache.nbytes,
        image_cache_entries=lambda: len(engine.cache),
    )
    created = int(time.time())
    app = FastAPI(title="llava-uhd", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        )
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        error = ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401,
                "a valid API key is needed: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                kind="authentication_error",
            )

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "queue_depth": batcher.depth}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "llava-uhd"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != engine.name:
            raise ApiError(
                404,
                f"no model {name!r} here; this server has {engine.name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/plan")
    async def plan(request: Request) -> dict[str, Any]:
        authorize(request)
        data = await request.body()
        return await anyio.to_thread.run_sync(_plan, engine, data)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        parsed = parse_chat_request(await request.body())
        batcher.check_room()
        job = await anyio.to_thread.run_sync(engine.prepare, parsed)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        batcher.submit(job)
        reply = _Reply(engine.name, job, parsed.include_usage)
        if parsed.stream:
            return StreamingResponse(_stream(reply, events, batcher), media_type="text/event-stream")
        return await _collect(reply, events, batcher, request)

    return BodyLimit(_Counted(app, metrics), engine.limits.max_body_bytes)


class _Counted:
    """ASGI middleware counting every response by endpoint and status (413s of the body limit too)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = _CLIENT_CLOSED

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope.get("path", "")
            self.metrics.count_request(path if path in _ENDPOINTS else "other", status)


class _Reply:
    """The OpenAI response objects of one job."""

    def __init__(self, model: str, job: Job, include_usage: bool) -> None:
        self.model = model
        self.job = job
        self.include_usage = include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        u = self.job.usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": u.prompt_tokens + completion_tokens,
            "image_tokens": u.image_tokens,
            "slices": u.slices,
            "vit_patches": u.vit_patches,
        }

    def completion(self, text: str, done: Done) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}
            ],
            "usage": self.usage(done.completion_tokens),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return self._event({"choices": [choice]} | ({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, done: Done) -> str:
        return self._event({"choices": [], "usage": self.usage(done.completion_tokens)})

    def _event(self, fields: dict[str, Any]) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        return f"data: {json.dumps(body | fields)}\n\n"


async def _stream(reply: _Reply, events: asyncio.Queue[Event], batcher: Batcher) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content chunks, the finish chunk, usage if asked, ``[DONE]``."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield reply.chunk({"content": event.text})
            elif isinstance(event, Done):
                yield reply.chunk({}, event.finish_reason)
                if reply.include_usage:
                    yield reply.usage_chunk(event)
                break
            else:
                error = ApiError(event.status, event.message, kind="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream: its row stops at the next step
        batcher.cancel(reply.job)


async def _collect(
    reply: _Reply, events: asyncio.Queue[Event], batcher: Batcher, request: Request
) -> Response:
    """Wait for the whole answer, cancelling the job if the client disconnects meanwhile."""
    parts: list[str] = []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                batcher.cancel(reply.job)
                return Response(status_code=_CLIENT_CLOSED)
            continue
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Done):
            return JSONResponse(reply.completion("".join(parts), event))
        elif isinstance(event, Failed):
            raise ApiError(event.status, event.message, kind="server_error")


def _plan(engine: Engine, data: bytes) -> dict[str, Any]:
    """The slice plan of an image (the request body's bytes), as the model will use it."""
    limits = engine.limits
    if not data or sniff_format(data) is None:
        raise bad_request("the body must be a PNG, JPEG, WebP or GIF image", None, "invalid_image")
    if len(data) > limits.max_image_bytes:
        raise over_limit("the image size in bytes", len(data), limits.max_image_bytes, "--max-image-mb", None)
    processor = engine.processor
    try:
        width, height = probe_image_size(data, max_pixels=limits.max_image_pixels)
        plan = processor.plan_images([(width, height)])[0]
    except LlavaUHDError as exc:
        raise bad_request(f"the image cannot be used: {exc}", None, "invalid_image") from None
    grid = None if plan.grid is None else {"rows": plan.grid.rows, "cols": plan.grid.cols}
    return {
        "width": width,
        "height": height,
        "grid": grid,
        "slice_size": None if plan.slice_size is None else list(plan.slice_size),
        "overview_size": list(plan.overview),
        "slices": plan.num_slices,
        "pieces": [{"width": s.width, "height": s.height} for s in plan.pieces],
        "image_tokens": visual_token_count(plan, processor.num_queries, processor.separator_lengths),
        "tokens_per_piece": processor.num_queries,
        "vit_patches": plan.vit_patches,
    }
