"""Load or save a LLaVA-UHD model and its processor together, and register both with the Auto classes.

This module sits above :mod:`llava_uhd.model` and :mod:`llava_uhd.processing` (the model never imports
the processor). Importing it registers the model with ``AutoConfig``/``AutoModelForImageTextToText`` and
the processor with ``AutoProcessor``, so ``AutoProcessor.from_pretrained(folder)`` works on a folder
written by :func:`save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.configuration import LlavaUHDConfig
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.processing import PRESET_FILE, LlavaUHDProcessor

# Loading options AutoProcessor adds for hub downloads; a saved processor folder is local and needs none.
HUB_LOADING_OPTIONS = frozenset(
    {
        "_from_auto",
        "_commit_hash",
        "revision",
        "cache_dir",
        "token",
        "local_files_only",
        "trust_remote_code",
        "subfolder",
        "force_download",
        "proxies",
    }
)


class _ProcessorLoader:
    """What ``AutoProcessor.from_pretrained`` calls: the processor's own loader minus the hub options."""

    @staticmethod
    def from_pretrained(folder: str | Path, **options: Any) -> LlavaUHDProcessor:
        kept = {key: value for key, value in options.items() if key not in HUB_LOADING_OPTIONS}
        return LlavaUHDProcessor.from_pretrained(folder, **kept)


AutoProcessor.register(LlavaUHDConfig, _ProcessorLoader, exist_ok=True)


def save_pretrained(
    folder: str | Path, model: LlavaUHDForConditionalGeneration, processor: LlavaUHDProcessor
) -> None:
    """Write the model (config.json + safetensors) and the processor (tokenizer + preset) side by side."""
    check_compatible(model, processor)
    model.save_pretrained(str(folder))
    processor.save_pretrained(folder)


def load_pretrained(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **processor_options: Any,
) -> tuple[LlavaUHDForConditionalGeneration, LlavaUHDProcessor]:
    """The model (in eval mode) and processor of a saved or converted folder, checked to fit each other.

    The one loader of the package: ``llava-uhd ask`` and the inference helpers use it too. The processor
    is the saved one when the folder has it; otherwise it is rebuilt from the folder's tokenizer and the
    preset stored in the model config. ``processor_options`` (e.g. ``padding_side``) override the saved
    options.

    Raises:
        CheckpointError: the folder does not exist or holds no LLaVA-UHD model.
        ConfigError: the processor does not write the placeholders and pieces the model expects.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; not a saved LLaVA-UHD model")
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    if not isinstance(model, LlavaUHDForConditionalGeneration):
        raise CheckpointError(f"{folder}: holds a {type(model).__name__}, not a LLaVA-UHD model")
    if device is not None:
        model = model.to(device)
    if (folder / PRESET_FILE).is_file():
        processor = LlavaUHDProcessor.from_pretrained(folder, **processor_options)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        processor = LlavaUHDProcessor(tokenizer, model.config.to_preset(), **processor_options)
    check_compatible(model, processor)
    return model.eval(), processor


def check_compatible(model: LlavaUHDForConditionalGeneration, processor: LlavaUHDProcessor) -> None:
    """The processor must write the placeholders and pieces the model expects."""
    config = model.config
    if config.image_token_id != processor.image_token_id:
        raise ConfigError(
            f"model image_token_id {config.image_token_id} differs from the processor's {processor.image_token_id}"
        )
    preset = config.to_preset()
    if processor.num_queries != model.num_queries:
        raise ConfigError(
            f"processor writes {processor.num_queries} tokens per piece, the model makes {model.num_queries}"
        )
    if processor.slicing.patch_size != preset.vision.patch_size:
        raise ConfigError(
            f"processor patch size {processor.slicing.patch_size} differs from the ViT's {preset.vision.patch_size}"
        )
