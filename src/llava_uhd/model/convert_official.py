"""Read the released LLaVA-UHD checkpoint (``llava-uhd-144-13b``) into our model.

The released folder is LLaVA's layout: a ``config.json`` of a ``LlavaLlamaForCausalLM`` (the LLaMA's own
fields plus ``mm_*`` fields), the tokenizer files, and weights as safetensors or ``pytorch_model*.bin``
(single or sharded). Its tensors are named

    model.embed_tokens / model.layers.* / model.norm / lm_head     the LLaMA, as LlamaForCausalLM names it
    model.vision_tower.vision_tower.vision_model.*                 the CLIP tower, as CLIPVisionModel names it
    model.mm_projector.*                                           the windowed resampler (our names, as is)

:func:`released_key_map` spells out the full source -> destination map from our model's own parameter
names, so every tensor is accounted for: mapped, ignored on purpose (CLIP's ``post_layernorm``, which acts
on the last layer that LLaVA-UHD never reads; saved buffers such as ``position_ids`` and ``inv_freq``),
unexpected, or missing. :func:`convert_released` builds the model on the meta device and assigns the
source tensors to it, so a 13B checkpoint is held in memory once, in its own dtype.

This module knows nothing of tokenizers or processors (the model never imports them); the ``convert``
command writes those beside the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llava_uhd.config import OFFICIAL_V1, Preset, TextConfig, VisionConfig
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.weights import (
    KeyMap,
    LoadReport,
    clip_vision_key_map,
    read_state_dict,
    vision_config_from_hf,
)

# Where the released checkpoint keeps each part (LLaVA's LlavaMetaModel attributes).
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
RESAMPLER_PREFIX = "model.mm_projector."
# The released projector type of the spatially constrained resampler (its builder's name for it).
RELEASED_PROJECTOR = "adapt_spatial_resampler"
# LLaVA model types whose language model is a LLaMA (LlavaLlamaForCausalLM).
LLAMA_MODEL_TYPES = ("llava", "llava_llama", "llama")
# CLIP ViTs use 64 channels per attention head (B/16, L/14, L/14-336); the released config does not say.
CLIP_HEAD_DIM = 64
# Source tensors that carry no learned weight we use: CLIP's final LayerNorm (after the last layer; we read
# layer -2), CLIP's saved position_ids buffer, LLaMA's saved rotary inv_freq buffers.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
IGNORED_PREFIXES = (f"{VISION_PREFIX}post_layernorm.", f"{VISION_PREFIX}embeddings.position_ids")
# config.json fields of LlavaLlama that describe LLaVA, not the LLaMA: left out of the text config.
_NOT_TEXT_FIELDS = (
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
)


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released checkpoint folder, read: its config.json and every tensor by its released name."""

    folder: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


def read_released(folder: str | Path) -> ReleasedCheckpoint:
    """Read ``config.json`` and the weights (safetensors or .bin, single or sharded) of a released folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a LLaVA-style checkpoint folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from None
    return ReleasedCheckpoint(folder, config, read_state_dict(folder))


def text_config_dict(released: Mapping[str, Any]) -> dict[str, Any]:
    """The LLaMA's config (an inline ``TextConfig`` dict) from a LlavaLlama ``config.json``."""
    from transformers import LlamaConfig

    model_type = released.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ConfigError(
            f"released config model_type {model_type!r} is not a LLaVA-LLaMA; expected one of {LLAMA_MODEL_TYPES}"
        )
    known = set(LlamaConfig().to_dict()) | {"rope_scaling", "rope_theta"}
    fields = {k: v for k, v in released.items() if k in known and k not in _NOT_TEXT_FIELDS}
    return {"model_type": "llama", **fields}


