"""Serve a saved model over HTTP with the OpenAI chat-completions API and a web page.

``llava-uhd serve [--model DIR] [--host 127.0.0.1] [--port 8000]`` loads DIR (without ``--model``, the
bundled synthdoc model) and answers ``POST /v1/chat/completions`` (text and base64 data-URL images,
streaming), ``GET /v1/models``, ``/health``, ``/metrics`` and the page at ``/``. Concurrent requests are
batched; repeated images are encoded once (the image-feature cache). Every limit below has a default safe
for a public port. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from llava_uhd.commands._common import add_model_arguments, torch_device, torch_dtype
from llava_uhd.errors import ConfigError

HELP = "serve a model over an OpenAI-compatible HTTP API with a web page"
API_KEY_ENV = "LLAVA_UHD_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000; 0 picks a free one)")
    parser.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})"
    )
    decoding = parser.add_argument_group("decoding defaults (a request's own values win)")
    decoding.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="tokens to generate when a request gives no max_tokens (256)",
    )
    decoding.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    decoding.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    decoding.add_argument("--seed", type=int, default=None, help="sampling seed when a request gives none")
    decoding.add_argument(
        "--num-beams",
        "--beams",
        type=int,
        default=1,
        help="beam search width when a request gives no num_beams (1: greedy or sampling)",
    )
    batching = parser.add_argument_group("batching and cache")
    batching.add_argument(
        "--max-batch", type=int, default=16, help="most requests in one model batch (16; 1: no batching)"
    )
    batching.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="how long the first request waits for others (10 ms)",
    )
    batching.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for the model before 503 (64)"
    )
    batching.add_argument(
        "--image-cache-mib", type=float, default=512.0, help="image-feature cache size in MiB (512; 0: off)"
    )
    limits = parser.add_argument_group("limits per request")
    limits.add_argument("--max-body-mb", type=float, default=20.0, help="request body size in MB (20)")
    limits.add_argument(
        "--max-image-mb", type=float, default=10.0, help="one image's encoded size in MB (10)"
    )
    limits.add_argument(
        "--max-image-pixels", type=int, default=40_000_000, help="one image's width x height (40,000,000)"
    )
    limits.add_argument("--max-images", type=int, default=8, help="images per request (8)")
    limits.add_argument(
        "--max-visual-tokens", type=int, default=4096, help="LLM tokens of all images of a request (4096)"
    )
    limits.add_argument(
        "--max-prompt-tokens", type=int, default=4096, help="prompt length in tokens, images included (4096)"
    )
    limits.add_argument(
        "--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask (1024)"
    )
    limits.add_argument("--max-beams", type=int, default=8, help="the widest num_beams a request may ask (8)")
    limits.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public addresses only)"
    )
    limits.add_argument(
        "--remote-timeout", type=float, default=10.0, help="seconds one remote image may take (10)"
    )


def server_limits(args: argparse.Namespace):  # -> ServerLimits (imported lazily with the server)
    """The limit flags as :class:`~llava_uhd.serve.limits.ServerLimits`."""
    from llava_uhd.serve.limits import MB, ServerLimits

    return ServerLimits(
        max_body_bytes=int(args.max_body_mb * MB),
        max_image_bytes=int(args.max_image_mb * MB),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_visual_tokens=args.max_visual_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        max_beams=args.max_beams,
        max_queue=args.max_queue,
        remote_timeout_s=args.remote_timeout,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from llava_uhd.serve.app import create_app
    except ImportError as exc:
        raise ConfigError(
            f"llava-uhd serve needs the 'serve' extra: pip install 'llava-uhd[serve]' ({exc})"
        ) from None
    from llava_uhd.serve.build import build_server

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    limits = server_limits(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    device = torch_device(args.device)
    engine, batcher = build_server(
        args.model,
        limits=limits,
        device=device,
        dtype=torch_dtype(args.dtype, device),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        num_beams=args.num_beams,
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000,
        image_cache_mib=args.image_cache_mib,
        allow_remote_images=args.allow_remote_images,
    )
    app = create_app(engine, batcher, api_key=api_key)
    print(f"llava-uhd serve: {engine.name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        batcher.close()
    return 0
