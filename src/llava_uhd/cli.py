"""The ``llava-uhd`` command. Subcommands live in :mod:`llava_uhd.commands`, one module each; every
module imports its heavy dependencies (torch, transformers) inside ``run`` so that ``llava-uhd plan``
starts without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from llava_uhd.errors import LlavaUHDError

# name -> module under llava_uhd.commands; each module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, str] = {
    "plan": "plan",
    "slice": "slice",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-uhd", description="LLaVA-UHD: any-aspect-ratio, high-resolution LMM")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"llava_uhd.commands.{module_name}")
        sub_parser = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LlavaUHDError as exc:
        print(f"llava-uhd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llava-uhd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
