"""The package metadata says the truth: every third-party import is a declared requirement, every
requirement is used, and every package-data pattern ships a file."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "llava_uhd"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution name, where the two differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "lmms_eval": "lmms-eval"}
# imported only after checking that they work (model/roi_align.py, model/attention.py): not required
OPTIONAL = {"torchvision", "flash_attn"}
# required but imported by no module: transformers converts SentencePiece tokenizer files with them
INDIRECT = {"sentencepiece", "protobuf"}
TOOLS = {"ruff"}


def _requirements(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() for spec in specs}


CORE = _requirements(PROJECT["project"]["dependencies"])
EXTRAS = {name: _requirements(specs) for name, specs in PROJECT["project"]["optional-dependencies"].items()}


def _third_party(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {"llava_uhd"} | {path.stem for path in files}  # tests import each other by module name
    return {
        DISTRIBUTION.get(name, name).lower()
        for name in names
        if name not in sys.stdlib_module_names and name not in local
    }


LIBRARY = _third_party(
    [
        p
        for p in PACKAGE.rglob("*.py")
        if not {"train", "serve"} & set(p.relative_to(PACKAGE).parts)
        and p != PACKAGE / "commands" / "serve.py"
    ]
)
TRAINING = _third_party(sorted((PACKAGE / "train").rglob("*.py")))
SERVING = _third_party(sorted((PACKAGE / "serve").rglob("*.py")) + [PACKAGE / "commands" / "serve.py"])
TESTS = _third_party(sorted((ROOT / "tests").glob("*.py")))


def test_imports_are_declared() -> None:
    # eval/lmms_eval_model.py is the lmms-eval plugin: imported by lmms-eval only, extra [eval]
    # model/quantization.py imports torchao lazily for int8, extra [quant]
    library_may_use = CORE | EXTRAS["eval"] | EXTRAS["quant"]
    assert not LIBRARY - OPTIONAL - library_may_use, "the library imports packages it does not require"
    assert not TRAINING - OPTIONAL - CORE - EXTRAS["train"], "train/ imports packages outside core + [train]"
    assert not SERVING - OPTIONAL - CORE - EXTRAS["serve"], "serve/ imports packages outside core + [serve]"
    tests_may_use = (
        CORE | EXTRAS["train"] | EXTRAS["dev"] | EXTRAS["serve"] | EXTRAS["quant"] | EXTRAS["eval"]
    )
    assert not TESTS - OPTIONAL - tests_may_use, "tests import undeclared packages"


def test_every_requirement_is_used() -> None:
    assert not CORE - LIBRARY - TRAINING - INDIRECT
    # no extra that installs nothing or serves code that is not here
    assert set(EXTRAS) == {"train", "dev", "eval", "serve", "quant"}
    assert not EXTRAS["quant"] - LIBRARY
    assert not EXTRAS["train"] - TRAINING
    assert not EXTRAS["eval"] - LIBRARY
    assert not EXTRAS["serve"] - SERVING
    assert not EXTRAS["dev"] - TOOLS - TESTS


def test_package_data_patterns_match_files() -> None:
    for package, patterns in PROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / "src" / package).glob(pattern)), f"{package}: {pattern} matches no file"
