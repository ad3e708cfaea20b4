"""Arguments shared by several subcommands: the preset and every slicing knob; the model folder, device and
dtype, and loading them; decoding options; checks of the paths a command will write, made before any slow
work."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from llava_uhd.config import Preset, SlicingMode, get_preset
from llava_uhd.errors import ConfigError

if TYPE_CHECKING:
    import torch


def add_preset_arguments(parser: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    group = parser.add_argument_group("preset and slicing")
    group.add_argument(
        "--preset", default=default_preset, help="preset name (paper, official-v1, tiny) or a YAML file"
    )
    group.add_argument("--max-slices", type=int, default=None, help="most slices per image (preset: 6 or 7)")
    group.add_argument("--scale-resolution", type=int, default=None, help="ViT pre-training side S (336)")
    group.add_argument("--patch-size", type=int, default=None, help="ViT patch side (14)")
    group.add_argument(
        "--pre-resize-long-side",
        type=int,
        default=None,
        metavar="L",
        help="resize every image so its long side is L before slicing (the released evaluation uses 1024)",
    )
    group.add_argument("--no-upscale", action="store_true", help="do not upscale small unsliced images")
    group.add_argument("--max-vit-patches", type=int, default=None, help="refuse plans with more ViT patches")
    group.add_argument("--max-image-pixels", type=int, default=None, help="refuse images with more pixels")
    group.add_argument(
        "--mode",
        choices=get_args(SlicingMode),
        default=None,
        help="slicing mode: uhd (the paper's slices), resize (LLaVA-1.5: one SxS view), anyres (LLaVA-NeXT tiles)",
    )


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The preset named by ``--preset`` with the slicing flags applied on top."""
    preset = get_preset(args.preset)
    overrides = {
        "max_slices": args.max_slices,
        "scale_resolution": args.scale_resolution,
        "patch_size": args.patch_size,
        "pre_resize_long_side": args.pre_resize_long_side,
        "max_vit_patches": args.max_vit_patches,
        "max_image_pixels": args.max_image_pixels,
        "mode": args.mode,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_upscale:
        overrides["upscale_small"] = False
    if not overrides:
        return preset
    slicing = replace(preset.slicing, **overrides)
    vision = preset.vision
    if "patch_size" in overrides:  # the ViT must agree with the slicer on the patch size
        vision = replace(
            vision, patch_size=slicing.patch_size, image_size=slicing.patch_size * vision.grid_side
        )
    return replace(preset, slicing=slicing, vision=vision)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--model DIR`` (default: the bundled model), ``--device`` and, with ``dtype``, ``--dtype``."""
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="a saved model folder (default: the bundled model)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    if dtype:
        parser.add_argument(
            "--dtype",
            choices=DTYPES,
            default="auto",
            help="weights' dtype: auto (default) is bfloat16 on a GPU that supports it, float32 otherwise",
        )


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and processor that ``--model`` (the bundled model without it), ``--device`` and
    ``--dtype`` name, loaded by :func:`llava_uhd.auto.load_pretrained`."""
    from llava_uhd.auto import load_pretrained
    from llava_uhd.bundled import model_dir

    device = torch_device(args.device)
    return load_pretrained(
        model_dir(args.model), device=device, dtype=torch_dtype(getattr(args, "dtype", "auto"), device)
    )


def torch_device(name: str | None) -> torch.device:
    """``--device`` as a torch device (None: CUDA if present, else the CPU), refused with the flag named
    when torch cannot use it here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: this torch build or machine has no CUDA device")
    return device


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``--dtype``: "auto" is bfloat16 where the GPU computes in it, else float32.

    CPUs without native bfloat16 emulate it (slower than float32), hence float32 there; the model keeps
    its position-table resizing in float32 either way.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    cuda = device.type == "cuda"
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Generation flags shared by ``ask``, ``batch`` and ``chat`` (checked by ``GenerationOptions``)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (256)")
    group.add_argument("--num-beams", "--beams", type=int, default=1, help="beam search width (1: greedy)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: no sampling)")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, with --temperature")
    group.add_argument(
        "--seed", type=int, default=None, help="seed of the sampling draws: the same seed, the same answer"
    )


def decoding_options(args: argparse.Namespace) -> dict[str, object]:
    """The decoding flags as ``GenerationOptions`` fields."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def check_output_folder(path: Path, flag: str = "") -> None:
    """Refuse a folder to write that cannot become one: an existing file, or a path below a file.
    ``flag`` names the option in the message (none for a positional argument)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{_named(path, flag)}: exists and is not a folder")
    _check_parents(path, flag)


def check_output_file(path: Path, flag: str = "") -> None:
    """Refuse a file to write that cannot become one: an existing folder, or a path below a file."""
    if path.is_dir():
        raise ConfigError(f"{_named(path, flag)}: is a folder; give a file path")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    existing = next((parent for parent in path.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{_named(path, flag)}: {existing} is a file, not a folder")


def _named(path: Path, flag: str) -> str:
    return f"{flag} {path}" if flag else str(path)
