"""Load or save a LLaVA-UHD model and its processor together, and register both with the Auto classes.

This module sits above :mod:`llava_uhd.model` and :mod:`llava_uhd.processing` (the model never imports
the processor). Importing it registers the model with ``AutoConfig``/``AutoModelForImageTextToText`` and
the processor with ``AutoProcessor`` and its image processor with ``AutoImageProcessor``, so
``AutoProcessor.from_pretrained(folder)`` and ``AutoImageProcessor.from_pretrained(folder)`` work on a
folder written by :func:`save_pretrained`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.image_processing import LlavaUHDImageProcessor
from llava_uhd.model.configuration import LlavaUHDConfig, check_saved_config
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.model_card import write_model_card
from llava_uhd.processing import PRESET_FILE, LlavaUHDProcessor
from llava_uhd.tokenizers import load_tokenizer_folder

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# How many offending tensor names a refusal lists per kind (the count is always given).
_NAMES_SHOWN = 3

AutoProcessor.register(LlavaUHDConfig, LlavaUHDProcessor, exist_ok=True)
# "pil": the backend whose resizing the image processor uses (transformers picks a class per backend)
AutoImageProcessor.register(
    LlavaUHDConfig, image_processor_classes={"pil": LlavaUHDImageProcessor}, exist_ok=True
)


def save_pretrained(
    folder: str | Path, model: LlavaUHDForConditionalGeneration, processor: LlavaUHDProcessor
) -> None:
    """Write the model (config.json, safetensors, generation_config.json), the processor (tokenizer, preset,
    options, chat template) and a model card (README.md, :mod:`llava_uhd.model_card`) side by side: a
    folder ``AutoModelForImageTextToText``, ``AutoProcessor`` and ``push_to_hub`` take as it is."""
    check_compatible(model, processor)
    model.save_pretrained(str(folder))
    processor.save_pretrained(folder)
    write_model_card(folder, model.config.to_preset())


def load_pretrained(
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantization_config: Any = None,
    **processor_options: Any,
) -> tuple[LlavaUHDForConditionalGeneration, LlavaUHDProcessor]:
    """The model (in eval mode) and processor of a saved or converted folder, checked to fit each other.

    The one loader of the package: ``llava-uhd ask`` and the inference helpers use it too. The processor
    is the saved one when the folder has it; otherwise it is rebuilt from the folder's tokenizer and the
    preset stored in the model config. ``processor_options`` (e.g. ``padding_side``) override the saved
    options. ``quantization_config`` (a transformers quantization config, e.g. from
    :func:`llava_uhd.model.quantization.quantization_config`) loads the language model quantized; the
    model is then placed by transformers, so ``device`` must be None.

    The folder is checked before any weight is allocated (:func:`check_model_folder`), so a damaged
    ``config.json`` is an error instead of a model built at the default size.

    Raises:
        CheckpointError: the folder does not exist, holds no LLaVA-UHD model, or its config and weights
            do not agree.
        TokenizerError: the folder's tokenizer files are missing or damaged.
        ConfigError: the processor files are damaged, or the processor does not write the placeholders
            and pieces the model expects.
    """
    folder = Path(folder)
    config = check_model_folder(folder)
    # the processor first: a missing tokenizer file is reported before the weights are read
    if (folder / PRESET_FILE).is_file():
        processor = LlavaUHDProcessor.from_pretrained(folder, **processor_options)
    else:
        processor = LlavaUHDProcessor(load_tokenizer_folder(folder), config.to_preset(), **processor_options)
    if quantization_config is not None and device is not None:
        raise ConfigError("a quantized model is placed by transformers; pass device=None")
    model = AutoModelForImageTextToText.from_pretrained(
        str(folder), config=config, dtype=dtype, quantization_config=quantization_config
    )
    if not isinstance(model, LlavaUHDForConditionalGeneration):
        raise CheckpointError(f"{folder}: holds a {type(model).__name__}, not a LLaVA-UHD model")
    if device is not None:
        model = model.to(device)
    check_compatible(model, processor)
    return model.eval(), processor


def check_model_folder(folder: Path) -> LlavaUHDConfig:
    """The config of a saved model folder, once it and the weights' shapes have been checked.

    ``config.json`` must pass :func:`~llava_uhd.model.configuration.check_saved_config`; then the model
    it describes is built on the meta device (no memory) and every tensor in the safetensors headers must
    be one of its tensors with its shape, and every one of its tensors must be there (a tied pair once).
    Nothing is read but JSON and the headers.

    Raises:
        CheckpointError: one line naming the folder and the problem.
    """
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a saved LLaVA-UHD model")
    try:
        data = json.loads(config_file.read_text())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise CheckpointError(f"{folder}: config.json is not JSON ({exc})") from None
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"holds a {type(data).__name__}, not a mapping")
        check_saved_config(data)
        _check_dtypes(data)
        config = LlavaUHDConfig.from_pretrained(str(folder))
    # ConfigError, or a value transformers refuses (a field of the wrong type, an unknown dtype name)
    except (ValueError, TypeError, AttributeError, StrictDataclassError) as exc:
        raise CheckpointError(f"{folder}: config.json {' '.join(str(exc).split())}") from None
    shapes = _weight_shapes(folder)
    _check_depth(folder, config, shapes)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, whatever sizes the config claims
            model = LlavaUHDForConditionalGeneration(config)
    # a size that is no positive integer, an activation or RoPE type no one knows, a pad id outside the
    # vocabulary (torch's Embedding asserts it)
    except (ValueError, TypeError, KeyError, ArithmeticError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder}: config.json describes no model that can be built ({type(exc).__name__}: {exc})"
        ) from None
    problem = _weights_mismatch(shapes, model)
    if problem:
        raise CheckpointError(f"{folder}: the weights do not fit config.json: {problem}")
    return config


# ``language_model.model.layers.3.mlp...``, ``vision_tower.blocks.0.attn...``: (module, layer index)
_LAYER_NAME = re.compile(r"^(language_model|vision_tower)\.(?:.+\.)?(?:layers|blocks)\.(\d+)\.")


def _check_depth(folder: Path, config: LlavaUHDConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The layer counts config.json claims against the layers the headers hold, before anything is built:
    even on the meta device a config claiming 20,000 layers takes minutes to build, only to be refused."""
    held = {"language_model": 0, "vision_tower": 0}
    for name in shapes:
        match = _LAYER_NAME.match(name)
        if match:
            held[match[1]] = max(held[match[1]], int(match[2]) + 1)
    claimed = {
        "language_model": getattr(config.text_config, "num_hidden_layers", None),
        "vision_tower": config.to_preset().vision.num_layers,
    }
    for module, layers in claimed.items():
        if held[module] and isinstance(layers, int) and layers > held[module]:
            raise CheckpointError(
                f"{folder}: the weights do not fit config.json: it gives the {module} {layers} layers, "
                f"the weights hold {held[module]}"
            )


