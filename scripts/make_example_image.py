"""Generate the bundled example image (src/llava_uhd/assets/example.jpg): a synthetic 1280x800 scene.

A desk-like scene with a title, a paragraph of small text, coloured boxes, circles and a bar chart:
fine detail (12-16 px glyphs) that only the high-resolution slices resolve, so the slice picture shows
what slicing buys. Deterministic for a given seed; the benchmark reuses :func:`draw_scene` at other sizes.

    .venv/bin/python scripts/make_example_image.py            # rewrites the bundled asset
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ASSET = Path(__file__).resolve().parents[1] / "src" / "llava_uhd" / "assets" / "example.jpg"
SIZE = (1280, 800)
JPEG_QUALITY = 88
PALETTE = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (181, 137, 0), (108, 113, 196), (42, 161, 152)]
TEXT = (
    "LLaVA-UHD cuts a high-resolution image into variable-sized slices whose area and aspect ratio stay "
    "close to the vision encoder's pre-training setting, compresses each slice to a fixed number of "
    "tokens, and tells the language model where every slice sits with a spatial schema of commas and "
    "newlines. Small text like this paragraph is only legible in the slices, not in the overview."
)


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(name, size)
    except OSError:  # DejaVu not installed: Pillow's bundled font still renders at any size
        return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line]


def draw_scene(width: int = SIZE[0], height: int = SIZE[1], seed: int = 0) -> Image.Image:
    """A synthetic RGB scene with text, boxes and a chart, laid out relative to ``width`` x ``height``."""
    rng = random.Random(seed)
    unit = min(width, height) / 800  # every length below is in units of an 800-pixel short side
    image = Image.new("RGB", (width, height), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    for y in range(0, height, max(int(40 * unit), 2)):  # faint ruled lines, like paper
        draw.line([(0, y), (width, y)], fill=(225, 230, 240), width=1)
    margin = int(40 * unit)
    draw.text(
        (margin, margin),
        "What the model sees",
        fill=(20, 20, 20),
        font=_font(max(int(48 * unit), 8), bold=True),
    )
    body = _font(max(int(16 * unit), 6))
    column = int(width * 0.45)
    y = margin + int(80 * unit)
    for line in _wrap(draw, TEXT, body, column):
        draw.text((margin, y), line, fill=(40, 40, 40), font=body)
        y += int(22 * unit)
    for i in range(8):  # boxes and circles with labels
        colour = PALETTE[i % len(PALETTE)]
        x0 = int(width * 0.55 + (i % 4) * width * 0.105)
        y0 = int(height * 0.12 + (i // 4) * height * 0.2)
        box = [x0, y0, x0 + int(width * 0.08), y0 + int(height * 0.12)]
        if i % 2:
            draw.ellipse(box, fill=colour, outline=(0, 0, 0), width=max(int(2 * unit), 1))
        else:
            draw.rectangle(box, fill=colour, outline=(0, 0, 0), width=max(int(2 * unit), 1))
        draw.text((x0, box[3] + int(6 * unit)), f"item {i + 1}", fill=(0, 0, 0), font=body)
    chart_top, chart_bottom = int(height * 0.58), int(height * 0.92)
    draw.line(
        [(margin, chart_bottom), (width - margin, chart_bottom)], fill=(0, 0, 0), width=max(int(2 * unit), 1)
    )
    bars = 12
    step = (width - 2 * margin) / bars
    for i in range(bars):
        value = rng.uniform(0.15, 1.0)
        x0 = int(margin + i * step + step * 0.15)
        top = int(chart_bottom - value * (chart_bottom - chart_top))
        draw.rectangle([x0, top, int(x0 + step * 0.7), chart_bottom], fill=PALETTE[i % len(PALETTE)])
        draw.text((x0, top - int(20 * unit)), f"{value * 100:.0f}", fill=(0, 0, 0), font=body)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw_scene(*SIZE).save(args.out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
