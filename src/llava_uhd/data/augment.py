"""Training-time image augmentations, all off by default.

What the released code does: LLaVA-UHD's training ``__getitem__`` (thunlp/LLaVA-UHD,
``llava_uhd/train/llava-uhd/train.py``) opens the image, converts it to RGB and slices it; there is no
random crop, flip or colour jitter, and LLaVA-1.5's only image option (``image_aspect_ratio="pad"``) is
not used by the slicing path. Training with the defaults here therefore matches the release.

The options below are honest extras for small-data runs. They act on the whole image *before* planning,
so the slice grid changes with them (the model sees the image at other resolutions and aspect ratios,
which is what modularization has to generalise over, paper section 3.1). They never flip: text and
left/right questions would turn false.

* ``scale_range=(lo, hi)``: resize the image by a factor drawn log-uniformly from ``[lo, hi]``.
* ``aspect_jitter=a``: additionally multiply the width by ``exp(u)`` and divide the height by it, with
  ``u`` uniform in ``[-a, a]`` (area kept).
* ``crop_fraction=f``: with probability ``crop_prob``, crop a random window keeping at least a fraction ``f``
  of each side.

Randomness comes only from the ``random.Random`` passed in, which the dataset seeds from (seed, epoch,
index), so a sample is augmented identically in any worker and after a resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from llava_uhd.errors import ConfigError

_MIN_SIDE = 1  # never produce an empty image


@dataclass(frozen=True)
class AugmentConfig:
    """Random resize / aspect jitter / crop before slicing; the defaults do nothing (the released recipe)."""

    scale_range: tuple[float, float] = (1.0, 1.0)
    aspect_jitter: float = 0.0
    crop_fraction: float = 1.0
    crop_prob: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"augment scale_range must satisfy 0 < lo <= hi, got {self.scale_range!r}")
        if self.aspect_jitter < 0:
            raise ConfigError(f"augment aspect_jitter must be >= 0, got {self.aspect_jitter!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"augment crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        if not 0 <= self.crop_prob <= 1:
            raise ConfigError(f"augment crop_prob must be in [0, 1], got {self.crop_prob!r}")

    @property
    def enabled(self) -> bool:
        return self.scale_range != (1.0, 1.0) or self.aspect_jitter > 0 or self.crop_prob > 0


def augment_image(image: Image.Image, config: AugmentConfig, rng: random.Random) -> Image.Image:
    """Apply ``config`` to an RGB image with randomness from ``rng``; the identity when nothing is enabled."""
    if not config.enabled:
        return image
    if config.crop_prob > 0 and rng.random() < config.crop_prob:
        w, h = image.size
        cw = max(_MIN_SIDE, round(w * rng.uniform(config.crop_fraction, 1.0)))
        ch = max(_MIN_SIDE, round(h * rng.uniform(config.crop_fraction, 1.0)))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = image.crop((left, top, left + cw, top + ch))
    lo, hi = config.scale_range
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    stretch = math.exp(rng.uniform(-config.aspect_jitter, config.aspect_jitter))
    w, h = image.size
    size = (max(_MIN_SIDE, round(w * scale * stretch)), max(_MIN_SIDE, round(h * scale / stretch)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
