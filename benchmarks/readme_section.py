"""Rewrite one benchmark's section of benchmarks/README.md, leaving the other sections as they are."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).with_name("README.md")


def write_section(heading: str, body: str, readme: Path = README) -> None:
    """Replace the text under ``heading`` (up to the next ``## `` heading) with ``body``; append if absent."""
    text = readme.read_text()
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.DOTALL)
    if not pattern.search(text):
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    readme.write_text(pattern.sub(lambda _: f"{heading}\n\n{body.strip()}\n", text, count=1))
