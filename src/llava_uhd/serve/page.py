"""The web page at ``/``: one self-contained HTML file (inline CSS and JS, no external assets, no build).

It sends the picked image to ``/v1/plan`` to draw the slice grid the model will use, then asks through
``/v1/chat/completions`` with ``stream: true`` like any OpenAI client, keeping the conversation (the
image stays in the turn it was sent with).
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def page_html() -> str:
    """The page's HTML, read once from the package."""
    return (resources.files("llava_uhd.serve") / "static" / "index.html").read_text(encoding="utf-8")
