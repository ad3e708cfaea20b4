"""Import boundaries (docs/design.md section 8): the torch-free core runs with torch blocked, and no module
imports across the one-way flow config -> slicing/layout -> processing -> data -> train.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llava_uhd"

TORCH_FREE = [
    "llava_uhd",
    "llava_uhd.config",
    "llava_uhd.serialize",
    "llava_uhd.errors",
    "llava_uhd.slicing",
    "llava_uhd.layout",
    "llava_uhd.budget",
    "llava_uhd.templates",
    "llava_uhd.chat_template",
    "llava_uhd.tokens",
    "llava_uhd.images",
    "llava_uhd.visualize",
    "llava_uhd.cli",
    "llava_uhd.commands.plan",
    "llava_uhd.commands.slice",
    "llava_uhd.commands.demo",
]

# A finder that makes `import torch` (and torchvision, transformers: they pull torch) fail loudly.
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "transformers"):
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def _run_blocked(body: str) -> subprocess.CompletedProcess[str]:
    code = BLOCK_TORCH + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_blocker_really_blocks_torch() -> None:
    result = _run_blocked("import torch\n")
    assert result.returncode != 0 and "blocked for this test: torch" in result.stderr


def test_torch_free_modules_import_and_plan_runs_without_torch(tmp_path: Path) -> None:
    image = tmp_path / "pic.png"
    body = f"""
    import importlib
    for name in {TORCH_FREE!r}:
        importlib.import_module(name)
    from PIL import Image
    Image.new("RGB", (900, 600), (200, 30, 30)).save({str(image)!r})
    from llava_uhd.cli import main
    assert main(["plan", "640x480"]) == 0
    assert main(["plan", "--json", {str(image)!r}]) == 0
    assert main(["slice", {str(image)!r}, "--out", {str(tmp_path / "seen.png")!r}]) == 0
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    print("TORCH-FREE OK")
    """
    result = _run_blocked(body)
    assert result.returncode == 0, result.stderr
    assert "TORCH-FREE OK" in result.stdout
    assert "640x480: 2x2 grid (cols x rows), slices 378x280, overview 378x280" in result.stdout
    assert '"width": 900, "height": 600' in result.stdout


# importer (package prefix) -> packages it must never import
FORBIDDEN = {
    "llava_uhd.config": ("torch", "llava_uhd.slicing", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.serialize": ("torch", "llava_uhd.config", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.slicing": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.layout": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.budget": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.templates": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.tokens": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.chat_template": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.image_processing": (
        "llava_uhd.processing",
        "llava_uhd.model",
        "llava_uhd.data",
        "llava_uhd.train",
    ),
    "llava_uhd.images": ("torch", "llava_uhd.processing", "llava_uhd.model"),
    "llava_uhd.pixels": ("llava_uhd.model", "llava_uhd.data", "llava_uhd.train", "llava_uhd.inference"),
    "llava_uhd.processing": ("llava_uhd.model", "llava_uhd.data", "llava_uhd.train", "llava_uhd.inference"),
    "llava_uhd.model": (
        "llava_uhd.processing",
        "llava_uhd.data",
        "llava_uhd.train",
        "llava_uhd.inference",
        "llava_uhd.eval",
    ),
    "llava_uhd.data": ("llava_uhd.train", "llava_uhd.inference", "llava_uhd.eval"),
    "llava_uhd.inference": ("llava_uhd.train", "llava_uhd.data"),
    "llava_uhd.commands.ask": ("llava_uhd.train", "llava_uhd.data"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module a file imports, anywhere in it (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def _violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for importer, forbidden in FORBIDDEN.items():
            if module != importer and not module.startswith(importer + "."):
                continue
            for name in _imports(path):
                if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                    found.append(f"{module} imports {name}")
    return found


def test_one_way_import_flow() -> None:
    assert _violations() == []


def test_inference_and_ask_load_no_training_code() -> None:
    """The whole import closure of `ask`'s path, lazy imports included once run() would make them."""
    code = """
import sys
import llava_uhd.auto, llava_uhd.commands.ask, llava_uhd.inference
loaded = sorted(m for m in sys.modules if m.startswith(("llava_uhd.data", "llava_uhd.train")))
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_the_checker_catches_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "llava_uhd"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("def f():\n    from llava_uhd.processing import X\n")
    (fake / "images.py").write_text("import torch.nn\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == [
        "llava_uhd.images imports torch.nn",
        "llava_uhd.model.bad imports llava_uhd.processing",
    ]
