"""Loading foreign checkpoints by explicit key maps, with a report of what was mapped, missing or left over.

A key map is a plain ``{source key: our parameter name}`` dict, written out in full rather than derived by
string substitution, so a reviewer can read which tensor lands where and a converter for another
checkpoint (e.g. the released LLaVA-UHD one) can build on a map with its own prefix. The generic parts
(:func:`read_state_dict`, :func:`load_by_key_map`, :class:`LoadReport`) know nothing about CLIP; the CLIP
and SigLIP vision maps, :func:`vision_config_from_hf` and :func:`load_clip_vision` are the first users.

Hugging Face checkpoints name the vision tower's tensors with or without a ``vision_model.`` prefix
(transformers 4 ``CLIPModel``/``CLIPVisionModel`` vs transformers 5 ``CLIPVisionModel``), and a full CLIP
checkpoint also holds the text tower; :func:`load_clip_vision` finds the prefix and reports keys outside
it as ignored.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_uhd.config import VisionConfig
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.vision import VisionTransformer

KeyMap = dict[str, str]

# The tensor every CLIP/SigLIP vision checkpoint has; its key reveals the checkpoint's prefix.
_ANCHOR_KEY = "embeddings.patch_embedding.weight"
# Source tensors a vision tower checkpoint carries that our encoder deliberately does not use: the final
# layernorm and SigLIP's pooling head act on the last layer's output, which LLaVA-UHD never reads (it takes
# layer -2); position_ids is a non-learned buffer older transformers saved.
_UNUSED_VISION_KEYS = ("post_layernorm.", "head.", "embeddings.position_ids")

_SAFETENSORS_INDEX = "model.safetensors.index.json"
# What torch.load raises on bytes that are no torch file, besides pickle.UnpicklingError (a pickle that
# weights_only refuses): a damaged zip (RuntimeError), a short file (EOFError), and whatever its
# weights-only unpickler meets in garbage (found by fuzzing).
TORCH_FILE_ERRORS = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    OverflowError,
    struct.error,
)
_TORCH_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class LoadReport:
    """What a key-mapped load did.

    Attributes:
        mapped: source key -> our parameter name, for every tensor copied.
        missing: our parameters no source tensor filled.
        unexpected: source keys under the mapped prefix that the map does not know (and were not ignored).
        ignored: source keys skipped on purpose (other towers, unused heads, buffers).
    """

    mapped: dict[str, str]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        return (
            f"{len(self.mapped)} mapped, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.ignored)} ignored"
        )

    @classmethod
    def classify(
        cls,
        source_keys: Iterable[str],
        key_map: Mapping[str, str],
        targets: Iterable[str],
        is_ignored: Callable[[str], bool],
    ) -> LoadReport:
        """Sort source keys into mapped / ignored / unexpected and find the targets nothing fills."""
        mapped: dict[str, str] = {}
        unexpected: list[str] = []
        ignored: list[str] = []
        for key in source_keys:
            if key in key_map:
                mapped[key] = key_map[key]
            elif is_ignored(key):
                ignored.append(key)
            else:
                unexpected.append(key)
        filled = set(mapped.values())
        return cls(
            mapped=mapped,
            missing=tuple(name for name in targets if name not in filled),
            unexpected=tuple(unexpected),
            ignored=tuple(ignored),
        )


def clip_vision_key_map(config: VisionConfig, source_prefix: str = "") -> KeyMap:
    """Hugging Face ``CLIPVisionModel`` (or SigLIP vision) tensor names -> :class:`VisionTransformer` names.

    ``source_prefix`` is prepended to every source key, e.g. ``"vision_model."`` for a transformers-4 or
    full ``CLIPModel`` checkpoint. Which entries exist follows the config: the CLS token and the
    pre-layernorm only when the tower has them, the patch bias only for SigLIP-style towers.
    """
    src = source_prefix
    key_map: KeyMap = {
        f"{src}embeddings.patch_embedding.weight": "patch_embed.weight",
        f"{src}embeddings.position_embedding.weight": "pos_embed",
    }
    if config.patch_bias:
        key_map[f"{src}embeddings.patch_embedding.bias"] = "patch_embed.bias"
    if config.use_cls_token:
        key_map[f"{src}embeddings.class_embedding"] = "cls_token"
    if config.use_pre_layernorm:
        # "layrnorm" is the spelling in CLIP's checkpoints.
        key_map[f"{src}pre_layrnorm.weight"] = "pre_norm.weight"
        key_map[f"{src}pre_layrnorm.bias"] = "pre_norm.bias"
    block_parts = {
        "layer_norm1": "norm1",
        "self_attn.q_proj": "attn.q_proj",
        "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj",
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(config.num_layers):
        for theirs, ours in block_parts.items():
            for leaf in ("weight", "bias"):
                key_map[f"{src}encoder.layers.{i}.{theirs}.{leaf}"] = f"blocks.{i}.{ours}.{leaf}"
    return key_map


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or folder: safetensors (single or sharded) or torch .bin (weights only).

    Folders are searched in transformers' order: ``model.safetensors``, its shard index, then
    ``pytorch_model.bin`` and its shard index. ``.bin`` files load with ``weights_only=True`` (no pickled code).
    """
    path = Path(path)
    if path.is_file():
        return _read_file(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    for name in ("model.safetensors", _SAFETENSORS_INDEX, "pytorch_model.bin", _TORCH_INDEX):
        candidate = path / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):
            shards = _index_shards(candidate)
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(path / shard))
            return state
        return _read_file(candidate)
    raise CheckpointError(
        f"{path}: no model.safetensors, pytorch_model.bin or shard index found; files: "
        f"{sorted(p.name for p in path.iterdir())}"
    )


