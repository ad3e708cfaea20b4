"""LLaVA training data: records, datasets, collate and length-grouped sampling.

Samples are made by the processor (:meth:`~llava_uhd.processing.LlavaUHDProcessor.prepare`), the same
call inference uses; prompt templates live in :mod:`llava_uhd.templates`. Imports torch (the dataset and
collate build tensors); the model and inference never import this package.
"""

from llava_uhd.data.augment import AugmentConfig, augment_image
from llava_uhd.data.collate import LlavaCollator
from llava_uhd.data.conversation import Conversation, parse_record, truncate
from llava_uhd.data.dataset import LlavaDataset, SkipLog, load_records, read_skip_log
from llava_uhd.data.sampler import LengthGroupedSampler, padding_fraction, rank_batches

__all__ = [
    "AugmentConfig",
    "Conversation",
    "LengthGroupedSampler",
    "LlavaCollator",
    "LlavaDataset",
    "SkipLog",
    "augment_image",
    "load_records",
    "padding_fraction",
    "parse_record",
    "rank_batches",
    "read_skip_log",
    "truncate",
]
