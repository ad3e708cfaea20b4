"""Quantized loading: the language model in 8 or 4 bits, the vision tower and resampler in full precision.

Transformers quantizes every linear layer it is not told to skip. Almost all of LLaVA-UHD's weights are
the LLM's, and the ViT and resampler are small and see every patch, so by default they stay unquantized
(with the LM head): :func:`keep_full_precision` adds them to the skip list of a ``quantization_config`` that names none
(``modules_to_not_convert`` for torchao, ``llm_int8_skip_modules`` for bitsandbytes). A config that
names its own list, even an empty one, is used as given. :func:`quantization_config` builds the configs
docs/transformers.md describes.
"""

from __future__ import annotations

from typing import Any, Literal

# Module names kept in full precision unless the config names its own: the vision side, and the LM head
# (what transformers itself leaves unquantized by default).
VISION_MODULES = ("vision_tower", "resampler")
FULL_PRECISION_MODULES = (*VISION_MODULES, "lm_head")
# The skip-list field of each quantization method's config.
_SKIP_FIELDS = {"torchao": "modules_to_not_convert", "bitsandbytes": "llm_int8_skip_modules"}

QuantizationMethod = Literal["int8", "bnb-8bit", "bnb-4bit"]
QUANTIZATION_METHODS: tuple[str, ...] = ("int8", "bnb-8bit", "bnb-4bit")


def keep_full_precision(config: Any) -> Any:
    """``config`` (a transformers quantization config or its dict) with the vision tower and resampler
    added to its skip list when it names none; other methods are returned as they are."""
    if config is None:
        return None
    read = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    method = read("quant_method", "")
    method = str(getattr(method, "value", method))  # an enum of str values in the config objects
    field = _SKIP_FIELDS.get(method)
    if field is None or read(field) is not None:
        return config
    if isinstance(config, dict):
        return {**config, field: list(FULL_PRECISION_MODULES)}
    setattr(config, field, list(FULL_PRECISION_MODULES))
    return config


def quantization_config(method: QuantizationMethod, *, quantize_vision: bool = False) -> Any:
    """A transformers quantization config for ``method``.

    ``int8``: torchao int8 weight-only (CPU or GPU; ``pip install llava-uhd[quant]``). ``bnb-8bit`` and
    ``bnb-4bit``: bitsandbytes LLM.int8 and NF4 (CUDA; bitsandbytes installed). ``quantize_vision``
    quantizes the vision tower and resampler too.

    Raises:
        ConfigError: an unknown method, or the package it needs is missing.
    """
    from llava_uhd.errors import ConfigError

    skip = [m for m in FULL_PRECISION_MODULES if not (quantize_vision and m in VISION_MODULES)]
    if method == "int8":
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError:
            raise ConfigError("int8 quantization needs torchao (pip install 'llava-uhd[quant]')") from None
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    if method in ("bnb-8bit", "bnb-4bit"):
        from transformers import BitsAndBytesConfig

        if method == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
    raise ConfigError(f"quantization method must be one of {QUANTIZATION_METHODS}, got {method!r}")


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds, counting the inner tensors of a quantized tensor subclass (torchao's int8
    data and scales), which ``numel() * element_size()`` would count at the outer float dtype."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (a tied parameter once), quantized ones at their size."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values())
