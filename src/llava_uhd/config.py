"""Typed presets for LLaVA-UHD (docs/design.md section 2). No torch here.

A :class:`Preset` bundles everything that decides what the model sees and how it is built: the slicing
geometry, the vision tower's shape, the resampler, the language model and the conversation template.
Presets are frozen dataclasses that round-trip through plain dicts and YAML, so the resolved preset can be
saved beside every checkpoint and run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from llava_uhd.errors import ConfigError
from llava_uhd.serialize import dump_yaml, from_plain, load_yaml_file, load_yaml_mapping, to_plain

# Pillow refuses to open images above twice its MAX_IMAGE_PIXELS (decompression bombs); we use the same bound.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# The largest plan the released code produces for ordinary images is 8 pieces of about 576 patches
# (4,608); long thin strips reach further (4000x1 -> 1,428, 1x50000 -> 5,367). 7,168 admits those and
# refuses e.g. a 1x100000 strip (7,589 patches in one overview), whose attention alone would be huge.
DEFAULT_MAX_VIT_PATCHES = 7_168

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# "uhd": the paper's variable slices plus an overview. "resize" and "anyres" are the baselines the paper
# compares against (LLaVA-1.5's single low-resolution view, LLaVA-NeXT's fixed tiles): see slicing.py.
SlicingMode = Literal["uhd", "resize", "anyres"]


@dataclass(frozen=True)
class SlicingConfig:
    """Image modularization settings (docs/design.md section 3).

    Attributes:
        scale_resolution: the ViT's pre-training side S; slices and the overview keep an area near S*S.
        patch_size: the ViT patch side P; every piece side is a multiple of it.
        max_slices: the most slices one image is cut into (6 in the paper, 7 in the released checkpoint).
        upscale_small: upscale images that need no slicing to about S*S (the released code does).
        pre_resize_long_side: if set, resize every image so its long side is exactly this many pixels
            before planning, as the released evaluation does with 1024.
        max_image_pixels: refuse decoded images (and image files) with more pixels than this.
        max_vit_patches: refuse plans whose pieces add up to more ViT patches than this.
        image_mean, image_std: per-channel normalisation after scaling pixels by 1/255.
        mode: ``uhd`` (the paper's slices and overview), ``resize`` (one S x S view, aspect not kept) or
            ``anyres`` (fixed S x S tiles of a letterboxed canvas plus an S x S base image); see
            :mod:`llava_uhd.slicing`. The baselines need S to be a multiple of P.
    """

    scale_resolution: int = 336
    patch_size: int = 14
    max_slices: int = 6
    upscale_small: bool = True
    pre_resize_long_side: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_vit_patches: int = DEFAULT_MAX_VIT_PATCHES
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    mode: SlicingMode = "uhd"

    def __post_init__(self) -> None:
        _check(
            self.mode in get_args(SlicingMode),
            f"slicing mode must be one of {get_args(SlicingMode)}, got {self.mode!r}",
        )
        _check(
            _is_int(self.patch_size) and self.patch_size >= 1,
            f"patch_size must be >= 1, got {self.patch_size!r}",
        )
        _check(
            _is_int(self.scale_resolution) and self.scale_resolution >= self.patch_size,
            f"scale_resolution must be an integer >= patch_size ({self.patch_size}), got {self.scale_resolution!r}",
        )
        _check(
            self.mode == "uhd" or self.scale_resolution % self.patch_size == 0,
            f"slicing mode {self.mode!r} cuts pieces of scale_resolution x scale_resolution, so "
            f"scale_resolution ({self.scale_resolution}) must be a multiple of patch_size ({self.patch_size})",
        )
        _check(
            _is_int(self.max_slices) and self.max_slices >= 1,
            f"max_slices must be >= 1, got {self.max_slices!r}",
        )
        _check(
            self.pre_resize_long_side is None
            or (_is_int(self.pre_resize_long_side) and self.pre_resize_long_side >= 1),
            f"pre_resize_long_side must be a positive integer or None, got {self.pre_resize_long_side!r}",
        )
        _check(
            _is_int(self.max_image_pixels) and self.max_image_pixels >= 1,
            f"max_image_pixels must be >= 1, got {self.max_image_pixels!r}",
        )
        _check(
            _is_int(self.max_vit_patches) and self.max_vit_patches >= 1,
            f"max_vit_patches must be >= 1, got {self.max_vit_patches!r}",
        )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            _check(
                isinstance(value, tuple | list)
                and len(value) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value),
                f"{name} must have 3 channels, numbers each, got {value!r}",
            )
            object.__setattr__(self, name, tuple(float(v) for v in value))
        _check(all(s > 0 for s in self.image_std), f"image_std must be positive, got {self.image_std!r}")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT in CLIP's layout (pre-norm blocks, CLS token, pre-layernorm); SigLIP-style is a config away."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336  # the side the position table was trained at: (image_size / patch_size)^2 rows
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_cls_token: bool = True
    use_pre_layernorm: bool = True
    feature_layer: int = -2  # hidden state fed to the resampler; -2 is the second-to-last layer
    patch_bias: bool = False  # CLIP's patch embedding has no bias; SigLIP's does
    # "patch": CLIP's linear patch embedding. "conv": a small convolutional stem with the same overall
    # stride (one token per patch), for towers trained from scratch (llava_uhd.model.stem).
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: tuple[int, int] = (32, 64)
    center_pieces: bool = False  # subtract each piece's mean pixel before the stem (near-white pages)

    def __post_init__(self) -> None:
        _check(self.stem in ("patch", "conv"), f"vision stem must be 'patch' or 'conv', got {self.stem!r}")
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
        _check(
            len(self.stem_channels) == 2 and all(c >= 1 for c in self.stem_channels),
            f"vision stem_channels must be two positive widths, got {self.stem_channels!r}",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}",
        )
        _check(
            self.image_size % self.patch_size == 0,
            f"vision image_size {self.image_size} not a multiple of patch_size {self.patch_size}",
        )
        # indexes hidden states as transformers does: 0 is the embeddings, -1 the last layer's output
        _check(
            -(self.num_layers + 1) <= self.feature_layer <= self.num_layers,
            f"feature_layer {self.feature_layer} out of range for {self.num_layers} layers",
        )

    @property
    def grid_side(self) -> int:
        """Side of the pre-trained square position table, in patches (24 for CLIP ViT-L/14-336)."""
        return self.image_size // self.patch_size


ResamplerKind = Literal["perceiver", "windowed"]


@dataclass(frozen=True)
class ResamplerConfig:
    """The shared compression module (docs/design.md sections 2 and 5).

    ``num_heads`` None means "LLM hidden size // 128", as the released checkpoint's code computes it.
    """

    kind: ResamplerKind = "perceiver"
    num_queries: int = 64
    num_heads: int | None = 8
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check(
            self.kind in get_args(ResamplerKind),
            f"resampler kind must be 'perceiver' or 'windowed', got {self.kind!r}",
        )
        side = math.isqrt(self.num_queries) if self.num_queries > 0 else 0
        _check(
            side * side == self.num_queries and side > 0,
            f"num_queries must be a positive square, got {self.num_queries}",
        )
        _check(
            self.num_heads is None or self.num_heads >= 1,
            f"num_heads must be >= 1 or None, got {self.num_heads}",
        )

    @property
    def grid_side(self) -> int:
        """Queries form a square grid (8x8 in the paper, 12x12 in the released checkpoint)."""
        return math.isqrt(self.num_queries)

    def resolved_heads(self, embed_dim: int) -> int:
        heads = self.num_heads if self.num_heads is not None else max(embed_dim // 128, 1)
        _check(embed_dim % heads == 0, f"resampler embed_dim {embed_dim} not divisible by {heads} heads")
        return heads


TemplateName = Literal["plain", "vicuna_v1", "chat_template"]


@dataclass(frozen=True)
class TextConfig:
    """The language model: a Hugging Face name or local folder, or an inline config for random init.

    Exactly one of ``name_or_path`` and ``config`` is normally set; ``config`` is a dict accepted by
    ``transformers.AutoConfig.for_model`` (it must contain ``model_type``).
    """

    name_or_path: str | None = None
    config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _check(
            self.name_or_path is not None or self.config is not None,
            "text model needs name_or_path or an inline config",
        )
        if self.config is not None:
            _check("model_type" in self.config, "inline text config must contain 'model_type'")
            object.__setattr__(self, "config", dict(self.config))


@dataclass(frozen=True)
class Preset:
    """Everything that defines a LLaVA-UHD variant. Round-trips through :meth:`to_dict`/:meth:`from_dict`."""

    name: str
    slicing: SlicingConfig = field(default_factory=SlicingConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(name_or_path="lmsys/vicuna-13b-v1.5"))
    template: TemplateName = "vicuna_v1"

    def __post_init__(self) -> None:
        _check(self.template in get_args(TemplateName), f"unknown template {self.template!r}")
        _check(
            self.vision.patch_size == self.slicing.patch_size,
            f"vision patch_size {self.vision.patch_size} != slicing patch_size {self.slicing.patch_size}",
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preset:
        return from_plain(cls, data, "preset")

    def to_yaml(self) -> str:
        return dump_yaml(self)

    @classmethod
    def from_yaml(cls, text: str) -> Preset:
        return cls.from_dict(load_yaml_mapping(text, "a preset YAML"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> Preset:
        """Read a preset YAML file; every error names the file."""
        p = Path(path)
        data = load_yaml_file(p, "preset")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None

    def with_overrides(self, **sections: Mapping[str, Any]) -> Preset:
        """Return a copy with some fields of some sections replaced, e.g. ``slicing={"max_slices": 4}``."""
        updates: dict[str, Any] = {}
        for section, values in sections.items():
            current = getattr(self, section, None)
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"unknown preset section {section!r}")
            updates[section] = replace(current, **dict(values))
        return replace(self, **updates)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------
# Named presets (docs/design.md section 2)

_VICUNA_13B = TextConfig(name_or_path="lmsys/vicuna-13b-v1.5")

PAPER = Preset(
    name="paper",
    slicing=SlicingConfig(max_slices=6),
    resampler=ResamplerConfig(kind="perceiver", num_queries=64, num_heads=8),
    text=_VICUNA_13B,
)

OFFICIAL_V1 = Preset(
    name="official-v1",
    slicing=SlicingConfig(max_slices=7),
    resampler=ResamplerConfig(kind="windowed", num_queries=144, num_heads=None),
    text=_VICUNA_13B,
)

# Every test runs on this: small pieces (112 px, 8x8 patches), a 2-layer ViT and a 2-layer Llama.
TINY = Preset(
    name="tiny",
    slicing=SlicingConfig(scale_resolution=112, max_slices=6),
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=112),
    resampler=ResamplerConfig(kind="perceiver", num_queries=16, num_heads=4),
    text=TextConfig(
        config={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
        }
    ),
)

# The bundled demo model (llava_uhd.synth.synthdoc): the paper's slicing geometry and resampler design at
# toy width. Its tower is trained from scratch (stage 0) with a conv stem and per-piece centring, and its
# Llama from scratch on synthdoc's words (a byte-level BPE of about 400 tokens, saved beside the weights).
SYNTHDOC = Preset(
    name="synthdoc",
    slicing=SlicingConfig(max_slices=6),
    vision=VisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        hidden_act="gelu",
        feature_layer=-1,  # a tower trained for its heads: its last layer is the one they read
        stem="conv",
        center_pieces=True,
    ),
    resampler=ResamplerConfig(kind="perceiver", num_queries=36, num_heads=4),
    text=TextConfig(
        config={
            "model_type": "llama",
            "hidden_size": 192,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 512,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        }
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, OFFICIAL_V1, TINY, SYNTHDOC)}


def get_preset(name: str) -> Preset:
    """Return a named preset, or load one from a YAML file path."""
    if name in PRESETS:
        return PRESETS[name]
    if name.endswith((".yaml", ".yml")):
        return Preset.load(name)
    raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or give a .yaml file")
