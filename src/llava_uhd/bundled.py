"""The model that ships inside the package: a small LLaVA-UHD trained here on the synthdoc task.

``ask``, ``batch`` and ``demo`` use it when no ``--model`` is given. How it was trained (the exact
commands, configs and seeds) is in docs/synthdoc.md; its measured accuracy in benchmarks/README.md.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from llava_uhd.errors import CheckpointError

BUNDLED_DIR = "synthdoc-model"


def bundled_model_dir() -> Path:
    """The folder of the bundled model (a ``save_pretrained`` folder with its tokenizer and processor)."""
    folder = Path(str(resources.files("llava_uhd") / "assets" / BUNDLED_DIR))
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"this installation has no bundled model ({folder} is missing); pass --model DIR"
        )
    return folder


def model_dir(given: str | Path | None) -> Path:
    """``--model``'s folder, or the bundled model's when none is given."""
    return bundled_model_dir() if given is None else Path(given)
