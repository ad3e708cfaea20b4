"""The LLaVA-UHD model: vision encoder, resampler, language-model glue and weight loading.

Names are exported lazily: ``llava_uhd.model.flops`` must stay importable without torch (``llava-uhd
plan --flops``), and importing a submodule runs this file first. Touching any exported name, e.g.
``from llava_uhd.model import LlavaUHDForConditionalGeneration``, imports :mod:`.llava_uhd`, which
registers the model with transformers' Auto classes; :func:`register` does the same explicitly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LlavaUHDConfig": "llava_uhd.model.configuration",
    "LlavaUHDForConditionalGeneration": "llava_uhd.model.llava_uhd",
    "PerceiverResampler": "llava_uhd.model.resampler",
    "build_resampler": "llava_uhd.model.resamplers",
    "VisionTransformer": "llava_uhd.model.vision",
    "build_from_pretrained_parts": "llava_uhd.model.build",
}

__all__ = [*_EXPORTS, "register"]


def register() -> None:
    """Register LLaVA-UHD with ``AutoConfig``, ``AutoModelForImageTextToText`` and ``AutoModelForCausalLM``."""
    importlib.import_module("llava_uhd.model.llava_uhd")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        register()  # any public model name makes saved folders loadable through the Auto classes
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llava_uhd.model' has no attribute {name!r}")
