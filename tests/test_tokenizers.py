"""Built-in tokenizers: shipped as data files inside PyPI packages, read through one helper."""

from __future__ import annotations

import importlib.util
import re

import pytest

from llava_uhd.errors import ConfigError, TokenizerError
from llava_uhd.tokenizers import BUILTIN_TOKENIZERS, builtin_tokenizer, load_tokenizer_folder

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


# --- tokenizer folders -----------------------------------------------------------------------------


@pytest.fixture
def saved(llama_tokenizer, tmp_path):
    folder = tmp_path / "tokenizer"
    llama_tokenizer.save_pretrained(str(folder))
    return folder


def test_a_tokenizer_folder_loads_as_saved(saved, llama_tokenizer) -> None:
    assert load_tokenizer_folder(saved)(TEXT).input_ids == llama_tokenizer(TEXT).input_ids


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # transformers 5 builds a Llama tokenizer of its 3 special tokens from tokenizer_config.json alone
        (
            lambda f: (f / "tokenizer.json").unlink(),
            r"the tokenizer holds its 3 special tokens and no vocabulary: no tokenizer",
        ),
        (
            lambda f: [p.unlink() for p in f.iterdir()],
            r"cannot load the tokenizer: no tokenizer.json or tokenizer.model",
        ),
        (
            lambda f: (f / "tokenizer.json").write_text("{oops"),
            r"cannot load the tokenizer \(Expecting property",
        ),
        (
            lambda f: (f / "tokenizer.json").write_text(
                '{"version": "1.0", "added_tokens": [], "model": {"type": "X"}}'
            ),
            r"cannot load the tokenizer \(data did not match",
        ),
    ],
)
def test_a_damaged_tokenizer_folder_is_one_line_naming_it(saved, damage, message) -> None:
    damage(saved)
    with pytest.raises(TokenizerError, match=rf"^{re.escape(str(saved))}: {message}") as info:
        load_tokenizer_folder(saved)
    assert "\n" not in str(info.value)
    with pytest.raises(TokenizerError, match="no such tokenizer folder"):
        load_tokenizer_folder(saved / "nope")
