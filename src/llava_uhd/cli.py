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

# name -> (module under llava_uhd.commands, one-line help). Each module has add_arguments(parser) and
# run(args) -> int; only the chosen command's module is imported, so `plan` never pays for torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("plan", "show how images are sliced (grid, slice and overview sizes, token counts)"),
    "slice": ("slice", "draw what the model sees: the slice grid, each slice, the overview, the layout"),
    "demo": ("demo", "run the demo on the bundled example image"),
    "train": ("train", "train a stage (resampler alignment or instruction tuning) from a YAML config"),
    "convert": ("convert", "convert a released LLaVA-UHD checkpoint into a llava-uhd model folder"),
    "ask": ("ask", "answer a question about images with a saved model"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's arguments are loaded."""
    parser = argparse.ArgumentParser(
        prog="llava-uhd", description="LLaVA-UHD: any-aspect-ratio, high-resolution LMM"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"llava_uhd.commands.{module_name}")
        sub_parser = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):  # only reachable for a command that was not loaded
        parser.error(f"unknown command {args.command!r}")
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