def vision_config(
    released: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    vision_tower: str | Path | None = None,
) -> VisionConfig:
    """The CLIP tower's shape: from ``vision_tower`` (a local CLIP folder), else ``mm_vision_tower`` when
    that is a local folder, else from the weights.

    The weights give every size but the head count, which is the CLIP convention (64 channels a head:
    16 heads for the released ViT-L/14-336); activation and LayerNorm epsilon are CLIP's defaults.
    """
    feature_layer = int(released.get("mm_vision_select_layer", -2))
    if vision_tower is not None and not (Path(vision_tower) / "config.json").is_file():
        raise CheckpointError(f"{vision_tower}: no config.json; --vision-tower wants a CLIP vision folder")
    tower = vision_tower if vision_tower is not None else released.get("mm_vision_tower")
    if isinstance(tower, str | Path) and (Path(tower) / "config.json").is_file():
        from transformers import AutoConfig

        return vision_config_from_hf(AutoConfig.from_pretrained(tower), feature_layer)
    patch_key = f"{VISION_PREFIX}embeddings.patch_embedding.weight"
    if patch_key not in state_dict:
        raise CheckpointError(f"the checkpoint has no vision tower: {patch_key!r} is missing")
    hidden, channels, patch, _ = state_dict[patch_key].shape
    positions = state_dict[f"{VISION_PREFIX}embeddings.position_embedding.weight"].shape[0] - 1  # minus CLS
    side = math.isqrt(positions)
    layers = {
        int(k[len(VISION_PREFIX) :].split(".")[2])
        for k in state_dict
        if k.startswith(f"{VISION_PREFIX}encoder.layers.")
    }
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=state_dict[f"{VISION_PREFIX}encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=len(layers),
        num_heads=max(hidden // CLIP_HEAD_DIM, 1),
        image_size=side * patch,
        patch_size=patch,
        num_channels=channels,
        feature_layer=feature_layer,
    )


def official_preset(checkpoint: ReleasedCheckpoint, vision_tower: str | Path | None = None) -> Preset:
    """The ``official-v1`` preset with this checkpoint's vision tower and LLaMA shapes filled in.

    ``vision_tower``: a local CLIP vision folder whose config.json gives the tower's exact shape (its head
    count cannot be read off the weights); see :func:`vision_config`.
    """
    released = checkpoint.config
    projector = released.get("mm_projector_type")
    if projector != RELEASED_PROJECTOR:
        raise ConfigError(
            f"{checkpoint.folder}: mm_projector_type is {projector!r}; the official-v1 converter reads "
            f"{RELEASED_PROJECTOR!r} (the 144-query spatially constrained resampler)"
        )
    select = released.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise ConfigError(
            f"{checkpoint.folder}: mm_vision_select_feature {select!r} is not supported (want 'patch')"
        )
    vision = vision_config(released, checkpoint.state_dict, vision_tower)
    if "mm_hidden_size" in released and released["mm_hidden_size"] != vision.hidden_size:
        raise ConfigError(
            f"{checkpoint.folder}: mm_hidden_size {released['mm_hidden_size']} != vision tower width {vision.hidden_size}"
        )
    slicing = replace(OFFICIAL_V1.slicing, patch_size=vision.patch_size, scale_resolution=vision.image_size)
    return replace(
        OFFICIAL_V1, vision=vision, slicing=slicing, text=TextConfig(config=text_config_dict(released))
    )


def released_key_map(model: torch.nn.Module) -> KeyMap:
    """Released tensor name -> our parameter name, for every parameter of ``model``.

    ``model`` is a :class:`~llava_uhd.model.llava_uhd.LlavaUHDForConditionalGeneration` (on any device,
    the meta device included): its ``vision_tower``, ``resampler`` and ``language_model``.
    """
    key_map: KeyMap = {
        source: f"vision_tower.{ours}"
        for source, ours in clip_vision_key_map(model.vision_tower.config, VISION_PREFIX).items()
    }
    for name in model.resampler.state_dict():
        key_map[f"{RESAMPLER_PREFIX}{name}"] = f"resampler.{name}"
    for name in model.language_model.state_dict():
        key_map[name] = (
            f"language_model.{name}"  # LlavaLlama names the LLaMA exactly as LlamaForCausalLM does
        )
    return key_map


def _ignored(key: str) -> bool:
    return key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def map_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, allow_unexpected: bool = False
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename released tensors to our names and check them against ``model``'s parameters.

    Raises:
        CheckpointError: a parameter no tensor fills (always), a tensor of the wrong shape (always), or a
            tensor the map does not know (unless ``allow_unexpected``), naming every such key.
    """
    key_map = released_key_map(model)
    targets = model.state_dict()
    report = LoadReport.classify(state_dict, key_map, targets, _ignored)
    mapped = report.mapped
    if report.missing or (report.unexpected and not allow_unexpected):
        raise CheckpointError(
            f"the released checkpoint does not fit the official-v1 model ({report.summary()}): "
            f"missing {list(report.missing)}; unexpected {list(report.unexpected)}"
            + ("" if report.missing else " (pass --allow-unexpected to skip unexpected tensors)")
        )
    wrong = [
        f"{source} {tuple(state_dict[source].shape)} -> {ours} {tuple(targets[ours].shape)}"
        for source, ours in mapped.items()
        if tuple(state_dict[source].shape) != tuple(targets[ours].shape)
    ]
    if wrong:
        raise CheckpointError(f"tensors of the wrong shape: {wrong}")
    return {ours: state_dict[source] for source, ours in mapped.items()}, report


def convert_released(
    source: ReleasedCheckpoint | str | Path,
    destination: str | Path,
    *,
    image_token_id: int | None = None,
    allow_unexpected: bool = False,
    max_shard_size: str | int = "5GB",
    vision_tower: str | Path | None = None,
) -> tuple[Preset, LoadReport]:
    """Convert a released checkpoint (a folder, or one :func:`read_released` read) into our ``save_pretrained`` weights and config at ``destination``.

    The model is built on the meta device and the released tensors are assigned to it (no random init,
    no second copy, each tensor in its released dtype), then saved. Buffers that checkpoints never store
    (LLaMA's rotary tables) stay unmaterialised in that vehicle: it is only saved, never run; loading the
    folder with ``from_pretrained`` builds them. ``image_token_id`` is the ``<image>`` token the
    processor added to the tokenizer. ``vision_tower`` as in :func:`official_preset`. Nothing is written
    unless every check passes.
    """
    from llava_uhd.model.configuration import LlavaUHDConfig
    from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration

    checkpoint = source if isinstance(source, ReleasedCheckpoint) else read_released(source)
    preset = official_preset(checkpoint, vision_tower)
    config = LlavaUHDConfig.from_preset(preset, image_token_id=image_token_id)
    with torch.device("meta"):
        model = LlavaUHDForConditionalGeneration(config)
    state, report = map_state_dict(model, checkpoint.state_dict, allow_unexpected=allow_unexpected)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(str(destination), max_shard_size=max_shard_size)
    return preset, report
