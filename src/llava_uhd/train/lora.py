"""LoRA on the language model (peft), and folding the trained adapters into plain weights from a state dict.

LoRA (Hu et al., 2021, section 4.1) keeps a frozen weight W0 and trains a low-rank update: ``h = W0 x +
s * B (A x)`` with ``s = alpha / r``. A run ends with the update folded in, ``W = W0 + s * (B @ A)``, so the
final folder is a plain LlavaUHD model that loads without peft.

The fold works on a *state dict* rather than on the module: on FSDP and ZeRO-3 no process holds the whole
model in its module, so the engine gathers full tensors on rank 0 (one unit or parameter at a time) and
:func:`merge_lora_state` folds and renames those. Every backend saves through this one function; its
arithmetic is peft's own merge (``W + (B @ A) * s`` in the weight's float32), so it gives bitwise what
``merge_and_unload`` gives. :class:`LoraLayout` records, before any engine wraps the model, where peft put
the adapters and with what scaling, since that is module metadata the gathered tensors do not carry.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.train.config import LoraConfig
from llava_uhd.train.stages import LANGUAGE

BASE_LAYER = "base_layer"  # peft keeps the wrapped linear under this child name
ADAPTER_WEIGHTS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class Adapter:
    """One peft LoRA linear: its module path in the wrapped model, its adapter key and scaling ``s``.

    ``fan_in_fan_out`` is peft's flag for base weights stored (in, out) (GPT-2's Conv1D), where the
    update is transposed.
    """

    path: str
    key: str
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class LoraLayout:
    """Where peft put the adapters in the composed model, which is all a merge from a state dict needs.

    Attributes:
        wrapped_prefix: the original language model's path under peft, e.g.
            ``language_model.base_model.model.``; the plain model names it ``plain_prefix``.
        plain_prefix: ``language_model.``.
        adapters: every LoRA linear, in module order.
    """

    wrapped_prefix: str
    plain_prefix: str
    adapters: tuple[Adapter, ...]

    def plain_name(self, name: str) -> str:
        """A wrapped model's state-dict key as the plain model names it (peft's prefix dropped)."""
        if name.startswith(self.wrapped_prefix):
            return self.plain_prefix + name[len(self.wrapped_prefix) :]
        return name


def add_lora(model: nn.Module, lora: LoraConfig) -> LoraLayout:
    """Wrap the language model with peft LoRA adapters (Linear layers only); return where they sit."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    setattr(model, LANGUAGE, get_peft_model(getattr(model, LANGUAGE), peft_config))
    layout = lora_layout(model)
    assert layout is not None
    return layout


def lora_layout(model: nn.Module) -> LoraLayout | None:
    """The adapters of a model whose language model carries peft LoRA, or None when it does not.

    Call it on the unwrapped model before an engine wraps it (FSDP renames modules). Raises
    :class:`ConfigError` for an adapter on anything but a Linear layer (an embedding, a convolution):
    those fold differently, and no run here needs them.
    """
    if not _peft_imported():
        return None
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    language = getattr(model, LANGUAGE, None)
    if not isinstance(language, PeftModel):
        return None
    base = language.get_base_model()
    wrapped = next(name for name, module in model.named_modules() if module is base)
    adapters = []
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise ConfigError(
                f"lora.target_modules: {path} is a {type(module).__name__}; only Linear layers are supported "
                "(their adapters fold into the saved weights on every backend)"
            )
        keys = list(module.lora_A)
        if len(keys) != 1:
            raise ConfigError(f"{path} carries {len(keys)} LoRA adapters {keys}; one is supported")
        key = keys[0]
        adapters.append(Adapter(path, key, float(module.scaling[key]), bool(module.fan_in_fan_out)))
    return LoraLayout(f"{wrapped}.", f"{LANGUAGE}.", tuple(adapters))


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """The ``lora_A`` / ``lora_B`` linears of every LoRA layer (none without LoRA), for FSDP's wrap policy."""
    if not _peft_imported():
        return []
    from peft.tuners.lora import LoraLayer

    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in ADAPTER_WEIGHTS:
                found.extend(getattr(module, name).values())
    return found


def _peft_imported() -> bool:
    # peft is an optional dependency; a model can only carry its layers once something imported it
    return "peft" in sys.modules


def merge_lora_state(state: Mapping[str, torch.Tensor], layout: LoraLayout) -> dict[str, torch.Tensor]:
    """Fold every adapter of a full (gathered) state dict into its base weight; plain LlavaUHD names out.

    ``W = W0 + (B @ A) * s`` (transposed for ``fan_in_fan_out``), computed in float32 and cast back to
    W0's dtype: for float32 weights exactly peft's merge. Raises :class:`CheckpointError` when an adapter
    tensor is missing or a LoRA layer holds a tensor this fold does not know (DoRA, a LoRA bias).
    """
    merged = {layout.plain_name(k): v for k, v in state.items() if not _in_adapter(k, layout)}
    for adapter in layout.adapters:
        prefix = f"{adapter.path}."
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        lora = {name: f"{name}.{adapter.key}.weight" for name in ADAPTER_WEIGHTS}
        base = {k: v for k, v in inner.items() if k.startswith(f"{BASE_LAYER}.")}
        unknown = sorted(set(inner) - set(base) - set(lora.values()))
        missing = sorted(k for k in (f"{BASE_LAYER}.weight", *lora.values()) if k not in inner)
        if unknown or missing:
            raise CheckpointError(
                f"cannot fold the LoRA layer {adapter.path}: missing {missing}, unknown {unknown}"
            )
        plain = layout.plain_name(adapter.path)
        for name, tensor in base.items():
            merged[f"{plain}.{name[len(BASE_LAYER) + 1 :]}"] = tensor
        weight = base[f"{BASE_LAYER}.weight"]
        delta = inner[lora["lora_B"]].float() @ inner[lora["lora_A"]].float()  # (out, r) @ (r, in)
        if adapter.fan_in_fan_out:
            delta = delta.T
        merged[f"{plain}.weight"] = (weight.float() + delta * adapter.scaling).to(weight.dtype)
    return merged


def _in_adapter(name: str, layout: LoraLayout) -> bool:
    return any(name.startswith(f"{adapter.path}.") for adapter in layout.adapters)


def plain_model(model: nn.Module) -> nn.Module:
    """The model's class rebuilt from its config on the meta device: names and config to save, no memory."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    if getattr(model, "generation_config", None) is not None:  # saved beside the weights
        skeleton.generation_config = copy.deepcopy(model.generation_config)
    return skeleton


def check_plain_state(state: Mapping[str, torch.Tensor], skeleton: nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``state`` names exactly the plain model's tensors."""
    expected = set(skeleton.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the merged LoRA state does not fit {type(skeleton).__name__}: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
