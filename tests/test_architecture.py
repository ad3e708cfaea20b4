"""Imports flow one way (docs/design.md section 8), checked statically over every module of the package.

Lazy imports inside functions count too: a dependency is a dependency wherever it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llava_uhd"

_ABOVE_PROCESSING = {
    "processing",
    "model",
    "data",
    "train",
    "inference",
    "eval",
    "cli",
    "commands",
    "auto",
    "serve",
}

# top-level part (or a dotted module below it) -> parts of llava_uhd it must never import
FORBIDDEN: dict[str, set[str]] = {
    "config": {"slicing", "layout", "budget", "templates", "tokens", "images", *_ABOVE_PROCESSING},
    "serialize": {
        "config",
        "slicing",
        "layout",
        "budget",
        "templates",
        "tokens",
        "images",
        *_ABOVE_PROCESSING,
    },
    "slicing": _ABOVE_PROCESSING,
    "layout": _ABOVE_PROCESSING,
    "budget": _ABOVE_PROCESSING,
    "templates": {"slicing", "layout", "budget", "tokens", "images", *_ABOVE_PROCESSING},
    "tokens": _ABOVE_PROCESSING,
    "images": _ABOVE_PROCESSING,
    "processing": {"model", "data", "train", "inference", "eval", "cli", "commands", "auto", "serve"},
    "model": {"processing", "data", "train", "inference", "eval", "cli", "commands", "auto", "serve"},
    "data": {"model", "train", "inference", "eval", "cli", "commands"},
    # inference prepares its inputs through the processor, as training does, never through data/
    "inference": {"data", "train", "cli", "commands", "serve"},
    "commands.ask": {"data", "train"},
    "commands.chat": {"data", "train"},
    # the server builds on inference only: no training data, no training code, no evaluation
    "serve": {"data", "train", "eval", "cli", "commands"},
    "commands.serve": {"data", "train", "eval"},
    "eval": {"train", "cli", "commands"},
    "tokenizers": {"processing", "model", "data", "train", "inference", "eval", "cli", "commands"},
    "train": {"cli", "commands"},
}
# the benchmark metrics and file scoring run without a model (`llava-uhd score`)
_METRIC_MODULES = ("eval.vqa", "eval.metrics", "eval.yesno", "eval.scoring", "commands.score")
FORBIDDEN.update(
    {name: {"model", "processing", "inference", "data", "synth", "auto", "train"} for name in _METRIC_MODULES}
)
TORCH_FREE = {"config", "serialize", "slicing", "layout", "budget", "templates", "tokens", "errors", "images"}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)


def _forbidden(path: Path) -> set[str]:
    """The parts a module must not import: its top-level part's rule and any rule for the module itself."""
    dotted = _dotted(path)
    rules = [parts for key, parts in FORBIDDEN.items() if dotted == key or dotted.startswith(key + ".")]
    return set().union(*rules)


def _imports(path: Path) -> set[str]:
    package = ".".join(("llava_uhd", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    return _imports_of(path.read_text(), package)


def _imports_of(source: str, package: str) -> set[str]:
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # resolve relative imports against the module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_import_collection_sees_lazy_and_relative_imports():
    source = "import torch\ndef f():\n    from ..processing import X\n    from . import vision\n"
    found = _imports_of(source, "llava_uhd.model")
    assert {"torch", "llava_uhd.processing", "llava_uhd.processing.X", "llava_uhd.model.vision"} <= found


def test_the_package_has_modules():
    assert {"config", "slicing", "layout", "templates", "tokens", "cli"} <= {_part(p) for p in MODULES}
    assert "commands.ask" in {_dotted(p) for p in MODULES}
    assert {"serve.app", "serve.engine", "commands.serve"} <= {_dotted(p) for p in MODULES}


def test_a_module_rule_adds_to_its_part_rule():
    ask = PACKAGE / "commands" / "ask.py"
    assert {"data", "train"} <= _forbidden(ask)
    assert _forbidden(PACKAGE / "commands" / "train.py") == set()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    part = _part(path)
    forbidden = _forbidden(path)
    bad = sorted(
        name for name in _imports(path) if name.startswith("llava_uhd.") and name.split(".")[1] in forbidden
    )
    assert not bad, f"{path.relative_to(PACKAGE)} ({part}) must not import {bad}"
    if part in TORCH_FREE or _dotted(path) in _METRIC_MODULES:
        torchy = sorted(
            n for n in _imports(path) if n.split(".")[0] in {"torch", "torchvision", "transformers"}
        )
        assert not torchy, f"{path.relative_to(PACKAGE)} must stay torch-free, imports {torchy}"
