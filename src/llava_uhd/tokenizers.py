"""Loading tokenizers: from a folder, checked (:func:`load_tokenizer_folder`), or built in by name.

Every tokenizer folder the package reads (a saved model, a released checkpoint, ``model.tokenizer``) goes
through :func:`load_tokenizer_folder`, so a missing or damaged file is one error naming the folder and the
file instead of a transformers traceback, or worse a tokenizer without a vocabulary that fails later.

Built-in tokenizers ship as data files inside PyPI packages, loaded by name without a hub download.
``builtin:llama-32k`` is the 32k Llama-2-format SentencePiece model that the mistral-common package ships
as ``data/tokenizer.model.v1``. The tiny preset's vocabulary (32000) matches it, so the CPU debug recipe
needs no model download. Only the file is read, so the package installs without its own requirements
(``pip install --no-deps mistral-common``). This module is the one place that knows where such files live.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_uhd.errors import ConfigError, TokenizerError

# What transformers raises for files it cannot use: missing (OSError), not JSON (ValueError), JSON of the
# wrong shape or with values of the wrong type (KeyError, TypeError, AttributeError), an empty unk_token
# (RecursionError: it looks the token up through itself). The tokenizers library raises a bare Exception
# for a tokenizer.json it cannot parse; see load_tokenizer_folder.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)
# The vocabulary files to name when the tokenizer class is unknown: those of fast and of Llama tokenizers.
_DEFAULT_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer_folder(folder: str | Path) -> Any:
    """The tokenizer saved in ``folder`` (``AutoTokenizer``), checked to have a vocabulary.

    Raises:
        TokenizerError: the folder does not exist, transformers cannot load a tokenizer from it, or what it
            loads holds its special tokens only (its vocabulary file is missing): one line naming the
            folder and the vocabulary files it lacks.
    """
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such tokenizer folder")
    try:
        with _without_model_type_notice():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer("a")  # a setting that breaks encoding (say a model_max_length of "x") fails here
        specials = len(set(tokenizer.all_special_ids))
    except Exception as exc:
        if not isinstance(exc, _LOAD_ERRORS) and type(exc) is not Exception:
            raise
        lacking = _lacking(path, None)  # the usual cause, and clearer than what transformers says then
        reason = lacking or f" ({' '.join(str(exc).split()) or type(exc).__name__})"
        raise TokenizerError(f"{path}: cannot load the tokenizer{reason}") from None
    if len(tokenizer) <= specials:
        raise TokenizerError(
            f"{path}: the tokenizer holds its {len(tokenizer)} special tokens and no vocabulary"
            f"{_lacking(path, type(tokenizer))}"
        )
    return tokenizer


def _lacking(folder: Path, tokenizer_class: type | None) -> str:
    """``": no tokenizer.json or tokenizer.model"`` when none of the class's vocabulary files is there."""
    if tokenizer_class is None:
        tokenizer_class = _saved_tokenizer_class(folder)
    files = tuple(getattr(tokenizer_class, "vocab_files_names", {}).values()) or _DEFAULT_VOCABULARY_FILES
    if any((folder / name).is_file() for name in files):
        return ""
    return f": no {' or '.join(files)}"


def _saved_tokenizer_class(folder: Path) -> type | None:
    """The class ``tokenizer_config.json`` names, when it names one transformers knows."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        name = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get(
            "tokenizer_class"
        )
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not an object
        return None
    return tokenizer_class_from_name(name) if isinstance(name, str) else None


class _DropModelTypeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "to instantiate a model of type" not in record.getMessage()


@contextmanager
def _without_model_type_notice() -> Iterator[None]:
    """Silence the notice transformers logs when a tokenizer folder's config.json is of a model type it does
    not know (a released LLaVA checkpoint's ``llava_llama``): it concerns models, not the tokenizer."""
    config_logger = logging.getLogger("transformers.configuration_utils")
    notice = _DropModelTypeNotice()
    config_logger.addFilter(notice)
    try:
        yield
    finally:
        config_logger.removeFilter(notice)


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
