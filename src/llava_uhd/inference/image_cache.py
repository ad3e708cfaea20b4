"""Keep the LLM tokens of images already seen, so a repeated image skips decoding, slicing, ViT and resampler.

A chat resends its image every turn and many questions come about one picture; what the model needs from
the image is its plan (the token layout) and the resampler's output, (N, Q, D) for its N pieces. Both are a
function of the encoded bytes and the slicing settings alone, so :func:`image_key` hashes exactly those and
:class:`ImageFeatureCache` keeps the results, least recently used first out, within a bound in MiB of
feature memory. Thread-safe: request threads look up while the model thread inserts.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from llava_uhd.errors import ConfigError
from llava_uhd.slicing import SlicePlan

MIB = 1024 * 1024


@dataclass(frozen=True)
class ImageFeatures:
    """An image's plan and its pieces' LLM tokens (N, Q, D), pieces in the plan's order."""

    plan: SlicePlan
    features: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def image_key(data: bytes, settings: str) -> str:
    """The cache key of encoded image ``data`` read under ``settings`` (a text naming every option that
    changes the plan or the pixels: slicing config, resize mode, model)."""
    digest = hashlib.sha256(data)
    digest.update(b"\0" + settings.encode())
    return digest.hexdigest()


class ImageFeatureCache:
    """An LRU map from :func:`image_key` to :class:`ImageFeatures`, bounded by ``max_mib`` of features.

    ``max_mib`` 0 turns caching off (every lookup misses, nothing is kept). An entry larger than the whole
    bound is not kept. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, max_mib: float) -> None:
        if max_mib < 0:
            raise ConfigError(f"the image cache size must be >= 0 MiB, got {max_mib}")
        self.max_bytes = int(max_mib * MIB)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, *, count: bool = True) -> ImageFeatures | None:
        """The entry of ``key`` (now the most recently used), or None; counted as a hit or a miss unless
        ``count`` is False (a second look for the same request)."""
        with self._lock:
            entry = self._entries.get(key)
            if count:
                self.hits += entry is not None
                self.misses += entry is None
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: ImageFeatures) -> None:
        """Keep ``entry``, dropping the least recently used entries until the bound holds."""
        size = entry.nbytes
        with self._lock:
            if size > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[key] = entry
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= dropped.nbytes
