"""Convert a released checkpoint into a llava-uhd model folder.

``llava-uhd convert --from official-v1 SRC DST`` reads the authors' released LLaVA-UHD checkpoint (a
LLaVA-style folder: config.json, tokenizer files, safetensors or .bin weights, single or sharded) and
writes DST: our config.json (the official-v1 preset: windowed 144-query resampler, up to 7 slices,
vicuna_v1 template), safetensors weights, the tokenizer with ``<image>`` added, and the processor files.
It prints every tensor's fate: mapped (source -> ours), ignored on purpose, or unexpected. Missing tensors,
wrong shapes and (without --allow-unexpected) unexpected tensors are errors, and nothing is written then.
Afterwards ``llava-uhd ask --model DST`` runs it with the released slicing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from llava_uhd.commands._common import check_output_folder
from llava_uhd.errors import CheckpointError, ConfigError

HELP = "convert a released LLaVA-UHD checkpoint into a llava-uhd model folder"

# Released layouts this command reads -> the preset they convert to.
SOURCES = ("official-v1",)
# What --max-shard-size takes: the sizes save_pretrained understands (huggingface_hub's units).
_SHARD_SIZE = re.compile(r"\s*(\d+(\.\d*)?)\s*(TB|GB|MB|KB)\s*", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=SOURCES,
        help="layout of SRC: official-v1 is the released llava-uhd-144-13b",
    )
    parser.add_argument("src", type=Path, metavar="SRC", help="the released checkpoint folder")
    parser.add_argument("dst", type=Path, metavar="DST", help="the folder to write (must be empty or new)")
    parser.add_argument(
        "--allow-unexpected",
        action="store_true",
        help="skip (and report) source tensors the key map does not know instead of failing",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard written (default 5GB)"
    )
    parser.add_argument(
        "--vision-tower",
        type=Path,
        default=None,
        metavar="DIR",
        help="a local CLIP vision folder (config.json) giving the tower's exact shape; default: the "
        "checkpoint's mm_vision_tower when that is a local folder, else CLIP's 64 channels per head",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    from llava_uhd.model.convert_official import convert_released, official_preset, read_released
    from llava_uhd.processing import LlavaUHDProcessor
    from llava_uhd.tokenizers import load_tokenizer_folder

    if args.dst.exists() and (not args.dst.is_dir() or any(args.dst.iterdir())):
        raise CheckpointError(f"{args.dst}: already exists and is not an empty folder; choose a new DST")
    check_output_folder(args.dst)
    size = _SHARD_SIZE.fullmatch(args.max_shard_size)
    if size is None or float(size.group(1)) <= 0:  # checked before hours of reading and converting
        raise ConfigError(
            f"--max-shard-size {args.max_shard_size!r}: give a positive size in TB, GB, MB or KB, e.g. 5GB"
        )
    checkpoint = read_released(args.src)
    preset = official_preset(checkpoint, args.vision_tower)
    tokenizer = load_tokenizer_folder(args.src)
    processor = LlavaUHDProcessor(tokenizer, preset)  # adds <image>; its id goes into the model config
    preset, report = convert_released(
        checkpoint,
        args.dst,
        image_token_id=processor.image_token_id,
        allow_unexpected=args.allow_unexpected,
        max_shard_size=args.max_shard_size,
        vision_tower=args.vision_tower,
    )
    processor.save_pretrained(args.dst)
    out = sys.stdout
    if args.json:
        record = {
            "source": str(args.src),
            "destination": str(args.dst),
            "preset": preset.name,
            "mapped": report.mapped,
            "ignored": list(report.ignored),
            "unexpected": list(report.unexpected),
            "missing": list(report.missing),
        }
        out.write(json.dumps(record) + "\n")
        return 0
    for source, ours in report.mapped.items():
        out.write(f"mapped      {source} -> {ours}\n")
    for source in report.ignored:
        out.write(f"ignored     {source} (not used by the model)\n")
    for source in report.unexpected:
        out.write(f"unexpected  {source} (skipped: --allow-unexpected)\n")
    out.write(f"converted {args.src} -> {args.dst} as preset {preset.name}: {report.summary()}\n")
    return 0
