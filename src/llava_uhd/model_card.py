"""The model card (``README.md``) of a saved folder, written from its preset: what the Hub shows.

It states what the folder computes: the slicing geometry (paper section 3.1), the visual tokens and
forward FLOPs at a few common image sizes (:mod:`llava_uhd.layout`, :mod:`llava_uhd.model.flops`, the
numbers ``llava-uhd plan --flops`` prints), the parts of the model and how to load it with transformers.
No torch here.
"""

from __future__ import annotations

from pathlib import Path

from llava_uhd import __version__
from llava_uhd.config import Preset
from llava_uhd.errors import ConfigError
from llava_uhd.layout import visual_token_count
from llava_uhd.model.flops import uhd_flops
from llava_uhd.slicing import plan_slices

CARD_FILE = "README.md"
# Image sizes (width, height) the card counts tokens and FLOPs for: the ViT's native square, photo and
# screen shapes, a portrait page.
CARD_SIZES = ((336, 336), (640, 480), (1024, 768), (1920, 1080), (672, 1008))


def _gflops(value: int) -> str:
    giga = value / 1e9
    return f"{giga:,.0f}" if giga >= 100 else f"{giga:.3g}"


def _token_rows(preset: Preset) -> list[str]:
    rows = []
    for width, height in CARD_SIZES:
        plan = plan_slices(width, height, preset.slicing)
        grid = f"{plan.grid.cols}x{plan.grid.rows}" if plan.num_slices else "none"
        tokens = visual_token_count(plan, preset.resampler.num_queries)
        try:
            flops = uhd_flops(preset, plan, text_tokens=0)
            counted = " | ".join(_gflops(flops[k]) for k in ("vit", "resampler", "llm", "total"))
        except ConfigError:  # a language model named by a path whose dimensions are not known offline
            counted = "n/a | n/a | n/a | n/a"
        rows.append(f"| {width}x{height} | {grid} | {plan.num_slices + 1} | {tokens} | {counted} |")
    return rows


def model_card(preset: Preset) -> str:
    """The card's Markdown, with the Hub's metadata block (library, pipeline tag) on top."""
    slicing, vision, resampler = preset.slicing, preset.vision, preset.resampler
    text = preset.text.name_or_path or f"{preset.text.config['model_type']} (inline config)"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- llava-uhd",
        "- image-text-to-text",
        "---",
        "",
        f"# LLaVA-UHD: preset `{preset.name}`",
        "",
        "A LLaVA-UHD model (arXiv 2403.11703): images of any aspect ratio are cut into variable-sized",
        "slices plus an overview, each piece is encoded by the ViT and compressed by a shared resampler,",
        f"and the language model reads the pieces in their spatial layout. Saved by llava-uhd {__version__};",
        f"conversation template `{preset.template}` (the folder's `chat_template.jinja`).",
        "",
        "## Use",
        "",
        "```python",
        "import llava_uhd.auto  # registers the model and processor with transformers' Auto classes",
        "from transformers import pipeline",
        "",
        'pipe = pipeline("image-text-to-text", model="THIS_FOLDER")',
        "messages = [",
        "    {",
        '        "role": "user",',
        '        "content": [',
        '            {"type": "image", "image": "page.png"},',
        '            {"type": "text", "text": "What is written here?"},',
        "        ],",
        "    }",
        "]",
        'print(pipe(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])',
        "```",
        "",
        "## Model",
        "",
        "| part | setting |",
        "| --- | --- |",
        f"| vision tower | width {vision.hidden_size}, {vision.num_layers} layers, patch {vision.patch_size}, "
        f"features of layer {vision.feature_layer} |",
        f"| resampler | {resampler.kind}, {resampler.num_queries} queries per piece |",
        f"| language model | {text} |",
        "",
        "## Slicing",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| scale resolution | {slicing.scale_resolution} |",
        f"| patch size | {slicing.patch_size} |",
        f"| max slices | {slicing.max_slices} |",
        f"| upscale small images | {slicing.upscale_small} |",
        f"| resize long side first to | {slicing.pre_resize_long_side or 'no'} |",
        "",
        "## Visual tokens and forward FLOPs per image",
        "",
        "Tokens: Q per piece plus a separator after each slice (one token each). GFLOPs of one forward pass over the",
        "image alone (no text), counted in closed form as `llava-uhd plan --flops` counts them.",
        "",
        "| image (W x H) | grid (cols x rows) | pieces | visual tokens | ViT | resampler | LLM | total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *_token_rows(preset),
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, preset: Preset) -> Path:
    """Write ``README.md`` into ``folder``; returns its path."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(preset), encoding="utf-8")
    return path
