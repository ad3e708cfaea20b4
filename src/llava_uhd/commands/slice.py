"""Draw what the model sees of one image: the slice grid, each slice and the overview as fed to the ViT
(with their sizes and patch grids), and the LLM token layout with its counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_uhd.commands._common import add_preset_arguments, preset_from_args
from llava_uhd.config import Preset
from llava_uhd.errors import ImageSizeError, LlavaUHDError, PlanLimitError
from llava_uhd.images import ImageSource, describe_source, load_image
from llava_uhd.layout import layout_string, visual_token_count
from llava_uhd.slicing import SlicePlan, plan_slices

HELP = "draw an image's slices, overview and token layout into a PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument(
        "--out", required=True, metavar="PICTURE.png", help="where to write the picture (PNG)"
    )
    add_preset_arguments(parser)


def describe_plan(name: str, plan: SlicePlan, num_queries: int) -> str:
    """The plan in two lines, as the `plan` command prints it."""
    grid = "no slices" if plan.grid is None else f"{plan.grid.cols}x{plan.grid.rows} grid (cols x rows)"
    slices = "" if plan.slice_size is None else f", slices {plan.slice_size.width}x{plan.slice_size.height}"
    return (
        f"{name}: {plan.width}x{plan.height}: {grid}{slices}, overview {plan.overview.width}x{plan.overview.height}, "
        f"{plan.vit_patches} ViT patches, {visual_token_count(plan, num_queries)} LLM tokens\n"
        f"  layout: {layout_string(plan, num_queries)}"
    )


def write_slice_picture(source: ImageSource, out: Path, preset: Preset, name: str | None = None) -> SlicePlan:
    """Load ``source``, plan it with ``preset`` and write the picture to ``out``; returns the plan."""
    from llava_uhd.visualize import render_plan

    if out.suffix.lower() != ".png":
        raise LlavaUHDError(f"--out {out}: the picture is written as PNG; give a path ending in .png")
    if not out.parent.is_dir():
        raise LlavaUHDError(f"--out {out}: folder {out.parent} does not exist")
    image = load_image(source, max_pixels=preset.slicing.max_image_pixels)
    label = name or describe_source(source)
    try:
        plan = plan_slices(image.width, image.height, preset.slicing)
    except (ImageSizeError, PlanLimitError) as exc:  # name the input, as the loader's errors do
        raise type(exc)(f"{describe_source(source)}: {exc}") from None
    picture = render_plan(image, plan, preset.resampler.num_queries, title=label)
    try:
        picture.save(out, "PNG")
    except OSError as exc:
        raise LlavaUHDError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    return plan


def run(args: argparse.Namespace) -> int:
    preset = preset_from_args(args)
    out = Path(args.out)
    plan = write_slice_picture(args.image, out, preset)
    print(describe_plan(args.image, plan, preset.resampler.num_queries))
    print(f"wrote {out}", file=sys.stdout)
    return 0
