"""Build a LLaVA-UHD model from what users download: a CLIP vision folder and an LLM folder.

The vision tower is loaded by its key map (:func:`llava_uhd.model.weights.load_clip_vision`, strict),
the language model with ``AutoModelForCausalLM.from_pretrained`` (local files only), and the resampler
starts fresh (paper section 3.2: it is what stage 1 trains). The preset supplies the slicing, resampler
and template; the vision and text sections are replaced by what the folders contain, so the saved config
describes the model that was actually built.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llava_uhd.config import Preset, TextConfig
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.configuration import LlavaUHDConfig
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.model.weights import load_clip_vision, vision_config_from_hf

logger = logging.getLogger(__name__)


def build_from_pretrained_parts(
    clip_vision_folder: str | Path,
    llm_folder: str | Path,
    preset: Preset,
    *,
    image_token_id: int | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LlavaUHDForConditionalGeneration:
    """A model with pretrained ViT and LLM weights and a freshly initialised resampler.

    Args:
        clip_vision_folder: a transformers CLIP (or SigLIP) folder: config.json + weights.
        llm_folder: a transformers causal-LM folder.
        preset: slicing, resampler, template and the ViT feature layer; its ``vision`` and ``text``
            sections are replaced by the folders' configs.
        image_token_id: the ``<image>`` token id (``LlavaUHDProcessor.image_token_id``).
        dtype: cast the whole model to this dtype (e.g. ``torch.bfloat16``) after loading.
        attn_implementation: passed to the LM's ``from_pretrained`` ("sdpa", "flash_attention_2", ...).
    """
    clip_folder, lm_folder = Path(clip_vision_folder), Path(llm_folder)
    for folder, what in ((clip_folder, "CLIP vision"), (lm_folder, "language model")):
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face {what} folder)")

    vision = vision_config_from_hf(AutoConfig.from_pretrained(str(clip_folder)), preset.vision.feature_layer)
    if vision.patch_size != preset.slicing.patch_size:
        raise ConfigError(
            f"{clip_folder}: patch size {vision.patch_size} differs from the preset's slicing patch size "
            f"{preset.slicing.patch_size}"
        )
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    language_model = AutoModelForCausalLM.from_pretrained(
        str(lm_folder), local_files_only=True, dtype=dtype, **extra
    )
    built = replace(preset, vision=vision, text=TextConfig(name_or_path=str(lm_folder)))
    config = LlavaUHDConfig.from_preset(
        built, text_config=language_model.config, image_token_id=image_token_id
    )
    model = LlavaUHDForConditionalGeneration(config, language_model=language_model)
    report = load_clip_vision(model.vision_tower, clip_folder)  # strict: raises naming missing keys
    logger.info("vision tower from %s: %s", clip_folder, report.summary())
    if dtype is not None:
        model = model.to(dtype)
    return model
