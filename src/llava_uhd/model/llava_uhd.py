"""LLaVA-UHD as a Hugging Face model: ViT -> shared resampler -> any causal LM (paper section 3).

:class:`LlavaUHDForConditionalGeneration` *has* a vision tower, a resampler and a language model
(STYLE.md habit 4). The processor has already expanded every ``<image>`` into Q placeholder tokens per
piece (docs/INTERFACES.md), pieces in batch order; the model encodes all pieces at once, checks that
the placeholder count equals N * Q, and fills the placeholders in order with one ``masked_scatter``. The
language model then does everything else: loss (labels shifted, -100 ignored), KV cache and generation.

Importing this module registers the model with ``AutoConfig``, ``AutoModelForImageTextToText`` and
``AutoModelForCausalLM``, so a saved folder loads through the Auto classes.

Dimensions: B batch, T text length, N pieces, Pt patches of all pieces, K = C * P * P values of a patch,
Q queries per piece, D the LLM's hidden size.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_uhd.errors import ModelInputError, PlaceholderMismatchError
from llava_uhd.model.configuration import MODEL_TYPE, LlavaUHDConfig
from llava_uhd.model.init import init_weights
from llava_uhd.model.packing import gather_segments
from llava_uhd.model.quantization import keep_full_precision
from llava_uhd.model.resamplers import build_resampler
from llava_uhd.model.vision import VisionTransformer

# Token id that stands in for a placeholder in the embedding lookup; its embedding is overwritten.
PLACEHOLDER_LOOKUP_ID = 0
# Keys of a processor's output that describe images rather than text rows (never expanded per row).
VISUAL_KEYS = ("pixel_values", "piece_grids", "pieces_per_image", "image_features")


class LlavaUHDForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Vision tower + resampler + causal LM, generating through the LM's own generation loop.

    Args:
        config: the model config (typed preset inside, see :class:`LlavaUHDConfig`).
        language_model: an already built causal LM to use instead of ``AutoModelForCausalLM.from_config``
            (e.g. one loaded from a checkpoint; :mod:`llava_uhd.model.build`).
    """

    config_class = LlavaUHDConfig
    config: LlavaUHDConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["EncoderBlock", "PerceiverResampler", "WindowedResampler"]

    def __init__(self, config: LlavaUHDConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        preset = config.to_preset()
        text_width = config.text_config.hidden_size
        self.vision_tower = VisionTransformer(preset.vision)
        self.resampler = build_resampler(preset.resampler, preset.vision.hidden_size, text_width)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self._lm_cache_name = _cache_argument(self.language_model)
        self.post_init()

    # ---- Hugging Face plumbing -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> LlavaUHDForConditionalGeneration:
        """transformers' loader; a ``quantization_config`` that names no modules to skip keeps the vision
        tower, resampler and LM head in full precision (:mod:`llava_uhd.model.quantization`)."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = keep_full_precision(kwargs["quantization_config"])
        return super().from_pretrained(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def _init_weights(self, module: nn.Module) -> None:
        """Our modules' one recipe (:mod:`llava_uhd.model.init`); the LM initialises itself.

        transformers calls this only for modules whose weights were not loaded, children first.
        """
        init_weights(module)

    # ---- the multimodal part ------------------------------------------------------------------------

    @property
    def num_queries(self) -> int:
        return self.resampler.num_queries

    def encode_pieces(self, pixel_values: torch.Tensor, piece_grids: torch.Tensor) -> torch.Tensor:
        """(Pt, K) patches of N pieces with (N, 2) grids -> (N, Q, D) LLM tokens."""
        features = self.vision_tower(pixel_values, piece_grids)  # (Pt, Dv)
        return self.resampler(features, piece_grids)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        piece_grids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) embeddings with every placeholder replaced by its piece's features.

        ``image_features`` (N, Q, D), the output of :meth:`encode_pieces` computed earlier (an image-feature
        cache), stands in for ``pixel_values`` and ``piece_grids``.
        """
        if image_features is not None:
            if pixel_values is not None:
                raise ModelInputError("give image_features or pixel_values, not both")
            return self.embed_with_features(input_ids, image_features)
        has_images = pixel_values is not None and pixel_values.numel() > 0
        if has_images and piece_grids is None:
            raise ModelInputError("pixel_values were given without piece_grids (N, 2)")
        features = self.encode_pieces(pixel_values, piece_grids) if has_images else None
        return self.embed_with_features(input_ids, features)

    def embed_with_features(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids and the (N, Q, D) output of :meth:`encode_pieces` (None: no images) -> (B, T, D).

        The step of :meth:`embed_inputs` after the vision encoding (callers that keep an image's features
        across requests pass them to ``generate`` as ``image_features``). Placeholder ids are looked up as id 0
        (so the vocabulary is never resized) and then overwritten.
        """
        image_mask = self._placeholder_mask(input_ids)  # (B, T)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, PLACEHOLDER_LOOKUP_ID))
        num_placeholders = int(image_mask.sum())
        if features is None:
            if num_placeholders:
                raise PlaceholderMismatchError(
                    f"the text has {num_placeholders} image placeholder tokens (id {self.config.image_token_id}) "
                    "but no pixel_values were given (0 features)"
                )
            return embeds
        num_features = features.shape[0] * features.shape[1]
        if num_placeholders != num_features:
            raise PlaceholderMismatchError(
                f"the text has {num_placeholders} image placeholder tokens (id {self.config.image_token_id}) but "
                f"the images give {num_features} features ({features.shape[0]} pieces x {features.shape[1]} queries)"
            )
        # Placeholders and pieces come in the same order (docs/INTERFACES.md): one ordered scatter.
        return embeds.masked_scatter(
            image_mask.unsqueeze(-1), features.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        )

    def _placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        token = self.config.image_token_id
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        piece_grids: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pieces_per_image: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Fill the placeholders of ``input_ids`` with the pieces' features, then run the language model.

        ``labels`` (B, T) use -100 for positions without loss; the LM shifts them. ``cache`` (also accepted
        as ``past_key_values``) is the LM's KV cache. ``pieces_per_image`` comes with the processor's
        output and is not needed here (placeholders and pieces are in the same order). ``image_features``
        (N, Q, D) replaces ``pixel_values`` and ``piece_grids`` with pieces encoded earlier.
        """
        past = cache if cache is not None else kwargs.pop("past_key_values", None)
        if inputs_embeds is None:
            if input_ids is None:
                raise ModelInputError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, piece_grids, image_features)
        elif pixel_values is not None or image_features is not None:
            raise ModelInputError(
                "give pixel_values with input_ids (placeholders are found by id), not with inputs_embeds"
            )
        lm_kwargs = {self._lm_cache_name: past} if past is not None else {}
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **lm_kwargs,
            **kwargs,
        )

    # ---- generation -----------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        piece_grids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The LM's step inputs; images (pixels, or cached ``image_features``) only on the prefill step
        (later steps reuse the KV cache)."""
        kwargs.pop("pieces_per_image", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["pixel_values"] = pixel_values
            inputs["piece_grids"] = piece_grids
            if image_features is not None:
                inputs["image_features"] = image_features
        return inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """Repeat each row ``expand_size`` times (beam search, several return sequences), images included.

        Packed pieces are not indexed by row, so the default ``repeat_interleave(dim=0)`` would scramble
        them: each row's own pieces are repeated as whole blocks instead.
        """
        visual = {key: model_kwargs.pop(key, None) for key in VISUAL_KEYS}
        if expand_size > 1 and visual["pixel_values"] is not None and input_ids is not None:
            visual["pixel_values"], visual["piece_grids"] = self._expand_pieces(
                input_ids, visual["pixel_values"], visual["piece_grids"], expand_size
            )
        if expand_size > 1 and visual["image_features"] is not None and input_ids is not None:
            visual["image_features"] = visual["image_features"][
                self._piece_order(input_ids, visual["image_features"].shape[0], expand_size)
            ]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size,
            is_encoder_decoder=is_encoder_decoder,
            input_ids=input_ids,
            **model_kwargs,
        )
        model_kwargs.update({k: v for k, v in visual.items() if v is not None and k != "pieces_per_image"})
        return input_ids, model_kwargs

    def _expand_pieces(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, piece_grids: torch.Tensor, times: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pieces of row b repeated ``times`` times in a row, rows in order; patches follow their pieces."""
        piece_order = self._piece_order(input_ids, piece_grids.shape[0], times)
        patch_order = gather_segments(piece_grids[:, 0] * piece_grids[:, 1], piece_order)
        return pixel_values[patch_order], piece_grids[piece_order]

    def _piece_order(self, input_ids: torch.Tensor, num_pieces: int, times: int) -> torch.Tensor:
        """(N * times,) index into the N pieces: each row's pieces as a block, the block repeated in a row."""
        pieces_per_row = self._placeholder_mask(input_ids).sum(dim=1) // self.num_queries  # (B,)
        if int(pieces_per_row.sum()) != num_pieces:
            raise PlaceholderMismatchError(
                f"the text's placeholders make {int(pieces_per_row.sum())} pieces of {self.num_queries} tokens "
                f"but the images have {num_pieces}"
            )
        rows = torch.arange(pieces_per_row.numel(), device=pieces_per_row.device)
        return gather_segments(pieces_per_row, rows.repeat_interleave(times))


def _cache_argument(language_model: nn.Module) -> str:
    """The LM's name for its KV cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    parameters = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


AutoConfig.register(MODEL_TYPE, LlavaUHDConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaUHDConfig, LlavaUHDForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LlavaUHDConfig, LlavaUHDForConditionalGeneration, exist_ok=True)
