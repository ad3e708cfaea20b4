"""Chat about an image in the terminal, answers streamed as they are generated.

    llava-uhd chat --image PATH [--model DIR] [decoding options]

Every line read from stdin is a question, answered with the whole conversation so far in mind (the
bundled synthdoc model without ``--model``). The image is read, sliced and encoded once per conversation;
every turn reuses its features. Commands:

    /image PATH   a new conversation about another image
    /reset        forget the conversation, keep the image
    /plan         the image's slice plan and the last prompt's token counts
    /help         these commands
    /exit         leave (end of input does too)

On a terminal a prompt is shown; with piped input (``printf 'q1\\nq2\\n' | llava-uhd chat --image
x.png``) stdout holds the answers alone, one a line. A bad command, image or question gets one line on
stderr and the chat goes on; Ctrl-C during an answer stops that answer only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from llava_uhd.commands._common import (
    add_decoding_arguments,
    add_model_arguments,
    decoding_options,
    load_model,
)
from llava_uhd.errors import LlavaUHDError

if TYPE_CHECKING:
    from llava_uhd.inference.chat import ChatSession

HELP = "chat about an image, answers streamed as they are generated"
PROMPT = ">>> "
COMMANDS_HELP = (
    "/image PATH: a new conversation about another image; /reset: forget the conversation; "
    "/plan: slice plan and token counts; /help; /exit"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", default=None, metavar="PATH", help="the image to talk about")
    add_model_arguments(parser)
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from llava_uhd.images import probe_image_size
    from llava_uhd.inference.chat import ChatSession
    from llava_uhd.inference.generate import GenerationOptions

    # every input is checked before the (slow) model load
    options = GenerationOptions(**decoding_options(args))
    if args.image is not None:
        probe_image_size(args.image, max_pixels=sys.maxsize)
    model, processor = load_model(args)
    session = ChatSession(model, processor, options)
    if args.image is not None:
        session.set_image(args.image)
    if sys.stdin.isatty():
        _say(f"about {args.image or 'no image (text only)'}; /help for the commands")
    for line in _lines(sys.stdin):
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line):
                    break
            else:
                _answer(session, line)
        except LlavaUHDError as exc:
            _say(f"error: {exc}")
    return 0


def _lines(stdin: TextIO) -> Iterator[str]:
    """The lines of stdin: with a prompt and line editing on a terminal, plainly when piped."""
    if not stdin.isatty():
        yield from stdin
        return
    import readline  # noqa: F401  (gives input() line editing and history)

    while True:
        try:
            yield input(PROMPT)
        except EOFError:
            sys.stdout.write("\n")
            return


def _answer(session: ChatSession, question: str) -> None:
    out = sys.stdout

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        session.ask(question, on_text=show)
    except KeyboardInterrupt:
        out.write("\n")
        _say("answer interrupted (the question is not kept)")
        return
    out.write("\n")
    out.flush()


def _command(session: ChatSession, line: str) -> bool:
    """Run one ``/command``; False when the chat should end."""
    from llava_uhd.commands.plan import prompt_plan_text

    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        _say(COMMANDS_HELP)
    elif name == "/reset":
        session.reset()
        _say("conversation reset")
    elif name == "/image":
        if not rest:
            raise LlavaUHDError("/image needs a path: /image PATH")
        path = rest[1:-1] if len(rest) > 1 and rest[0] == rest[-1] and rest[0] in "'\"" else rest
        image = session.set_image(path)
        _say(f"new conversation about {image.name}")
    elif name == "/plan":
        image = session.image
        names, plans = ([image.name], [image.plan]) if image is not None else ([], [])
        lines = [prompt_plan_text(names, plans, session.processor.preset, session.last_prompt)]
        if image is None:
            lines.insert(0, "no image: questions are text alone")
        asked = sum(turn.role == "user" for turn in session.turns)
        lines.append(
            f"conversation: {asked} question(s) answered" + (" (prompt: the last one's)" if asked else "")
        )
        sys.stdout.write("\n".join(line for line in lines if line) + "\n")
        sys.stdout.flush()
    else:
        raise LlavaUHDError(f"unknown command {name!r}; {COMMANDS_HELP}")
    return True


def _say(message: str) -> None:
    print(f"llava-uhd chat: {message}", file=sys.stderr, flush=True)
