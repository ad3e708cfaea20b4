"""Build what a run trains: tokenizer + processor, the model from its source, the stage's options, the data.

Model sources (see :class:`~llava_uhd.train.config.ModelSource`): a preset with random init, a CLIP folder
plus an LLM folder, or a saved LlavaUHD folder. ``init_from`` then copies a stage-1 resampler in (paper
section 4.1: stage 2 starts from the pre-trained resampler).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_uhd.config import Preset, get_preset
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.tokenizers import BUILTIN_TOKENIZERS, builtin_tokenizer, load_tokenizer_folder
from llava_uhd.train.checkpointing import MODEL_FILE, STATE_FILE, latest_checkpoint
from llava_uhd.train.config import TrainConfig
from llava_uhd.train.lora import add_lora
from llava_uhd.train.stages import RESAMPLER, StageSpec, apply_stage

logger = logging.getLogger(__name__)


def load_tokenizer(name: str | None, source_folder: str | None) -> Any:
    """A tokenizer from a folder, a built-in name (:mod:`llava_uhd.tokenizers`), or the model source's folder."""
    name = name or source_folder
    if name is None:
        raise ConfigError("model.tokenizer is required for a preset model (a folder or 'builtin:llama-32k')")
    if name in BUILTIN_TOKENIZERS:
        return builtin_tokenizer(name)
    if not Path(name).is_dir():
        raise ConfigError(
            f"model.tokenizer {name!r} is neither a folder nor one of {sorted(BUILTIN_TOKENIZERS)}"
        )
    return load_tokenizer_folder(name)


def build_processor(config: TrainConfig) -> Any:
    """The processor (adds ``<image>`` to the tokenizer) for the model source's preset."""
    from llava_uhd.processing import LlavaUHDProcessor

    source = config.model
    if source.pretrained is not None:
        return LlavaUHDProcessor.from_pretrained(source.pretrained)
    tokenizer = load_tokenizer(source.tokenizer, source.text_path)
    return LlavaUHDProcessor(tokenizer, get_preset(source.preset))


def build_model(config: TrainConfig, processor: Any) -> nn.Module:
    """The model from its source; random init is seeded by ``config.seed`` (so a resumed run rebuilds it)."""
    from llava_uhd.auto import check_model_folder
    from llava_uhd.model import LlavaUHDConfig, LlavaUHDForConditionalGeneration
    from llava_uhd.model.build import build_from_pretrained_parts

    source = config.model
    torch.manual_seed(config.seed)
    if source.pretrained is not None:
        checked = check_model_folder(Path(source.pretrained))  # before any weight is allocated
        return LlavaUHDForConditionalGeneration.from_pretrained(source.pretrained, config=checked)
    preset: Preset = processor.preset
    if source.vision_path is not None:
        assert source.text_path is not None
        return build_from_pretrained_parts(
            source.vision_path, source.text_path, preset, image_token_id=processor.image_token_id
        )
    model_config = LlavaUHDConfig.from_preset(preset, image_token_id=processor.image_token_id)
    return LlavaUHDForConditionalGeneration(model_config)


def module_weights(path: str | Path, modules: tuple[str, ...] = (RESAMPLER,)) -> dict[str, torch.Tensor]:
    """The weights of top-level ``modules`` in a checkpoint folder, a run folder (its latest checkpoint) or
    a saved model (a stage-0 or LlavaUHD ``final/``)."""
    from llava_uhd.model.weights import read_state_dict

    p = Path(path)
    if p.is_dir() and not (p / STATE_FILE).is_file() and latest_checkpoint(p) is not None:
        p = latest_checkpoint(p)  # a run folder
    if p.is_dir() and (p / STATE_FILE).is_file():
        weights = read_state_dict(p / MODEL_FILE)
    elif p.exists():
        weights = read_state_dict(p)
    else:
        raise ConfigError(f"model.init_from {str(path)!r} does not exist")
    found = {k: v for k, v in weights.items() if k.split(".", 1)[0] in modules}
    lacking = sorted(m for m in modules if not any(k.startswith(f"{m}.") for k in found))
    if lacking:
        raise CheckpointError(f"model.init_from {str(path)!r} holds no weights of {lacking}")
    return found


def prepare_model(model: nn.Module, config: TrainConfig, stage: StageSpec) -> list[str]:
    """init_from, LoRA, gradient checkpointing, then the stage's trainable set (returned)."""
    if config.model.init_from is not None:
        modules = config.model.init_modules
        weights = module_weights(config.model.init_from, modules)
        result = model.load_state_dict(weights, strict=False)
        missing = sorted(k for k in result.missing_keys if k.split(".", 1)[0] in modules)
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"model.init_from: {list(modules)} mismatch, missing {missing}, unexpected "
                f"{sorted(result.unexpected_keys)}"
            )
        logger.info(
            "%s initialised from %s (%d tensors)", "/".join(modules), config.model.init_from, len(weights)
        )
    lora = config.lora.r > 0
    if lora:
        add_lora(model, config.lora)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return apply_stage(model, stage, train_vit=config.train_vit, lora=lora, train_llm=config.train_llm)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every ViT block and LLM decoder layer in the backward pass instead of storing activations.

    Non-reentrant: the frozen ViT's outputs do not require grad, which reentrant checkpointing mishandles
    (no gradient reaches the resampler).
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
