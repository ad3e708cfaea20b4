"""The Hugging Face config of a LLaVA-UHD model: the typed preset, flattened into ``config.json``.

:class:`LlavaUHDConfig` keeps the vision tower, resampler and slicing settings as plain dicts of the
typed dataclasses in :mod:`llava_uhd.config` (so the processor's slicing travels with the weights)
and the language model as a real transformers sub-config (``text_config``), which
``AutoModelForCausalLM.from_config`` builds. :meth:`LlavaUHDConfig.from_preset` and
:meth:`LlavaUHDConfig.to_preset` round-trip the typed :class:`~llava_uhd.config.Preset` exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from llava_uhd.config import Preset, ResamplerConfig, SlicingConfig, TextConfig, VisionConfig
from llava_uhd.errors import ConfigError

MODEL_TYPE = "llava_uhd"
# The sections a saved config.json must hold: without one, the model would silently take the full-size
# defaults (a ViT-L and a 7B Llama) instead of what its weights were trained as.
SAVED_SECTIONS = ("vision", "resampler", "slicing", "text", "text_config")


class LlavaUHDConfig(PretrainedConfig):
    """Config of :class:`~llava_uhd.model.llava_uhd.LlavaUHDForConditionalGeneration`.

    Attributes:
        vision: a :class:`~llava_uhd.config.VisionConfig` as a dict.
        resampler: a :class:`~llava_uhd.config.ResamplerConfig` as a dict.
        slicing: a :class:`~llava_uhd.config.SlicingConfig` as a dict (the processor's geometry).
        text: the preset's :class:`~llava_uhd.config.TextConfig` as a dict (where the LLM came from).
        text_config: the causal LM's transformers config (what the model is built from).
        template: the conversation template name.
        preset_name: the preset this config was made from.
        image_token_id: the id of the ``<image>`` placeholder token, filled with visual features.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision: dict | None = None
    resampler: dict | None = None
    slicing: dict | None = None
    text: dict | None = None
    text_config: dict | PretrainedConfig | None = None
    template: str = "vicuna_v1"
    preset_name: str = "custom"
    image_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.vision = _plain(self.vision, VisionConfig())
        self.resampler = _plain(self.resampler, ResamplerConfig())
        self.slicing = _plain(self.slicing, SlicingConfig())
        if self.text is None:  # built from a text_config alone: record it inline so to_preset() works
            inline = {"model_type": self.text_config.model_type, **self.text_config.to_diff_dict()}
            self.text = {"name_or_path": self.text_config.name_or_path or None, "config": inline}
        # The LM decides whether its head is tied to its embeddings (LLaVA's config does the same).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @classmethod
    def from_preset(
        cls,
        preset: Preset,
        text_config: PretrainedConfig | None = None,
        image_token_id: int | None = None,
        **kwargs: Any,
    ) -> LlavaUHDConfig:
        """Build from a typed preset; the LM config comes from ``text_config``, else the preset's text section.

        An inline text config is built offline with ``AutoConfig.for_model``; a name or folder is read
        with ``AutoConfig.from_pretrained`` (local files when ``HF_HUB_OFFLINE=1``).
        """
        if text_config is None:
            text_config = resolve_text_config(preset.text)
        plain = preset.to_dict()
        return cls(
            vision=plain["vision"],
            resampler=plain["resampler"],
            slicing=plain["slicing"],
            text=plain["text"],
            text_config=text_config,
            template=preset.template,
            preset_name=preset.name,
            image_token_id=image_token_id,
            **kwargs,
        )

    def to_preset(self) -> Preset:
        """The typed preset this config holds (exactly the one given to :meth:`from_preset`)."""
        return Preset.from_dict(
            {
                "name": self.preset_name,
                "slicing": self.slicing,
                "vision": self.vision,
                "resampler": self.resampler,
                "text": self.text,
                "template": self.template,
            }
        )


def check_saved_config(data: Mapping[str, Any]) -> None:
    """Check a ``config.json`` mapping before anything is built from it.

    It must be a LLaVA-UHD config holding every section (:data:`SAVED_SECTIONS`), no key that neither
    :class:`LlavaUHDConfig` nor transformers writes, typed sections that read back as a
    :class:`~llava_uhd.config.Preset`, and a ``text_config`` of a model type transformers knows.

    Raises:
        ConfigError: naming the first problem found.
    """
    model_type = data.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"model_type is {model_type!r}, not {MODEL_TYPE!r}")
    missing = [key for key in SAVED_SECTIONS if not isinstance(data.get(key), Mapping)]
    if missing:
        raise ConfigError(f"lacks the section(s) {missing}")
    unknown = sorted(set(data) - _saved_keys())
    if unknown:
        raise ConfigError(f"has unknown key(s) {unknown}")
    Preset.from_dict(  # the typed sections, checked field by field as to_preset() will read them
        {
            "name": data.get("preset_name", LlavaUHDConfig.preset_name),
            "template": data.get("template", LlavaUHDConfig.template),
            **{key: data[key] for key in ("slicing", "vision", "resampler", "text")},
        }
    )
    text_type = data["text_config"].get("model_type")
    if not isinstance(text_type, str) or text_type not in CONFIG_MAPPING:
        raise ConfigError(f"text_config has model_type {text_type!r}, which transformers does not know")


@functools.cache
def _saved_keys() -> frozenset[str]:
    """Every top-level key a saved config may hold: the fields of a config as transformers serialises it."""
    return frozenset(LlavaUHDConfig().to_dict())


def resolve_text_config(text: TextConfig) -> PretrainedConfig:
    """The transformers config of a preset's language model (inline dict first, else name or folder)."""
    if text.config is not None:
        options = dict(text.config)
        model_type = options.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **options)
        except ValueError as exc:
            raise ConfigError(f"inline text config with model_type {model_type!r}: {exc}") from None
    try:
        return AutoConfig.from_pretrained(text.name_or_path)
    except OSError as exc:
        raise ConfigError(f"cannot read the language model config of {text.name_or_path!r}: {exc}") from None


def _plain(value: dict | None, default: Any) -> dict:
    """A section as a JSON-ready dict (tuples as lists), the dataclass default when None."""
    data = dataclasses.asdict(default) if value is None else dict(value)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
