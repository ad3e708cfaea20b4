"""Inference: answering questions about images with a saved model (generation, batches, chat, streaming).

Inputs come from the processor's :meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare`, as in training;
nothing here imports the training data or training code. Load a model folder with
:func:`llava_uhd.auto.load_pretrained`.
"""

from llava_uhd.inference.chat import ChatSession
from llava_uhd.inference.generate import (
    GenerationOptions,
    answer,
    build_prompt,
    prompt_inputs,
    question_turns,
)
from llava_uhd.inference.streaming import TextStream

__all__ = [
    "ChatSession",
    "GenerationOptions",
    "TextStream",
    "answer",
    "build_prompt",
    "prompt_inputs",
    "question_turns",
]
