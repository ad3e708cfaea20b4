"""Slice the bundled example image (a synthetic 1280x800 scene with text and shapes): print its plan and
write the picture of what the model sees to ./demo-output/slices.png. Runs in a few seconds, no model.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from llava_uhd.commands._common import add_preset_arguments, preset_from_args
from llava_uhd.commands.slice import describe_plan, write_slice_picture

HELP = "slice the bundled example image and draw what the model sees"
EXAMPLE_IMAGE = "example.jpg"
DEFAULT_OUT_DIR = Path("demo-output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="folder for slices.png (./demo-output)"
    )
    add_preset_arguments(parser)


def run(args: argparse.Namespace) -> int:
    preset = preset_from_args(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "slices.png"
    example = resources.files("llava_uhd") / "assets" / EXAMPLE_IMAGE
    with resources.as_file(example) as path:
        plan = write_slice_picture(path, out, preset, name=f"example image ({EXAMPLE_IMAGE})")
    print(
        f"preset {preset.name}: {preset.slicing.max_slices} slices at most, {preset.resampler.num_queries} tokens per piece"
    )
    print(describe_plan(f"bundled {EXAMPLE_IMAGE}", plan, preset.resampler.num_queries))
    print(f"wrote the picture of what the model sees to {out.resolve()}")
    return 0
