"""A picture of what the model sees (``llava-uhd slice``): Pillow only, no torch.

The picture has four parts, top to bottom: a header with the plan in words; the input image with the
slice grid drawn on it next to the overview as fed to the ViT; every slice as fed, in its grid position,
with its size and patch grid; and the LLM token layout line (paper section 3.3) with the counts.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from llava_uhd.layout import layout_string, visual_token_count
from llava_uhd.slicing import SlicePlan, apply_plan, refine_image

CANVAS_WIDTH = 1400
MARGIN = 24
GAP = 12
SOURCE_PANEL_WIDTH = 760  # the input image with its grid takes the left part of the first row
FONT_SIZE = 18
SMALL_FONT_SIZE = 14
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID_COLOUR = (230, 30, 30)
PATCH_COLOUR = (0, 70, 200, 80)  # visible on white paper and on colour alike
CAPTION_GAP = 4


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:  # DejaVu missing: Pillow's bundled font renders at any size
        return ImageFont.load_default(size=size)


def _fit(image: Image.Image, max_width: int, max_height: int) -> Image.Image:
    scale = min(max_width / image.width, max_height / image.height)
    size = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
    return image.resize(size, Image.Resampling.BICUBIC)


def _with_patch_grid(piece: Image.Image, patch: int, scale: float) -> Image.Image:
    """The piece scaled by ``scale`` with a faint line every ``patch`` source pixels."""
    size = (max(round(piece.width * scale), 1), max(round(piece.height * scale), 1))
    shown = piece.resize(size, Image.Resampling.BICUBIC).convert("RGBA")
    overlay = Image.new("RGBA", shown.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for x in range(0, piece.width + 1, patch):
        draw.line([(x * scale, 0), (x * scale, shown.height)], fill=PATCH_COLOUR)
    for y in range(0, piece.height + 1, patch):
        draw.line([(0, y * scale), (shown.width, y * scale)], fill=PATCH_COLOUR)
    return Image.alpha_composite(shown, overlay).convert("RGB")


def _grid_on_source(image: Image.Image, plan: SlicePlan, max_width: int, max_height: int) -> Image.Image:
    shown = _fit(image, max_width, max_height)
    if plan.grid is None:
        return shown
    draw = ImageDraw.Draw(shown)
    font = _font(FONT_SIZE, bold=True)
    cell_w, cell_h = shown.width / plan.grid.cols, shown.height / plan.grid.rows
    for c in range(1, plan.grid.cols):
        draw.line([(c * cell_w, 0), (c * cell_w, shown.height)], fill=GRID_COLOUR, width=3)
    for r in range(1, plan.grid.rows):
        draw.line([(0, r * cell_h), (shown.width, r * cell_h)], fill=GRID_COLOUR, width=3)
    draw.rectangle([0, 0, shown.width - 1, shown.height - 1], outline=GRID_COLOUR, width=3)
    for i in range(plan.num_slices):
        r, c = divmod(i, plan.grid.cols)
        draw.text(
            (c * cell_w + 6, r * cell_h + 4),
            f"s{i + 1}",
            fill=GRID_COLOUR,
            font=font,
            stroke_width=2,
            stroke_fill=BACKGROUND,
        )
    return shown


def _caption(piece: Image.Image, patch: int, name: str) -> str:
    return f"{name} {piece.width}x{piece.height} px, {piece.width // patch}x{piece.height // patch} patches (cols x rows)"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line]


def render_plan(image: Image.Image, plan: SlicePlan, num_queries: int, title: str = "") -> Image.Image:
    """Draw ``image`` (RGB, at the plan's size), its slices and overview as fed, and the token layout."""
    slices, overview = apply_plan(image, plan)
    patch = plan.patch_size
    font, small, bold = _font(FONT_SIZE), _font(SMALL_FONT_SIZE), _font(FONT_SIZE, bold=True)
    inner = CANVAS_WIDTH - 2 * MARGIN
    line_height = FONT_SIZE + 8

    shown_source = image
    if plan.letterbox is not None:  # anyres: the grid cuts the padded canvas, not the image itself
        planned = (
            image if plan.pre_resized is None else image.resize(plan.pre_resized, Image.Resampling.BICUBIC)
        )
        shown_source = refine_image(planned, plan)
    source = _grid_on_source(shown_source, plan, SOURCE_PANEL_WIDTH, SOURCE_PANEL_WIDTH)
    overview_width = inner - source.width - 2 * GAP
    overview_scale = min(1.0, overview_width / overview.width, source.height / overview.height)
    overview_shown = _with_patch_grid(overview, patch, overview_scale)

    slice_scale = 1.0
    if plan.grid is not None and plan.slice_size is not None:
        cols_width = plan.grid.cols * plan.slice_size.width + (plan.grid.cols - 1) * GAP
        slice_scale = min(1.0, inner / cols_width)
    slices_shown = [_with_patch_grid(s, patch, slice_scale) for s in slices]
    slice_row_height = (slices_shown[0].height + SMALL_FONT_SIZE + 2 * CAPTION_GAP) if slices_shown else 0

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    layout = layout_string(plan, num_queries)
    layout_lines = _wrap(probe, f"LLM layout: {layout}", font, inner)
    header = title or f"{plan.width}x{plan.height}"
    grid_text = "no slices" if plan.grid is None else f"{plan.grid.cols}x{plan.grid.rows} grid (cols x rows)"
    summary = (
        f"{header}: {grid_text}, {plan.num_slices} slice(s) + overview {plan.overview.width}x{plan.overview.height}; "
        f"{plan.vit_patches} ViT patches, {visual_token_count(plan, num_queries)} LLM tokens"
    )
    summary_lines = _wrap(probe, summary, bold, inner)

    rows = plan.grid.rows if plan.grid is not None else 0
    height = (
        MARGIN
        + line_height * len(summary_lines)
        + GAP
        + line_height  # panel captions
        + max(source.height, overview_shown.height + SMALL_FONT_SIZE + CAPTION_GAP)
        + 2 * GAP
        + (line_height + rows * (slice_row_height + GAP) if rows else 0)
        + line_height * len(layout_lines)
        + MARGIN
    )
    canvas = Image.new("RGB", (CANVAS_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for line in summary_lines:
        draw.text((MARGIN, y), line, fill=INK, font=bold)
        y += line_height
    y += GAP
    overview_x = MARGIN + source.width + 2 * GAP
    draw.text((MARGIN, y), "input with slice grid", fill=INK, font=font)
    draw.text((overview_x, y), "overview as fed", fill=INK, font=font)
    y += line_height
    canvas.paste(source, (MARGIN, y))
    canvas.paste(overview_shown, (overview_x, y))
    draw.text(
        (overview_x, y + overview_shown.height + CAPTION_GAP),
        _caption(overview, patch, "overview"),
        fill=INK,
        font=small,
    )
    y += max(source.height, overview_shown.height + SMALL_FONT_SIZE + CAPTION_GAP) + 2 * GAP
    if plan.grid is not None:
        scale_note = "" if slice_scale == 1.0 else f" (shown at {slice_scale:.0%})"
        draw.text((MARGIN, y), f"slices as fed, row-major{scale_note}", fill=INK, font=font)
        y += line_height
        for i, shown in enumerate(slices_shown):
            r, c = divmod(i, plan.grid.cols)
            x = MARGIN + c * (shown.width + GAP)
            top = y + r * (slice_row_height + GAP)
            canvas.paste(shown, (x, top))
            draw.text(
                (x, top + shown.height + CAPTION_GAP),
                _caption(slices[i], patch, f"s{i + 1}"),
                fill=INK,
                font=small,
            )
        y += rows * (slice_row_height + GAP)
    for line in layout_lines:
        draw.text((MARGIN, y), line, fill=INK, font=font)
        y += line_height
    return canvas
