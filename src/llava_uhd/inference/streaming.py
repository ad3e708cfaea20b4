"""Text as it is generated: a ``generate`` streamer that hands out the answer piece by piece.

:class:`TextStream` decodes all the tokens so far at every step and hands on only what is new, so the
pieces join to exactly the text that decoding the finished answer gives (what
:func:`~llava_uhd.inference.generate.generate_text` returns). Two things are held back until later
tokens settle them: an incomplete UTF-8 character (a byte-level token decodes to U+FFFD until its last
byte arrives) and trailing whitespace (the finished answer is stripped; a space is only text once
something follows it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

# What a tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT_CHARACTER = "\ufffd"


class TextStream(BaseStreamer):
    """A streamer for ``model.generate(..., streamer=...)`` of one sequence (greedy or sampling).

    Args:
        tokenizer: decodes the new tokens (special tokens dropped, as generation does).
        on_text: called with each new piece of text, in order.

    ``text`` is everything handed on so far; after ``generate`` returns it is the whole answer.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.text = ""
        self._ids: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """New token ids: (1, T) the prompt (the first call, skipped), then (1,) or (1, 1) per step."""
        if not self._prompt_seen:  # generate first puts the prompt's ids
            self._prompt_seen = True
            return
        self._ids.extend(value.reshape(-1).tolist())
        decoded = self._decoded()
        if not decoded.endswith(REPLACEMENT_CHARACTER):
            self._hand_on(decoded)

    def end(self) -> None:
        """Generation is over: hand on whatever was held back."""
        self._hand_on(self._decoded())

    def _decoded(self) -> str:
        return self.tokenizer.decode(self._ids, skip_special_tokens=True).strip()

    def _hand_on(self, decoded: str) -> None:
        # decoding more tokens only appends to the text for the tokenizers here; if one ever rewrote
        # earlier text, the difference waits until the text agrees again
        if decoded.startswith(self.text) and len(decoded) > len(self.text):
            piece = decoded[len(self.text) :]
            self.text = decoded
            self.on_text(piece)
