"""Inference: answering questions about images with a saved model (generation, later chat and serving)."""

from llava_uhd.inference.generate import GenerationOptions, answer, build_prompt, load_model_and_processor

__all__ = ["GenerationOptions", "answer", "build_prompt", "load_model_and_processor"]