def _check_dtypes(data: dict[str, Any]) -> None:
    """The dtypes config.json names (its own and its language model's) must be torch float dtypes:
    transformers would otherwise fail on them deep inside loading."""
    text = data.get("text_config")
    for where, section in (("", data), ("text_config.", text if isinstance(text, dict) else {})):
        for key in ("dtype", "torch_dtype"):
            value = section.get(key)
            dtype = getattr(torch, value, None) if isinstance(value, str) else None
            if value is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ConfigError(f"{where}{key} {value!r} is not a torch floating-point dtype")


def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (one file or an index of shards); no data read."""
    index = folder / WEIGHTS_INDEX
    if not index.is_file() and not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX})")
    try:
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else [WEIGHTS_FILE]
        )
        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            with safe_open(str(folder / name), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[key] = tuple(weights.get_slice(key).get_shape())
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: cannot read the weights' headers ({exc})") from None
    return shapes


def _weights_mismatch(found: dict[str, tuple[int, ...]], model: torch.nn.Module) -> str:
    """What differs between the weights' shapes and ``model``'s tensors ("" when they agree)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    aliases: dict[int, list[str]] = {}  # a tied parameter is saved under one of its names
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    parameters = {name for names in aliases.values() for name in names}
    groups = [*aliases.values(), *([name] for name in expected if name not in parameters)]  # + buffers
    wrong = [
        f"{name} {list(shape)} (config: {list(expected[name])})"
        for name, shape in found.items()
        if name in expected and expected[name] != shape
    ]
    unexpected = [name for name in found if name not in expected]
    missing = [names[0] for names in groups if not any(name in found for name in names)]
    parts = [
        f"{len(names)} {kind}: {', '.join(names[:_NAMES_SHOWN])}{', ...' if len(names) > _NAMES_SHOWN else ''}"
        for kind, names in (("of another shape", wrong), ("unexpected", unexpected), ("missing", missing))
        if names
    ]
    return "; ".join(parts)


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
