"""The synthdoc model's tokenizer: a small byte-level BPE trained offline on the task's own words.

A from-scratch language model learns a task's words far faster when each is one token (a character-level
vocabulary made count questions several times slower to learn); digits stay single tokens so that any
code is two tokens and no code needs a vocabulary entry of its own. Byte-level, so any text still encodes.
Trained deterministically on a corpus enumerated from the spec (every question, answer and caption form,
the conversation template's words), then saved with ``save_pretrained`` beside the model's weights.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Any

from llava_uhd.synth.synthdoc import (
    CAPTION_PROMPT,
    CODE_ALPHABET,
    COLOURS,
    code_question,
    colour_question,
    count_question,
)

VOCAB_SIZE = 500  # under the preset's 512 embedding rows, which leaves room for <image>
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def corpus(extra: tuple[str, ...] = ()) -> list[str]:
    """The training text: every question and answer form of synthdoc, the template's words and ``extra``."""
    from llava_uhd.templates import VICUNA_SYSTEM

    codes = ["".join(p) for p in product(CODE_ALPHABET, repeat=2)]
    lines = [VICUNA_SYSTEM, "USER: ASSISTANT:", CAPTION_PROMPT, count_question()]
    lines += [code_question(c) for c in COLOURS]
    lines += [colour_question(code) for code in codes]
    lines += [f"{colour} {code}, " for colour, code in product(COLOURS, codes)]
    lines += [str(n) for n in range(10)] + [",", "\n", ", ", " ,"]
    return lines + list(extra)


def build_tokenizer(extra_text: tuple[str, ...] = ()) -> Any:
    """A ``PreTrainedTokenizerFast`` trained on :func:`corpus` (same corpus, same tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # repeated so that the template's words win the merges over rare code pairs
    tokenizer.train_from_iterator(corpus(extra_text) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def save_tokenizer(folder: str | Path) -> Path:
    """Build the tokenizer and ``save_pretrained`` it into ``folder``; returns the folder."""
    path = Path(folder)
    build_tokenizer().save_pretrained(str(path))
    return path
