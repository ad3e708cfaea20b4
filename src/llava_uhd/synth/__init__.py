"""Synthetic high-resolution data for tests, the debug-cpu training config and demos."""

from llava_uhd.synth.dataset import SynthDataset, caption, make_dataset, questions
from llava_uhd.synth.scenes import Scene, Shape, make_scene, render_scene

__all__ = [
    "Scene",
    "Shape",
    "SynthDataset",
    "caption",
    "make_dataset",
    "make_scene",
    "questions",
    "render_scene",
]
