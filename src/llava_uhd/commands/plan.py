"""Plan how images are sliced, without loading a model.

Each ITEM is an image file or a size WxH (e.g. 1920x1080). With --json, one JSON object per item per
line; an item that cannot be planned gets an "error" line, the others still print, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from llava_uhd.commands._common import add_preset_arguments, preset_from_args
from llava_uhd.config import Preset
from llava_uhd.errors import LlavaUHDError
from llava_uhd.layout import layout_string, visual_token_count
from llava_uhd.slicing import SlicePlan, plan_slices
from llava_uhd.tokens import EncodedSample

HELP = "show how images are sliced (grid, slice and overview sizes, token counts)"

_SIZE = re.compile(r"^\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*$")
_SIZE_LIKE = re.compile(r"^\s*-?\d*\s*[xX]\s*-?\d*\s*$")  # "10x", "x5": meant as a size, not a file


def prepare_argv(argv: list[str]) -> list[str]:
    """Items like ``-5x5`` look like options to argparse; a leading space keeps each an item, in place,
    so that it is reported on its own line like any other bad size."""
    return [f" {a}" if a.startswith("-") and _SIZE.match(a) else a for a in argv]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="ITEM", help="image path or size WxH")
    add_preset_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line per item")
    parser.add_argument("--flops", action="store_true", help="also count forward FLOPs (and LLaVA-1.5's)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens counted with --flops")


def item_size(item: str, preset: Preset) -> tuple[int, int]:
    """The (width, height) of an item: parsed from WxH, else read from the image file (checked to decode)."""
    match = _SIZE.match(item)
    if match:
        return int(match.group(1)), int(match.group(2))
    from pathlib import Path

    from llava_uhd.errors import ImageLoadError
    from llava_uhd.images import check_image_file  # Pillow only, no torch

    if not Path(item).exists():
        kind = "a size needs both sides, as WxH" if _SIZE_LIKE.match(item) else "give a size as WxH"
        raise ImageLoadError(f"{item}: neither a size WxH (e.g. 1920x1080) nor an existing file ({kind})")

    return check_image_file(item, max_pixels=preset.slicing.max_image_pixels)


def plan_record(plan: SlicePlan, preset: Preset) -> dict[str, Any]:
    """The JSON record of one plan (the `plan --json` contract)."""
    record: dict[str, Any] = {
        "width": plan.width,
        "height": plan.height,
        "grid": None if plan.grid is None else {"rows": plan.grid.rows, "cols": plan.grid.cols},
        "overview": {"width": plan.overview.width, "height": plan.overview.height},
        "slices": [{"width": s.width, "height": s.height} for s in plan.slices],
        "separators": list(plan.separators),
        "vit_patches": plan.vit_patches,
        "llm_tokens": visual_token_count(plan, preset.resampler.num_queries),
    }
    if preset.slicing.pre_resize_long_side is not None:
        assert plan.pre_resized is not None
        record["pre_resized"] = {"width": plan.pre_resized.width, "height": plan.pre_resized.height}
    if preset.slicing.mode != "uhd":  # the baselines (--mode); uhd records stay as they were
        record["mode"] = preset.slicing.mode
        if plan.letterbox is not None:
            record["letterbox"] = plan.letterbox._asdict()
    return record


def prompt_plan_text(
    names: Sequence[str], plans: Sequence[SlicePlan], preset: Preset, prompt: EncodedSample | None
) -> str:
    """Each image's plan as ``plan`` prints it, then the token counts of ``prompt`` if given (``ask
    --show-plan``, the chat's ``/plan``). ``plans`` are those the model gets (token budget applied)."""
    lines = [
        _describe(name, plan_record(plan, preset), plan, preset)
        for name, plan in zip(names, plans, strict=True)
    ]
    if prompt is not None:
        lines.append(
            f"prompt: {len(prompt.input_ids)} tokens "
            f"({prompt.num_visual_tokens} visual, {prompt.num_text_tokens} text)"
        )
    return "\n".join(lines)


def _add_flops(record: dict[str, Any], plan: SlicePlan, preset: Preset, text_tokens: int) -> None:
    from llava_uhd.model.flops import llava15_flops, uhd_flops  # closed-form counts, no torch

    record["flops"] = uhd_flops(preset, plan, text_tokens)
    record["llava15_flops"] = llava15_flops(preset, text_tokens)


def _letterbox_text(plan: SlicePlan) -> str:
    box = plan.letterbox
    if box is None:
        return ""
    return f" (image resized to {box.width}x{box.height} at ({box.left}, {box.top}) of the padded canvas)"


def _describe(item: str, record: dict[str, Any], plan: SlicePlan, preset: Preset) -> str:
    grid = record["grid"]
    grid_text = "no slices" if grid is None else f"{grid['cols']}x{grid['rows']} grid (cols x rows)"
    slice_text = "" if not plan.slices else f", slices {plan.slices[0].width}x{plan.slices[0].height}"
    size = f"{plan.width}x{plan.height}"
    text = (
        (size if item == size else f"{item}: {size}")  # a file is named, then its size
        + (f" -> pre-resized {plan.pre_resized.width}x{plan.pre_resized.height}" if plan.pre_resized else "")
        + f": {grid_text}{slice_text}{_letterbox_text(plan)}, overview {plan.overview.width}x{plan.overview.height}, "
        f"{record['vit_patches']} ViT patches, {record['llm_tokens']} LLM tokens\n"
        f"  layout: {layout_string(plan, preset.resampler.num_queries)}"
    )
    if "flops" in record:
        ours, base = record["flops"], record["llava15_flops"]
        text += (
            f"\n  forward GFLOPs: ViT {ours['vit'] / 1e9:.1f}, resampler {ours['resampler'] / 1e9:.1f}, "
            f"LLM {ours['llm'] / 1e9:.1f}, total {ours['total'] / 1e9:.1f} "
            f"(LLaVA-1.5: {base['total'] / 1e9:.1f}; ratio {ours['total'] / base['total']:.2f})"
        )
    return text


def run(args: argparse.Namespace) -> int:
    preset = preset_from_args(args)
    if args.text_tokens < 0:
        raise LlavaUHDError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    failed = False
    out = sys.stdout
    for item in (i.strip() for i in args.items):
        width: int | None = None
        height: int | None = None
        try:
            width, height = item_size(item, preset)
            plan = plan_slices(width, height, preset.slicing)
            record = plan_record(plan, preset)
            if args.flops:
                _add_flops(record, plan, preset, args.text_tokens)
        except LlavaUHDError as exc:
            failed = True
            message = str(exc) if str(exc).startswith(item) else f"{item}: {exc}"  # name the item once
            if args.json:
                out.write(json.dumps({"width": width, "height": height, "error": message}) + "\n")
            else:
                print(f"llava-uhd plan: error: {message}", file=sys.stderr)
            continue
        out.write((json.dumps(record) if args.json else _describe(item, record, plan, preset)) + "\n")
    return 1 if failed else 0
