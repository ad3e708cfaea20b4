"""Typed errors. Every failure the user can cause is one of these, with the offending input named."""

from __future__ import annotations


class LlavaUHDError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(LlavaUHDError, ValueError):
    """A configuration value, preset name or YAML file is invalid."""


class ImageSizeError(LlavaUHDError, ValueError):
    """An image size cannot be planned (a side of 0 pixels, not an integer, ...)."""


class PlanLimitError(LlavaUHDError, ValueError):
    """A plan exceeds a configured safety limit (ViT patches, image pixels)."""


class ImageLoadError(LlavaUHDError, ValueError):
    """An image input cannot be read: missing, a directory, empty, truncated, not an image, too large."""


class TokenBudgetError(LlavaUHDError, ValueError):
    """The visual-token budget of a request cannot hold even the minimum layout of its images."""


class ModelInputError(LlavaUHDError, ValueError):
    """A tensor given to the model has the wrong shape, dtype or values (pixel_values, piece_grids, ...)."""


class PlaceholderMismatchError(ModelInputError):
    """The number of image placeholders in the text disagrees with the visual features."""


class TokenizerError(LlavaUHDError, ValueError):
    """A tokenizer folder cannot be loaded: missing, unreadable or damaged files, or no vocabulary."""


class BadSampleError(LlavaUHDError, ValueError):
    """A training record cannot be used (missing or corrupt image, malformed turns, image-count mismatch,
    visual block longer than ``max_length``). Carries the record's ``sample_id`` and the ``reason``."""

    def __init__(self, sample_id: str, reason: str) -> None:
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class CheckpointError(LlavaUHDError, ValueError):
    """Weights or a training checkpoint cannot be read or do not fit: missing or unexpected keys, wrong
    shapes, no files, an incomplete checkpoint, or one saved with another world size or batch geometry."""


class EvalInputError(LlavaUHDError, ValueError):
    """Benchmark data or predictions cannot be scored: a malformed or unreadable file, a repeated id, a
    field a metric needs missing or of the wrong kind (e.g. a VQA question without exactly ten answers)."""
