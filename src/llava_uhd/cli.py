"""The ``llava-uhd`` command. Subcommands live in :mod:`llava_uhd.commands`, one module each; every
module imports its heavy dependencies (torch, transformers) inside ``run`` so that ``llava-uhd plan``
starts without them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from llava_uhd.commands._library_notices import without_import_notices
from llava_uhd.errors import LlavaUHDError

# Subcommands, each a module under llava_uhd.commands with HELP, add_arguments(parser) and run(args) -> int.
# Only the chosen command's module is imported (and each imports torch inside run), so `plan` starts fast.
COMMANDS: tuple[str, ...] = (
    "plan", "slice", "demo", "train", "convert", "ask", "batch", "chat", "synthdoc", "score", "eval", "serve",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line, as every other error of the command (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand is loaded."""
    parser = _Parser(prog="llava-uhd", description="LLaVA-UHD: any-aspect-ratio, high-resolution LMM")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"llava_uhd.commands.{name}")
        sub_parser = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run, _parser=sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(chosen)
    if chosen is not None:  # a command may reorder its own arguments first (plan: items like -5x5)
        prepare = getattr(importlib.import_module(f"llava_uhd.commands.{chosen}"), "prepare_argv", None)
        if prepare is not None:
            argv = [chosen, *prepare(argv[1:])]
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser, so that the line names the command
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    with warnings.catch_warnings(), without_import_notices():
        warnings.showwarning = _one_line_warning(args.command)
        try:
            return int(args._run(args) or 0)
        except LlavaUHDError as exc:
            print(f"llava-uhd {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"llava-uhd {args.command}: interrupted", file=sys.stderr)
            return 130


def _one_line_warning(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` that prints one stderr line, like the errors (e.g. an animated image read
    as its first frame)."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        print(f"llava-uhd {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


if __name__ == "__main__":
    sys.exit(main())
