"""LLaVA-UHD: a large multimodal model that perceives images of any aspect ratio at high resolution.

The torch-free core (config, slicing, layout) is importable without torch; the model, processor and
training code import it lazily.
"""

from llava_uhd.config import PRESETS, Preset, SlicingConfig, get_preset
from llava_uhd.errors import LlavaUHDError
from llava_uhd.slicing import SlicePlan, plan_slices

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "LlavaUHDError",
    "Preset",
    "SlicePlan",
    "SlicingConfig",
    "__version__",
    "get_preset",
    "plan_slices",
]
