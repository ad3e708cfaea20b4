"""Built-in tokenizers: shipped as data files inside PyPI packages, read through one helper."""

from __future__ import annotations

import importlib.util

import pytest

from llava_uhd.errors import ConfigError
from llava_uhd.tokenizers import BUILTIN_TOKENIZERS, builtin_tokenizer

TEXT = "USER: What does the sign say?\nASSISTANT: 12 apples, 3 pears."


def test_llama_32k_is_the_sentencepiece_model_of_mistral_common(llama_tokenizer) -> None:
    tokenizer = builtin_tokenizer("builtin:llama-32k")
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer(TEXT).input_ids == llama_tokenizer(TEXT).input_ids


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown built-in tokenizer 'builtin:nope'; choose one of \['builtin:llama-32k'\]"
    ):
        builtin_tokenizer("builtin:nope")


def test_missing_package_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = BUILTIN_TOKENIZERS["builtin:llama-32k"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == entry.module else real(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=r"needs the package 'mistral-common', which is not installed \(pip install --no-deps mistral-common\)",
    ):
        builtin_tokenizer("builtin:llama-32k")
