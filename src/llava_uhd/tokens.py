"""Token ids: an image's visual layout (paper section 3.3) and a conversation tokenized piece by piece.

:func:`image_layout_ids` writes one image's ids from the layout of :mod:`llava_uhd.layout`: Q copies of
the image token per piece, the ids of its separator after each slice (",", or "\\n" at a row's end), the
overview last. :func:`expand_image_tokens` replaces every image token of a tokenised sequence by its
image's layout. Separator ids always come from the tokenizer (:func:`separator_token_ids`), never from
constants.

:func:`encode_conversation` renders a template (:mod:`llava_uhd.templates`), tokenizes each piece on its
own and concatenates, replacing every ``<image>`` by the image's layout ids (labels ``IGNORE_INDEX``
there), so the answer/prompt boundary never depends on how the whole string would have been tokenized.

Tokenizing a piece that continues a sequence: SentencePiece tokenizers (Llama) put a "▁" in front of the
first word of every call, which is right at the start of a sequence but wrong in the middle ("," would
become "▁,"). Text that follows an added special token gets no such prefix, so a continuation is
tokenized as ``<image>`` + text and the first id dropped; for byte-level BPE this changes nothing. The
result equals tokenizing the whole string with every image and EOS as a hard boundary, which is what the
processor's ``__call__`` does with a prompt that holds ``<image>`` as a special token.

Tokenizers are duck-typed Hugging Face tokenizers; no torch or transformers import here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llava_uhd.errors import ConfigError, PlaceholderMismatchError
from llava_uhd.layout import layout_segments
from llava_uhd.slicing import SlicePlan
from llava_uhd.templates import IGNORE_INDEX, IMAGE_TOKEN, Piece, Template, Turn

# Separators are tokenised as they appear after another token: "a" + sep, minus the ids of "a".
_SEPARATOR_CONTEXT = "a"


def separator_token_ids(
    tokenizer: Any, separators: Sequence[str] = (",", "\n")
) -> dict[str, tuple[int, ...]]:
    """Token ids of each separator as it appears right after another token.

    SentencePiece tokenizers mark a word start with "▁", so encoding "," alone gives "▁,"; inside the
    layout the separator follows an image token, so we encode ``"a" + sep`` and drop the ids of ``"a"``
    (Llama: "," -> ",", "\\n" -> "<0x0A>").

    Raises:
        ConfigError: the tokenizer splits the context differently with the separator attached, or the
            separator encodes to nothing.
    """
    context = tokenizer.encode(_SEPARATOR_CONTEXT, add_special_tokens=False)
    result: dict[str, tuple[int, ...]] = {}
    for sep in separators:
        ids = tokenizer.encode(_SEPARATOR_CONTEXT + sep, add_special_tokens=False)
        if ids[: len(context)] != context or len(ids) == len(context):
            raise ConfigError(
                f"cannot isolate the token ids of separator {sep!r}: {_SEPARATOR_CONTEXT!r} encodes to "
                f"{context} but {_SEPARATOR_CONTEXT + sep!r} to {ids}"
            )
        result[sep] = tuple(ids[len(context) :])
    return result


def image_layout_ids(
    plan: SlicePlan, num_queries: int, image_token_id: int, separator_ids: Mapping[str, Sequence[int]]
) -> list[int]:
    """The token ids one image occupies: Q image tokens per piece, separator ids after each slice."""
    ids: list[int] = []
    for segment in layout_segments(plan):
        if segment.kind == "piece":
            ids.extend([image_token_id] * num_queries)
        else:
            ids.extend(separator_ids[segment.text])
    return ids


def expand_image_tokens(
    input_ids: Sequence[int],
    plans: Sequence[SlicePlan],
    *,
    image_token_id: int,
    num_queries: int,
    separator_ids: Mapping[str, Sequence[int]],
    labels: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[list[int], list[int] | None]:
    """Replace the i-th ``image_token_id`` of ``input_ids`` by image i's layout (:func:`image_layout_ids`).

    Args:
        input_ids: a tokenised sequence holding exactly one ``image_token_id`` per image.
        plans: the images' plans, in the order their tokens appear.
        labels: optional labels parallel to ``input_ids``; the expanded positions get ``ignore_index``
            (visual tokens carry no loss).

    Returns:
        (expanded ids, expanded labels or None).

    Raises:
        PlaceholderMismatchError: the number of image tokens differs from the number of plans.
    """
    positions = [i for i, token in enumerate(input_ids) if token == image_token_id]
    if len(positions) != len(plans):
        raise PlaceholderMismatchError(
            f"the text has {len(positions)} {IMAGE_TOKEN} placeholder(s) but {len(plans)} image(s) were given"
        )
    if labels is not None and len(labels) != len(input_ids):
        raise PlaceholderMismatchError(f"labels have length {len(labels)} but input_ids {len(input_ids)}")
    ids: list[int] = []
    out_labels: list[int] | None = [] if labels is not None else None
    start = 0
    for position, plan in zip(positions, plans, strict=True):
        layout = image_layout_ids(plan, num_queries, image_token_id, separator_ids)
        ids.extend(input_ids[start:position])
        ids.extend(layout)
        if out_labels is not None and labels is not None:
            out_labels.extend(labels[start:position])
            out_labels.extend([ignore_index] * len(layout))
        start = position + 1
    ids.extend(input_ids[start:])
    if out_labels is not None and labels is not None:
        out_labels.extend(labels[start:])
    return ids, out_labels


def pad_token_id(tokenizer: Any) -> int:
    """The id padded positions get: the tokenizer's pad id, else its unk id (LLaVA's choice for Vicuna),
    else its eos id. Padded positions are masked out, so the choice never changes a real token's output."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no pad, unk or eos token to pad with")


