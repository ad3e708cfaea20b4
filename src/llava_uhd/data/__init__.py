"""LLaVA training data: records, conversation templates, datasets, collate and length-grouped sampling.

Imports torch (the dataset and collate build tensors); the model never imports this package.
"""

from llava_uhd.data.augment import AugmentConfig, augment_image
from llava_uhd.data.collate import LlavaCollator, pad_token_id
from llava_uhd.data.conversation import (
    IGNORE_INDEX,
    Conversation,
    EncodedSample,
    encode_conversation,
    parse_record,
    truncate,
)
from llava_uhd.data.dataset import LlavaDataset, SkipLog, load_records, read_skip_log
from llava_uhd.data.sampler import LengthGroupedSampler, padding_fraction, rank_batches
from llava_uhd.data.templates import TEMPLATES, Piece, Turn, get_template

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "AugmentConfig",
    "Conversation",
    "EncodedSample",
    "LengthGroupedSampler",
    "LlavaCollator",
    "LlavaDataset",
    "Piece",
    "SkipLog",
    "Turn",
    "augment_image",
    "encode_conversation",
    "get_template",
    "load_records",
    "pad_token_id",
    "padding_fraction",
    "parse_record",
    "rank_batches",
    "read_skip_log",
    "truncate",
]
