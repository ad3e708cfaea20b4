"""Load a model folder and put together the parts of one server (engine, cache, batcher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_uhd.auto import load_pretrained
from llava_uhd.bundled import model_dir
from llava_uhd.errors import ConfigError
from llava_uhd.inference.generate import GenerationOptions
from llava_uhd.inference.image_cache import ImageFeatureCache
from llava_uhd.serve.batcher import Batcher
from llava_uhd.serve.engine import Defaults, Engine
from llava_uhd.serve.limits import ServerLimits
from llava_uhd.serve.metrics import Metrics


def build_server(
    model: str | Path | None = None,
    *,
    limits: ServerLimits | None = None,
    device: Any = None,
    dtype: Any = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    max_batch: int = 16,
    batch_window_s: float = 0.01,
    image_cache_mib: float = 512.0,
    allow_remote_images: bool = False,
) -> tuple[Engine, Batcher]:
    """The engine and the running batcher of a server for ``model`` (a folder; None: the bundled model)."""
    limits = limits or ServerLimits()
    # the decoding defaults, checked as every request's settings are
    GenerationOptions(
        max_new_tokens=max_new_tokens, num_beams=num_beams, temperature=temperature, top_p=top_p
    )
    if num_beams > limits.max_beams:
        raise ConfigError(f"--num-beams {num_beams} is over --max-beams {limits.max_beams}")
    folder = model_dir(model)
    loaded, processor = load_pretrained(folder, device=device, dtype=dtype)
    loaded.eval()
    engine = Engine(
        loaded,
        processor,
        limits=limits,
        cache=ImageFeatureCache(image_cache_mib),
        metrics=Metrics(),
        defaults=Defaults(
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, num_beams=num_beams
        ),
        allow_remote_images=allow_remote_images,
        name=folder.resolve().name,
    )
    batcher = Batcher(
        engine.run_batch, max_batch=max_batch, window_s=batch_window_s, max_queue=limits.max_queue
    )
    return engine, batcher
