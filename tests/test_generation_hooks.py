"""The transformers generation hooks the model overrides are still called, with the arguments they rely on.

``LlavaUHDForConditionalGeneration`` overrides two hooks of ``GenerationMixin`` that transformers does not
document as public API: ``prepare_inputs_for_generation`` (images go to the prefill step only, told apart by
``is_first_iteration``) and ``_expand_inputs_for_generation`` (beam search repeats each row's pieces as
blocks). A renamed hook or argument would not fail loudly: generation would fall back to the default and
drop or scramble the images. These tests spy on the hooks during real ``generate`` calls.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from transformers import GenerationMixin

from test_model import GREEDY, _generation_batch, make_model, tokenizer  # noqa: F401


def _spy(monkeypatch: pytest.MonkeyPatch, model: Any, name: str) -> list[tuple[dict[str, Any], Any]]:
    """Record (keyword arguments, result) of every call of ``model.<name>``."""
    calls: list[tuple[dict[str, Any], Any]] = []
    hook = getattr(model, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(hook).bind(*args, **kwargs)
        result = hook(*args, **kwargs)
        calls.append((dict(bound.arguments), result))
        return result

    monkeypatch.setattr(model, name, spy)
    return calls


def test_the_overridden_hooks_exist_in_generation_mixin() -> None:
    prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert "is_first_iteration" in prepare
    expand = inspect.signature(GenerationMixin._expand_inputs_for_generation).parameters
    assert {"expand_size", "is_encoder_decoder", "input_ids"} <= set(expand)


@pytest.mark.parametrize("use_cache", [True, False])
def test_images_reach_the_prefill_step_only_when_caching(tokenizer, monkeypatch, use_cache: bool) -> None:  # noqa: F811
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    calls = _spy(monkeypatch, model, "prepare_inputs_for_generation")
    model.generate(**batch, **GREEDY, use_cache=use_cache)
    assert len(calls) == GREEDY["max_new_tokens"]
    first = [kwargs.get("is_first_iteration", False) for kwargs, _ in calls]  # later steps leave the default
    assert first == [True] + [False] * (len(calls) - 1)
    with_images = [inputs.get("pixel_values") is not None for _, inputs in calls]
    assert with_images == ([True] + [not use_cache] * (len(calls) - 1))
    assert torch.equal(calls[0][1]["pixel_values"], batch["pixel_values"])
    assert "pieces_per_image" not in calls[0][1]


def test_beam_search_expands_through_the_override(tokenizer, monkeypatch) -> None:  # noqa: F811
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    calls = _spy(monkeypatch, model, "_expand_inputs_for_generation")
    model.generate(**batch, max_new_tokens=2, num_beams=3, pad_token_id=GREEDY["pad_token_id"])
    expanded = [(kwargs, result) for kwargs, result in calls if kwargs.get("expand_size") == 3]
    assert len(expanded) == 1
    _, (input_ids, model_kwargs) = expanded[0]
    assert input_ids.shape[0] == 3 * batch["input_ids"].shape[0]
    pieces = batch["piece_grids"].shape[0]
    assert model_kwargs["piece_grids"].shape[0] == 3 * pieces
    assert model_kwargs["pixel_values"].shape[0] == 3 * batch["pixel_values"].shape[0]
