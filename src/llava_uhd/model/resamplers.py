"""Build the resampler a config names: the paper's perceiver or the released checkpoint's windowed one."""

from __future__ import annotations

from llava_uhd.config import ResamplerConfig
from llava_uhd.errors import ConfigError
from llava_uhd.model.resampler import PerceiverResampler
from llava_uhd.model.resampler_base import Resampler
from llava_uhd.model.resampler_windowed import WindowedResampler

RESAMPLERS: dict[str, type[Resampler]] = {"perceiver": PerceiverResampler, "windowed": WindowedResampler}


def build_resampler(config: ResamplerConfig, kv_dim: int, embed_dim: int) -> Resampler:
    """The resampler of ``config.kind`` from ``kv_dim``-wide ViT features to ``embed_dim``-wide LLM tokens."""
    if config.kind not in RESAMPLERS:
        raise ConfigError(f"unknown resampler kind {config.kind!r}; expected 'perceiver' or 'windowed'")
    return RESAMPLERS[config.kind](config, kv_dim, embed_dim)