# --------------------------------------------------------------------------------------------------
# Conversations


@dataclass
class EncodedSample:
    """Token ids and labels of one sample; ``visual_spans[i]`` is image ``i``'s ``[start, end)`` in ids."""

    input_ids: list[int]
    labels: list[int]
    visual_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_visual_tokens(self) -> int:
        return sum(end - start for start, end in self.visual_spans)

    @property
    def num_text_tokens(self) -> int:
        return len(self.input_ids) - self.num_visual_tokens


def image_token_id(tokenizer: Any, token: str = IMAGE_TOKEN) -> int:
    """The id of the image special token ``token``, which the processor adds to its tokenizer."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no {token} token; build it through the "
            "processor, which adds it"
        )
    return int(token_id)


def encode_text(tokenizer: Any, text: str, at_start: bool, anchor: str = IMAGE_TOKEN) -> list[int]:
    """Token ids of ``text`` without special tokens; ``at_start=False`` tokenizes it as a continuation
    (after the special token ``anchor``, whose id is then dropped)."""
    if not text:
        return []
    if at_start:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    anchor_id = image_token_id(tokenizer, anchor)
    ids = list(tokenizer(anchor + text, add_special_tokens=False)["input_ids"])
    if not ids or ids[0] != anchor_id:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} does not keep {anchor} as one token")
    return ids[1:]


ImageIds = Callable[[int], Sequence[int]]  # image index -> its visual layout ids


def encode_conversation(
    turns: Sequence[Turn],
    template: Template,
    tokenizer: Any,
    image_ids: ImageIds,
    *,
    generation_prompt: bool = False,
    anchor: str = IMAGE_TOKEN,
) -> EncodedSample:
    """Render ``turns`` with ``template`` and tokenize piece by piece.

    ``image_ids(i)`` gives image ``i``'s layout ids (placeholders and separators); they replace the
    ``i``-th ``<image>`` and carry no loss. Trainable pieces carry their own ids as labels.
    ``generation_prompt=True`` renders a conversation that ends with a user turn up to where the answer
    starts (:meth:`Template.generation_prompt`), every label ``IGNORE_INDEX``: the same ids as the
    prompt part of the training sample that continues it with an answer. ``anchor`` is the special token
    continuations are tokenized after (:func:`encode_text`).
    """
    pieces = (
        [Piece(template.generation_prompt(turns, tokenizer), trainable=False)]
        if generation_prompt
        else template.render(turns, tokenizer)
    )
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if template.add_bos and bos is not None:
        ids.append(int(bos))
        labels.append(IGNORE_INDEX)
    started = False  # a BOS alone does not count: the first text is still tokenized as a sequence start
    for piece in pieces:
        for k, chunk in enumerate(piece.text.split(IMAGE_TOKEN)):
            if k > 0:  # an <image> stood before this chunk
                visual = [int(t) for t in image_ids(len(spans))]
                spans.append((len(ids), len(ids) + len(visual)))
                ids.extend(visual)
                labels.extend([IGNORE_INDEX] * len(visual))
                started = True
            chunk_ids = encode_text(tokenizer, chunk, at_start=not started, anchor=anchor)
            ids.extend(chunk_ids)
            labels.extend(chunk_ids if piece.trainable else [IGNORE_INDEX] * len(chunk_ids))
            started = started or bool(chunk_ids)
    return EncodedSample(ids, labels, spans)
