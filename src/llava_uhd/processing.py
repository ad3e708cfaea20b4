"""Images + text -> model inputs (docs/INTERFACES.md, "Processor output"; docs/design.md section 6).

:class:`LlavaUHDProcessor` is the one place model inputs are made, for training and for inference alike.
It composes the parts: images are read and planned by :func:`llava_uhd.images.load_planned` under the
token budget of :mod:`llava_uhd.budget`, their pieces become flattened patches (:mod:`llava_uhd.pixels`),
and every ``<image>`` in the text becomes the spatial schema of paper section 3.3
(:mod:`llava_uhd.tokens`).

Two entry points share those steps:

* :meth:`LlavaUHDProcessor.prepare`: turns + images + template -> :class:`PreparedConversation` (ids,
  labels, pixels, piece grids). The training dataset calls it with the whole conversation, inference
  with the same conversation up to the open answer (``generation_prompt=True``), so the prompt part of a
  training sample and the inference input are the same ids, pixels and grids.
* :meth:`LlavaUHDProcessor.__call__`: prompt strings the caller wrote (a batch, padded), the Hugging
  Face processor call.

:meth:`LlavaUHDProcessor.apply_chat_template` takes Hugging Face / OpenAI chat messages with image parts
(:mod:`llava_uhd.chat_template`) and, for a generation prompt or a whole conversation, calls
:meth:`~LlavaUHDProcessor.prepare`: the chat-template call of transformers gives the ids training gives.
The processor is a transformers ``ProcessorMixin`` (a tokenizer and a
:class:`~llava_uhd.image_processing.LlavaUHDImageProcessor`), so ``AutoProcessor`` and
``pipeline("image-text-to-text")`` load it from a saved folder.

This module may import torch and transformers but never :mod:`llava_uhd.model`.
Dimensions: B batch, T text length, N pieces, Pt patches, C channels, P patch side.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AddedToken, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils.chat_template_utils import render_jinja_template

from llava_uhd.budget import plan_with_budget
from llava_uhd.chat_template import jinja_template, messages_to_turns, string_messages
from llava_uhd.config import Preset, SlicingConfig, get_preset
from llava_uhd.errors import ConfigError, PlaceholderMismatchError
from llava_uhd.image_processing import ImageBatch, LlavaUHDImageProcessor
from llava_uhd.images import ImageSource
from llava_uhd.pixels import ResizeMode
from llava_uhd.serialize import from_plain
from llava_uhd.slicing import SlicePlan, overview_plan
from llava_uhd.templates import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    MalformedConversationError,
    Template,
    Turn,
    get_template,
)
from llava_uhd.tokenizers import load_tokenizer_folder
from llava_uhd.tokens import (
    EncodedSample,
    encode_conversation,
    encode_text,
    expand_image_tokens,
    image_layout_ids,
    pad_token_id,
    separator_token_ids,
)

PRESET_FILE = "llava_uhd_preset.yaml"
PROCESSOR_FILE = "llava_uhd_processor.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# What tells AutoProcessor the class; the settings themselves are in PRESET_FILE and PROCESSOR_FILE.
PROCESSOR_CONFIG_FILE = "processor_config.json"
# The options save_pretrained writes into PROCESSOR_FILE: the keyword arguments of the constructor.
_SAVED_OPTIONS = frozenset({"image_token", "padding_side", "resize_mode", "max_visual_tokens"})
_PADDING_SIDES = ("left", "right")


@dataclass(frozen=True)
class PreparedConversation:
    """One conversation ready for the model: its text as ids and labels, and its images' pieces.

    ``text.input_ids`` and ``text.labels`` have length T (labels ``IGNORE_INDEX`` off the answers, and
    everywhere for a generation prompt); ``text.visual_spans[i]`` is where image i's layout sits.
    ``images`` holds (Pt, C*P*P) pixels and (N, 2) grids, empty for a text-only conversation.
    """

    text: EncodedSample
    images: ImageBatch

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """A batch of one with the processor output's keys: ``input_ids``, ``attention_mask`` (1, T) and,
        when there are images, ``pixel_values``, ``piece_grids``, ``pieces_per_image``."""
        ids = torch.tensor([self.text.input_ids], dtype=torch.long)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.images.plans:
            inputs["pixel_values"] = self.images.pixel_values
            inputs["piece_grids"] = self.images.piece_grids
            inputs["pieces_per_image"] = self.images.pieces_per_image
        return inputs


class LlavaUHDProcessor(ProcessorMixin):
    """Turns conversations or prompts with ``<image>`` placeholders, and images, into the model's inputs.

    Args:
        tokenizer: any Hugging Face tokenizer. When it lacks the image token, the processor adds it as a
            special token to a copy (``self.tokenizer``); the caller's tokenizer is never changed.
        preset: a :class:`~llava_uhd.config.Preset` or its name; slicing, normalisation, Q and the
            default template come from it.
        image_processor: the :class:`~llava_uhd.image_processing.LlavaUHDImageProcessor` (None: one
            made from the preset's slicing); its slicing must be the preset's.
        chat_template: the Jinja chat template (None: the preset's template written as Jinja,
            :func:`llava_uhd.chat_template.jinja_template`). Another template is rendered and tokenized
            as transformers does, without :meth:`prepare`'s guarantee.
        padding_side: "right" for training, "left" for batched generation.
        resize_mode: "fast" (default) or "exact" (bit-faithful to the released pipeline); see
            :mod:`llava_uhd.pixels`. Fast mode also decodes JPEGs at the DCT scale the plan needs.
            None: the image processor's, else "fast".
        max_visual_tokens: default per-sample visual-token budget (None: unlimited).
        image_token: the tokenizer's image placeholder token.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        preset: Preset | str = "paper",
        *,
        image_processor: LlavaUHDImageProcessor | None = None,
        chat_template: str | None = None,
        padding_side: str = "right",
        resize_mode: ResizeMode | None = None,
        max_visual_tokens: int | None = None,
        image_token: str = IMAGE_TOKEN,
    ) -> None:
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        _check_padding_side(padding_side)
        _check_budget(max_visual_tokens)
        if image_processor is None:
            image_processor = LlavaUHDImageProcessor(self.preset.slicing, resize_mode or "fast")
        elif image_processor.slicing != self.preset.slicing:
            raise ConfigError("the image processor's slicing differs from the preset's")
        elif resize_mode is not None:
            image_processor = LlavaUHDImageProcessor(image_processor.slicing, resize_mode)
        if image_token not in tokenizer.get_vocab():
            tokenizer = copy.deepcopy(tokenizer)  # a shared tokenizer stays as the caller had it
            tokenizer.add_tokens(
                [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
            )
        self.padding_side = padding_side
        self.max_visual_tokens = max_visual_tokens
        self.image_token = image_token
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(image_token)
        self.separator_ids = separator_token_ids(tokenizer)
        self.separator_lengths = {sep: len(ids) for sep, ids in self.separator_ids.items()}
        own_template = jinja_template(self.preset.template, tokenizer, image_token)
        # a template that is not the preset's is rendered as transformers renders it (no prepare)
        self.custom_chat_template = chat_template is not None and chat_template != own_template
        # ProcessorMixin.__init__ only sets these three after a class check that imports every tokenizer
        # backend transformers knows (mistral-common's among them, which need not be installed)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = own_template if chat_template is None else chat_template

    @property
    def resize_mode(self) -> ResizeMode:
        return self.image_processor.resize_mode

    @property
    def num_queries(self) -> int:
        return self.preset.resampler.num_queries

    @property
    def slicing(self) -> SlicingConfig:
        return self.preset.slicing

    # ---- images ----------------------------------------------------------------------------------

    def plan_images(
        self,
        sizes: Sequence[tuple[int, int]],
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
        *,
        overview_only: bool = False,
    ) -> list[SlicePlan]:
        """Plans for images of ``sizes`` (width, height) under a per-call slice limit and token budget
        (None: the processor's); ``overview_only`` then drops the slices (stage 1)."""
        config = self.slicing if max_slices is None else replace(self.slicing, max_slices=max_slices)
        budget = self.max_visual_tokens if max_visual_tokens is None else max_visual_tokens
        _check_budget(budget)
        plans = plan_with_budget(
            sizes,
            config,
            num_queries=self.num_queries,
            max_visual_tokens=budget,
            separator_lengths=self.separator_lengths,
        )
        return [overview_plan(plan) for plan in plans] if overview_only else plans

    def load_and_plan(
        self,
        images: Sequence[ImageSource],
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
        *,
        overview_only: bool = False,
    ) -> tuple[list[Image.Image], list[SlicePlan]]:
        """Decode and plan the images of one request (the token budget is shared across them).

        In fast mode, encoded sources are planned from their header and then decoded at the JPEG DCT
        scale the plan allows (:func:`llava_uhd.images.load_planned`); exact mode decodes in full.
        """
        return self.image_processor.load_and_plan(
            images,
            lambda sizes: self.plan_images(sizes, max_slices, max_visual_tokens, overview_only=overview_only),
        )

    def encode(self, images: Sequence[Image.Image], plans: Sequence[SlicePlan]) -> ImageBatch:
        """Pixels of decoded images and their plans, all in one preallocated buffer."""
        return self.image_processor.encode(images, plans)

    def process_images(
        self,
        images: Sequence[ImageSource],
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
        *,
        overview_only: bool = False,
    ) -> ImageBatch:
        """Load, plan and encode the images of one request (no text)."""
        return self.encode(
            *self.load_and_plan(images, max_slices, max_visual_tokens, overview_only=overview_only)
        )

    # ---- conversations ---------------------------------------------------------------------------

    def encode_conversation(
        self,
        turns: Sequence[Turn],
        plans: Sequence[SlicePlan],
        template: str | Template | None = None,
        *,
        generation_prompt: bool = False,
    ) -> EncodedSample:
        """The ids and labels of ``turns`` in ``template`` (None: the preset's), the i-th ``<image>``
        expanded into image i's layout from ``plans`` (:func:`llava_uhd.tokens.encode_conversation`).

        Raises:
            PlaceholderMismatchError: the turns, or the text the template renders from them, hold a
                different number of placeholders than there are plans.
        """
        _check_placeholders(turns, len(plans))
        layouts = [
            image_layout_ids(plan, self.num_queries, self.image_token_id, self.separator_ids)
            for plan in plans
        ]
        encoded = encode_conversation(
            turns,
            get_template(self.preset.template if template is None else template),
            self.tokenizer,
            layouts.__getitem__,
            generation_prompt=generation_prompt,
            anchor=self.image_token,
        )
        if len(encoded.visual_spans) != len(layouts):
            raise PlaceholderMismatchError(
                f"the template rendered {len(encoded.visual_spans)} of the {len(layouts)} image placeholder(s)"
            )
        return encoded

    def prepare(
        self,
        turns: Sequence[Turn],
        images: Sequence[ImageSource] = (),
        template: str | Template | None = None,
        *,
        generation_prompt: bool = False,
        overview_only: bool = False,
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
    ) -> PreparedConversation:
        """Ids, labels, pixels and piece grids of one conversation: the inputs of training and inference.

        Args:
            turns: the conversation; image i belongs to the i-th ``<image>`` of its text.
            images: the sources (paths, bytes, PIL images, arrays), read by :meth:`load_and_plan`.
            template: ``plain``, ``vicuna_v1``, ``chat_template`` or a template object (None: the preset's).
            generation_prompt: the turns end with a user turn; render them up to where the answer starts.
            overview_only: one piece per image, its overview (stage 1).
            max_slices, max_visual_tokens: per-call limits (None: the processor's).

        Raises:
            PlaceholderMismatchError: the placeholders and the images differ in number.
        """
        _check_placeholders(turns, len(images))  # before any image is decoded
        loaded, plans = (
            self.load_and_plan(images, max_slices, max_visual_tokens, overview_only=overview_only)
            if images
            else ([], [])
        )
        text = self.encode_conversation(turns, plans, template, generation_prompt=generation_prompt)
        return PreparedConversation(text, self.encode(loaded, plans))

    def batch_inputs(
        self, prepared: Sequence[PreparedConversation], padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """Several prepared conversations as one batch for ``generate`` (left-padded by default).

        Pieces of every image are concatenated in conversation order, the order the model fills the
        placeholders in; conversations may hold images of different slice counts.
        """
        _check_padding_side(padding_side)
        inputs = self._pad([p.text.input_ids for p in prepared], padding_side)
        with_images = [p.images for p in prepared if p.images.plans]
        if with_images:
            inputs["pixel_values"] = torch.cat([b.pixel_values for b in with_images])
            inputs["piece_grids"] = torch.cat([b.piece_grids for b in with_images])
            inputs["pieces_per_image"] = torch.cat([b.pieces_per_image for b in with_images])
        return inputs

    # ---- prompt strings --------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | ImageSource | None = None,
        *,
        max_slices: int | None = None,
        max_visual_tokens: int | None = None,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        return_plans: bool = False,
        return_tensors: str | None = None,
        padding: bool | str = True,
    ) -> BatchFeature:
        """Tokenise ``text`` (one prompt or a batch) and encode its images.

        Each prompt is tokenised whole by the tokenizer (its own special tokens with
        ``add_special_tokens``), which for a prompt rendered by a template gives the ids of
        :meth:`prepare` with ``generation_prompt=True``, up to the BOS the template adds.
        ``images`` is a flat list in the order the ``<image>`` placeholders appear across the batch, or
        one list per prompt. The token budget applies to each prompt's images together.
        Returns a BatchFeature with ``input_ids``, ``attention_mask`` (B, T) and, when there are images,
        ``pixel_values`` (Pt, C*P*P), ``piece_grids`` (N, 2), ``pieces_per_image`` (n_images,).
        With ``return_plans`` the plans are attached as the ``plans`` attribute (a tuple per image).
        ``return_tensors`` (None or "pt") and ``padding`` (True or "longest") are the transformers
        options the pipelines pass: the output is always torch tensors, padded to the longest prompt.
        """
        if return_tensors not in (None, "pt"):
            raise ConfigError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if padding not in (True, "longest"):
            raise ConfigError(
                f"padding must be True or 'longest' (prompts are padded to the longest), got {padding!r}"
            )
        texts = [text] if isinstance(text, str) else list(text)
        per_sample = self._images_per_sample(texts, images)
        side = self.padding_side if padding_side is None else padding_side
        _check_padding_side(side)
        rows: list[list[int]] = []
        all_images: list[Image.Image] = []
        all_plans: list[SlicePlan] = []
        for sample_text, sample_images in zip(texts, per_sample, strict=True):
            ids = self.tokenizer.encode(sample_text, add_special_tokens=add_special_tokens)
            loaded, plans = (
                self.load_and_plan(sample_images, max_slices, max_visual_tokens)
                if sample_images
                else ([], [])
            )
            all_images.extend(loaded)
            all_plans.extend(plans)
            expanded, _ = expand_image_tokens(
                ids,
                plans,
                image_token_id=self.image_token_id,
                num_queries=self.num_queries,
                separator_ids=self.separator_ids,
            )
            rows.append(expanded)
        data = self._pad(rows, side)
        if all_plans:  # one buffer for the whole batch: no per-sample tensors to concatenate
            batch = self.encode(all_images, all_plans)
            data.update(pixel_values=batch.pixel_values, piece_grids=batch.piece_grids)
            data["pieces_per_image"] = batch.pieces_per_image
        features = BatchFeature(data=data)
        if return_plans:
            features.plans = tuple(all_plans)
        return features

    def _images_per_sample(self, texts: list[str], images: Any) -> list[list[ImageSource]]:
        """Group images by prompt, checking each prompt's placeholder count (naming both counts)."""
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, list | tuple):
            images = [images]
        nested = len(images) > 0 and all(isinstance(x, list | tuple) for x in images)
        if nested:
            if len(images) != len(texts):
                raise PlaceholderMismatchError(f"got {len(texts)} prompt(s) but {len(images)} image lists")
            for i, (count, sample) in enumerate(zip(counts, images, strict=True)):
                if count != len(sample):
                    raise PlaceholderMismatchError(
                        f"prompt {i} has {count} {self.image_token} placeholder(s) but {len(sample)} image(s) were given"
                    )
            return [list(sample) for sample in images]
        if sum(counts) != len(images):
            raise PlaceholderMismatchError(
                f"the text has {sum(counts)} {self.image_token} placeholder(s) but {len(images)} image(s) were given"
            )
        grouped, start = [], 0
        for count in counts:
            grouped.append(list(images[start : start + count]))
            start += count
        return grouped

    def _pad(self, rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        pad_id = pad_token_id(self.tokenizer)  # the collate's rule: training and inference pad alike
        length = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- chat messages ---------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> str | list[str] | torch.Tensor | BatchFeature:
        """Render chat messages (one conversation or a batch) with the chat template; tokenize on request.

        Messages take Hugging Face / OpenAI content parts (:mod:`llava_uhd.chat_template`): each image
        part becomes ``<image>`` and a newline where it stands, and its image (a PIL image, a local path,
        bytes, base64) is what that placeholder shows. Without ``tokenize`` the prompt text is returned
        (a list for a batch). With it, a conversation ending in a user turn with
        ``add_generation_prompt``, or in an assistant turn without, is made by :meth:`prepare` in the
        preset's template: the ids training renders for it, with its pixels and piece grids;
        ``continue_final_message`` appends the rendered start of the last answer to the prompt before it.
        Another ``chat_template`` tokenizes the rendered text with :meth:`__call__`, as transformers does. A batch is padded on the left for a generation prompt, else on the processor's
        side. ``processor_kwargs`` may hold ``max_slices``, ``max_visual_tokens``, ``padding_side``.

        Returns:
            the text; with ``tokenize`` the (B, T) ``input_ids``, or with ``return_dict`` the whole
            BatchFeature (``input_ids``, ``attention_mask`` and, with images, ``pixel_values``,
            ``piece_grids``, ``pieces_per_image``).

        Raises:
            MalformedConversationError: messages the template cannot render.
            PlaceholderMismatchError: text ``<image>`` placeholders beside image parts that disagree.
        """
        if add_generation_prompt and continue_final_message:
            raise ConfigError("add_generation_prompt and continue_final_message cannot both be set")
        options = dict(processor_kwargs or {})
        wanted = options.pop("return_tensors", return_tensors)
        if wanted not in (None, "pt", "auto"):
            raise ConfigError(f"return_tensors must be None or 'pt', got {wanted!r}")
        unknown = set(options) - {"max_slices", "max_visual_tokens", "padding_side"}
        if unknown:
            raise ConfigError(f"unknown processor_kwargs {sorted(unknown)}")
        if chat_template is None and self.chat_template is None:
            raise ConfigError(
                f"the preset's template is {self.preset.template!r} and the tokenizer has no chat template"
            )
        template = self._resolve_chat_template(chat_template)
        custom = chat_template is not None or self.custom_chat_template
        conversations, batched = self._normalize_conversations(conversation)
        prompts = [
            render_jinja_template(
                conversations=[messages if custom else string_messages(messages, self.image_token)],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **{**self.tokenizer.special_tokens_map, **template_kwargs},
            )[0][0]
            for messages in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        parsed = [messages_to_turns(messages, self.image_token) for messages in conversations]
        if custom:  # another template: tokenized as transformers does, BOS unless the text starts with it
            bos = self.tokenizer.bos_token
            special = not (bos is not None and prompts[0].startswith(bos))
            features = self(prompts, [images for _, images in parsed], add_special_tokens=special, **options)
            return features if return_dict else features["input_ids"]
        side = options.pop("padding_side", "left" if add_generation_prompt else self.padding_side)
        prepared = [
            self._prepare_messages(
                turns, images, prompt, add_generation_prompt, continue_final_message, options
            )
            for (turns, images), prompt in zip(parsed, prompts, strict=True)
        ]
        features = BatchFeature(data=self.batch_inputs(prepared, side))
        return features if return_dict else features["input_ids"]

    def _prepare_messages(
        self,
        turns: list[Turn],
        images: list[ImageSource],
        rendered: str,
        add_generation_prompt: bool,
        continue_final_message: bool,
        options: dict[str, Any],
    ) -> PreparedConversation:
        """One conversation through :meth:`prepare`: a generation prompt after a user turn, a whole
        conversation, or (``continue_final_message``) the prompt before the last answer followed by the
        rendered start of that answer, tokenized as a continuation."""
        if continue_final_message:
            if not turns or turns[-1].role != "assistant":
                raise MalformedConversationError("continue_final_message needs a final assistant message")
            prompt = self.prepare(turns[:-1], images, generation_prompt=True, **options)
            opened = get_template(self.preset.template).generation_prompt(turns[:-1], self.tokenizer)
            if not rendered.startswith(opened):
                raise MalformedConversationError(
                    "the chat template does not render the final message after the prompt before it"
                )
            tail = encode_text(
                self.tokenizer, rendered[len(opened) :], at_start=False, anchor=self.image_token
            )
            ids = [*prompt.text.input_ids, *tail]
            text = EncodedSample(ids, [IGNORE_INDEX] * len(ids), prompt.text.visual_spans)
            return PreparedConversation(text, prompt.images)
        if not turns or (turns[-1].role == "assistant") == add_generation_prompt:
            raise MalformedConversationError(
                "end the messages with a user turn and set add_generation_prompt (a prompt to answer), "
                "end them with an assistant turn (a whole conversation), or set continue_final_message"
            )
        return self.prepare(turns, images, generation_prompt=add_generation_prompt, **options)

    def to_dict(self) -> dict[str, Any]:
        """The processor's settings as JSON-ready data (the saved files hold the same)."""
        return {
            "processor_class": type(self).__name__,
            "image_processor": self.image_processor.to_dict(),
            "preset": self.preset.to_dict(),
            **self._options(),
        }

    def _options(self) -> dict[str, Any]:
        return {
            "image_token": self.image_token,
            "padding_side": self.padding_side,
            "resize_mode": self.resize_mode,
            "max_visual_tokens": self.max_visual_tokens,
        }

    # ---- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Save the tokenizer, the preset YAML, the processor options and the chat template.

        The folder also gets ``processor_config.json``, naming the class for ``AutoProcessor`` and holding the
        image processor's settings for ``AutoImageProcessor``.
        ``kwargs`` are what ``push_to_hub`` passes (``max_shard_size``); a processor has no shards.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        self.preset.save(folder / PRESET_FILE)
        (folder / PROCESSOR_FILE).write_text(json.dumps(self._options(), indent=2) + "\n")
        # transformers' own layout: the image processor's settings nested under its attribute name,
        # where AutoImageProcessor reads them (its slicing is the preset's, checked in __init__)
        saved = {"processor_class": type(self).__name__, "image_processor": self.image_processor.to_dict()}
        (folder / PROCESSOR_CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
        if isinstance(self.chat_template, str):
            (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> LlavaUHDProcessor:
        """Load a processor saved by :meth:`save_pretrained` (older folders without a chat template too).

        Keyword arguments that are constructor options (``padding_side``, ``resize_mode``,
        ``max_visual_tokens``, ``image_token``, ``chat_template``) override the saved ones; the loading
        options transformers passes (``AutoProcessor``, ``pipeline``: revision, cache and hub settings)
        are taken by transformers' own processor loader, which also reads ``chat_template.jinja``.
        """
        folder = Path(pretrained_model_name_or_path)
        if not (folder / PRESET_FILE).is_file():
            raise ConfigError(f"{folder}: no {PRESET_FILE}; not a saved LLaVA-UHD processor")
        try:
            saved, rest = cls.get_processor_dict(str(folder), **kwargs)
        except (OSError, ValueError) as exc:  # a processor_config.json that is no JSON
            raise ConfigError(f"{folder}: cannot read the processor files ({exc})") from None
        options = _saved_options(folder / PROCESSOR_FILE)
        if isinstance(saved.get("chat_template"), str):
            options["chat_template"] = saved["chat_template"]
        options.update({key: rest[key] for key in rest if key in _SAVED_OPTIONS | {"chat_template"}})
        preset = Preset.load(folder / PRESET_FILE)
        _check_saved_slicing(folder / PROCESSOR_CONFIG_FILE, saved.get("image_processor"), preset.slicing)
        return cls(load_tokenizer_folder(folder), preset, **options)


def _saved_options(path: Path) -> dict[str, Any]:
    """The options :meth:`LlavaUHDProcessor.save_pretrained` wrote (none when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ConfigError(f"{path}: not readable as processor options ({exc})") from None
    if not isinstance(options, dict) or not set(options) <= _SAVED_OPTIONS:
        raise ConfigError(
            f"{path}: processor options must be a JSON object with keys from {sorted(_SAVED_OPTIONS)}"
        )
    if not isinstance(options.get("image_token", IMAGE_TOKEN), str):
        raise ConfigError(f"{path}: image_token must be a string, got {options['image_token']!r}")
    return options


def _check_saved_slicing(path: Path, image_processor: Any, slicing: SlicingConfig) -> None:
    """The slicing ``AutoImageProcessor`` would read from ``path`` must be the preset's, which the
    processor uses (folders saved before it was written there have none)."""
    saved = image_processor.get("slicing") if isinstance(image_processor, dict) else None
    if saved is not None and from_plain(SlicingConfig, saved, f"{path}: image_processor.slicing") != slicing:
        raise ConfigError(f"{path}: the image processor's slicing differs from {PRESET_FILE}'s")


def _check_placeholders(turns: Sequence[Turn], num_images: int) -> None:
    placeholders = sum(turn.text.count(IMAGE_TOKEN) for turn in turns)
    if placeholders != num_images:
        raise PlaceholderMismatchError(
            f"the turns have {placeholders} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were given"
        )


def _check_padding_side(side: str) -> None:
    if side not in _PADDING_SIDES:
        raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")


def _check_budget(budget: int | None) -> None:
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"max_visual_tokens must be a positive integer or None, got {budget!r}")
