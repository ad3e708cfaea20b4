"""Write synthdoc data: pages and a LLaVA JSON for training (stages 1 and 2), or the task's tokenizer.

    llava-uhd synthdoc data OUT --split train --n 3000 --kinds caption qa qa --colour-jitter 12
    llava-uhd synthdoc tokenizer OUT

The same arguments always write the same files; splits (train, validation, test) never share a page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write synthdoc pages + LLaVA JSON, or the synthdoc tokenizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    data = sub.add_parser("data", help="render pages and write OUT/data.json and OUT/images/")
    data.add_argument("out", type=Path, help="output folder")
    data.add_argument("--split", default="train", choices=("train", "validation", "test"))
    data.add_argument("--n", type=int, required=True, help="number of pages")
    data.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    data.add_argument(
        "--kinds",
        nargs="+",
        default=["qa"],
        choices=("caption", "qa"),
        help="records per page; a repeated qa asks other questions (default qa)",
    )
    data.add_argument(
        "--colour-jitter", type=int, default=0, help="border colour jitter in levels (training)"
    )
    data.add_argument("--json-name", default="data.json", help="name of the JSON file in OUT (data.json)")
    tok = sub.add_parser("tokenizer", help="train the synthdoc BPE tokenizer and save it to OUT")
    tok.add_argument("out", type=Path, help="output folder")


def run(args: argparse.Namespace) -> int:
    from llava_uhd.commands._common import check_output_folder
    from llava_uhd.errors import ConfigError

    check_output_folder(args.out)
    if args.what == "tokenizer":
        from llava_uhd.synth.tokenizer import save_tokenizer

        print(f"wrote the synthdoc tokenizer to {save_tokenizer(args.out)}")
        return 0
    from llava_uhd.synth.synthdoc import write_llava_json

    if args.colour_jitter < 0:
        raise ConfigError(f"--colour-jitter must be >= 0 levels, got {args.colour_jitter}")
    if Path(args.json_name).name != args.json_name or args.json_name in ("", ".", ".."):
        raise ConfigError(f"--json-name {args.json_name!r}: give a file name, written in OUT")
    path = write_llava_json(
        args.out,
        args.split,
        args.n,
        seed=args.seed,
        kinds=tuple(args.kinds),
        colour_jitter=args.colour_jitter,
        json_name=args.json_name,
    )
    print(f"wrote {args.n} {args.split} pages and {path}")
    return 0
