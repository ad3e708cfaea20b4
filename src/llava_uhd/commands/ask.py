"""Ask a saved model a question about one or more images.

``llava-uhd ask --model DIR --image IMG "question"`` loads DIR (written by ``save_pretrained`` or by
``llava-uhd convert``; without ``--model``, the bundled synthdoc model), slices the images with the slicing
saved in DIR (official-v1's after conversion), and prints only the answer. ``--image`` may be repeated; the
images go before the question, in order. ``--show-plan`` prints each image's slice plan and the prompt's
token counts on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from llava_uhd.commands._common import (
    add_decoding_arguments,
    add_model_arguments,
    decoding_options,
    load_model,
)

if TYPE_CHECKING:
    pass

HELP = "answer a question about images with a saved model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question (images are placed before it)")
    add_model_arguments(parser)
    parser.add_argument(
        "--image", action="append", default=[], metavar="IMG", help="an image file; repeat for several images"
    )
    add_decoding_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object with the answer")
    parser.add_argument(
        "--show-plan", action="store_true", help="print the slice plan and token counts on stderr"
    )


def run(args: argparse.Namespace) -> int:
    from llava_uhd.bundled import model_dir
    from llava_uhd.commands.plan import prompt_plan_text
    from llava_uhd.inference.generate import GenerationOptions, answer_prepared, prompt_inputs

    # every input is checked before the (slow) model load
    options = GenerationOptions(**decoding_options(args))
    images = [str(path) for path in args.image]
    _check_inputs(args.question, images)
    model, processor = load_model(args)
    prepared = prompt_inputs(processor, images, args.question, model.config.template)
    if args.show_plan:
        plan = prompt_plan_text(images, prepared.images.plans, processor.preset, prepared.text)
        sys.stderr.write(plan + "\n")
    text = answer_prepared(model, processor, prepared, options)
    if args.json:
        record = {
            "model": str(model_dir(args.model)),
            "images": images,
            "question": args.question,
            "answer": text,
        }
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


def _check_inputs(question: str, images: list[str]) -> None:
    """The question's ``<image>`` count and each image file's header (exists, is an image): what can be
    checked without the model. The model's pixel limit applies when the image is read for it."""
    from llava_uhd.images import probe_image_size
    from llava_uhd.inference.generate import question_turns

    question_turns(question, len(images))
    for image in images:
        probe_image_size(image, max_pixels=sys.maxsize)
