"""Inference: answering questions about images with a saved model (generation, later chat and serving).

Inputs come from the processor's :meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare`, as in training;
nothing here imports the training data or training code. Load a model folder with
:func:`llava_uhd.auto.load_pretrained`.
"""

from llava_uhd.inference.generate import (
    GenerationOptions,
    answer,
    build_prompt,
    prompt_inputs,
    question_turns,
)

__all__ = ["GenerationOptions", "answer", "build_prompt", "prompt_inputs", "question_turns"]