def _index_shards(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # not JSON, not an index
        raise CheckpointError(f"{index}: not a shard index ({type(exc).__name__}: {exc})") from None
    if not all(isinstance(shard, str) for shard in shards):
        raise CheckpointError(f"{index}: not a shard index (shard names must be strings)")
    return shards


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one file; a damaged file, or a pickle that names code, is a CheckpointError."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:  # random bytes, a truncated file, no file
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # it names a class or function, or is no pickle at all
            raise CheckpointError(
                f"{path}: refused to load, not a weights-only torch file ({_unpickling_problem(exc)})"
            ) from None
        except TORCH_FILE_ERRORS as exc:
            raise CheckpointError(
                f"{path}: cannot be read ({type(exc).__name__}: {str(exc).split('. ')[0]})"
            ) from None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        return dict(state)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r} (want .safetensors or .bin)")


def _unpickling_problem(error: pickle.UnpicklingError) -> str:
    """What torch says is wrong with a file ``weights_only`` refused, without its advice to load it with
    ``weights_only=False``, which would run whatever code the file names."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines()]
    found = [line for line in lines if line and not line.startswith(boilerplate)]
    return " ".join(found) or "it holds more than tensors and plain data"


def load_by_key_map(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    *,
    ignore: tuple[str, ...] = (),
    strict: bool = True,
    what: str = "checkpoint",
) -> LoadReport:
    """Copy ``state_dict[source]`` into ``module``'s ``key_map[source]`` for every mapped key.

    Source keys that start with any of ``ignore`` are skipped and reported as ignored; other unmapped
    source keys are unexpected. Shapes must match exactly. With ``strict`` (the default) any missing or
    unexpected key raises :class:`CheckpointError` listing them all; without it they are only reported.
    Tensors are cast to each parameter's dtype and device.
    """
    targets = dict(module.state_dict())
    unknown_targets = sorted(set(key_map.values()) - set(targets))
    if unknown_targets:
        raise CheckpointError(
            f"key map targets {unknown_targets} are not parameters of {type(module).__name__}"
        )
    report = LoadReport.classify(state_dict, key_map, targets, lambda key: key.startswith(ignore))
    mapped = report.mapped
    if strict and not report.complete:
        raise CheckpointError(
            f"{what} does not fit {type(module).__name__} ({report.summary()}): "
            f"missing {list(report.missing)}; unexpected {list(report.unexpected)}"
        )
    for source, name in mapped.items():
        tensor, target = state_dict[source], targets[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{what}: {source} has shape {tuple(tensor.shape)} but {name} needs {tuple(target.shape)}"
            )
    with torch.no_grad():
        for source, name in mapped.items():
            targets[name].copy_(state_dict[source])
    return report


def find_vision_prefix(keys: Any) -> str:
    """The prefix in front of ``embeddings.patch_embedding.weight`` (``""``, ``"vision_model."``, ...)."""
    prefixes = sorted(key[: -len(_ANCHOR_KEY)] for key in keys if key.endswith(_ANCHOR_KEY))
    if len(prefixes) != 1:
        found = "none" if not prefixes else f"several: {prefixes}"
        raise CheckpointError(
            f"cannot find one vision tower (a '...{_ANCHOR_KEY}' tensor) in the checkpoint; {found}"
        )
    return prefixes[0]


def load_clip_vision(
    model: VisionTransformer,
    state_dict_or_folder: Mapping[str, torch.Tensor] | str | Path,
    *,
    strict: bool = True,
    source_prefix: str | None = None,
) -> LoadReport:
    """Load a Hugging Face CLIP (or SigLIP) vision tower into ``model`` by :func:`clip_vision_key_map`.

    Accepts a state dict, a checkpoint file or a ``save_pretrained`` folder. ``source_prefix`` None finds
    the prefix from the keys; keys outside it (a CLIP text tower, an LLM) and the tower's unused heads are
    reported as ignored. Strict by default: a missing or unexpected key raises naming every such key.
    """
    if isinstance(state_dict_or_folder, str | Path):
        what = str(state_dict_or_folder)
        state_dict: Mapping[str, torch.Tensor] = read_state_dict(state_dict_or_folder)
    else:
        what, state_dict = "state dict", state_dict_or_folder
    prefix = find_vision_prefix(state_dict) if source_prefix is None else source_prefix
    outside = tuple(key for key in state_dict if not key.startswith(prefix))  # e.g. a text tower
    ignore = outside + tuple(prefix + key for key in _UNUSED_VISION_KEYS)
    key_map = clip_vision_key_map(model.config, source_prefix=prefix)
    return load_by_key_map(model, state_dict, key_map, ignore=ignore, strict=strict, what=what)


def vision_config_from_hf(hf_config: Any, feature_layer: int = -2) -> VisionConfig:
    """A :class:`VisionConfig` from a transformers CLIP or SigLIP (vision) config.

    CLIP: CLS token, pre-layernorm, no patch bias. SigLIP: none of those, a patch bias, its own activation
    (tanh-GELU) and layernorm epsilon. A full ``CLIPConfig``/``SiglipConfig`` is read through its
    ``vision_config``.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ("clip", "siglip"):
        hf_config, model_type = hf_config.vision_config, hf_config.vision_config.model_type
    if model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ConfigError(f"expected a CLIP or SigLIP vision config, got model_type {model_type!r}")
    clip = model_type == "clip_vision_model"
    return VisionConfig(
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        image_size=hf_config.image_size,
        patch_size=hf_config.patch_size,
        num_channels=hf_config.num_channels,
        hidden_act=hf_config.hidden_act,
        layer_norm_eps=hf_config.layer_norm_eps,
        use_cls_token=clip,
        use_pre_layernorm=clip,
        feature_layer=feature_layer,
        patch_bias=not clip,
    )


def vision_transformer_from_pretrained(
    folder: str | Path, feature_layer: int = -2, dtype: torch.dtype | None = None
) -> tuple[VisionTransformer, LoadReport]:
    """Build a :class:`VisionTransformer` from a Hugging Face CLIP/SigLIP folder (config.json + weights)."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face CLIP or SigLIP folder)")
    model = VisionTransformer(vision_config_from_hf(AutoConfig.from_pretrained(str(folder)), feature_layer))
    report = load_clip_vision(model, folder)
    if dtype is not None:
        model = model.to(dtype)
    return model, report
