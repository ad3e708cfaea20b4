"""lmms-eval's ``llava_uhd`` model: :class:`~llava_uhd.eval.harness.HarnessModel` as an lmms-eval ``lmms``.

Imported by lmms-eval (extra ``eval``) through the ``lmms_eval.models`` entry point of this package, so

    lmms-eval --model llava_uhd --model_args pretrained=DIR --tasks textvqa_val

runs without further set-up; importing it without lmms-eval installed is an error.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from llava_uhd.errors import EvalInputError
from llava_uhd.eval.harness import HarnessModel


class LlavaUHDLmms(HarnessModel, lmms):
    """The harness model with lmms-eval's base class (its rank, world size and cache hooks)."""

    def __init__(self, pretrained: str | None = None, **model_args: Any) -> None:
        lmms.__init__(self)
        HarnessModel.__init__(self, pretrained, **model_args)

    def generate_until_multi_round(self, requests: Any) -> list[str]:
        raise EvalInputError("llava_uhd answers one round per request; multi-round tasks are not supported")


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads: the model id and where its class lives."""
    return ModelManifest(model_id="llava_uhd", simple_class_path=f"{__name__}.LlavaUHDLmms")
