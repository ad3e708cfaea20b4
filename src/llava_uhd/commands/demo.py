"""The bundled model reading a high-resolution page: draw a fresh synthdoc page (or take ``--image``), print
its slice plan, write the picture of what the model sees, ask the three kinds of question and print each
answer beside the truth with the time taken; then ask the code question again with the slices withheld
(the overview alone), which shows why native resolution matters: the codes are legible only in the slices.

    llava-uhd demo                      # a new page every run (--seed N repeats one)
    llava-uhd demo --image page.png --question "What is the code in the red box?"
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

HELP = "the bundled model answers questions about a fresh high-resolution page"
DEFAULT_OUT_DIR = Path("demo-output")
USER_IMAGE_QUESTIONS = ("How many boxes are there?", "What is the code in the red box?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", default=None, help="ask about this image instead of a generated page")
    parser.add_argument(
        "--question", action="append", default=None, help="ask this instead of the defaults; repeatable"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="draw page N of the demo split (default: random)"
    )
    parser.add_argument(
        "--model", type=Path, default=None, metavar="DIR", help="a saved model (default: bundled)"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="folder for slices.png (./demo-output)"
    )


def _page(seed: int | None) -> tuple[object, list[tuple[str, str]], str]:
    """A synthdoc page of the test split, with one question of each kind and its truth."""
    from llava_uhd.synth.synthdoc import all_questions, document_seed, make_document, render_document

    index = random.SystemRandom().randrange(10**6) if seed is None else seed
    doc = make_document(document_seed("test", index, seed=7))  # seed 7: pages no benchmark run uses
    asked = all_questions(doc)
    rng = random.Random(index)
    picked = [rng.choice([q for q in asked if q.kind == kind]) for kind in ("code", "count", "colour")]
    name = f"synthdoc test page {index} (seed 7), {doc.width}x{doc.height}, {len(doc.boxes)} boxes"
    return render_document(doc), [(q.question, q.answer) for q in picked], name


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from llava_uhd.auto import load_pretrained
    from llava_uhd.bundled import model_dir
    from llava_uhd.commands._common import check_output_folder
    from llava_uhd.commands.slice import describe_plan, write_slice_picture
    from llava_uhd.images import load_image, probe_image_size
    from llava_uhd.inference.batch import Request, answer_batch
    from llava_uhd.model.feature_cache import cache_frozen_tower

    out_dir = Path(args.out_dir)
    check_output_folder(out_dir, "--out-dir")  # the inputs before the (slow) model load
    if args.image is not None:  # its header; the model's pixel limit applies when it is read
        probe_image_size(args.image, max_pixels=sys.maxsize)
    folder = model_dir(args.model)
    model, processor = load_pretrained(folder)
    cache_frozen_tower(model)  # the page is encoded once for all its questions
    if args.image is not None:
        image, name = load_image(args.image, max_pixels=processor.slicing.max_image_pixels), args.image
        asked = [(q, "-") for q in (args.question or USER_IMAGE_QUESTIONS)]
    else:
        image, asked, name = _page(args.seed)
        if args.question:
            asked = [(q, "-") for q in args.question]
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = out_dir / "slices.png"
    plan = write_slice_picture(image, picture, processor.preset, name=name)
    print(
        f"model: {'bundled synthdoc model' if args.model is None else folder} (loaded in {time.perf_counter() - start:.1f} s)"
    )
    print(describe_plan(name, plan, processor.num_queries))
    print(f"what the model sees: {picture.resolve()}\n")
    width = max(len(q) for q, _ in asked) + 2
    print(f"{'question':<{width}}{'answer':<10}{'truth':<10}time")
    for question, truth in asked:
        t = time.perf_counter()
        [reply] = answer_batch(model, processor, [Request((image,), question)], max_new_tokens=16)
        mark = "" if truth == "-" else ("  ok" if reply.text == truth else "  wrong")
        print(f"{question:<{width}}{reply.text!s:<10}{truth:<10}{time.perf_counter() - t:.2f} s{mark}")
    code_question = next((q for q, _ in asked if "code in the" in q), asked[0][0])
    truth = next(t for q, t in asked if q == code_question)
    t = time.perf_counter()
    [blind] = answer_batch(
        model, processor, [Request((image,), code_question)], max_slices=1, max_new_tokens=16
    )
    print(
        f"\nslices withheld (overview alone, {plan.overview.width}x{plan.overview.height}): "
        f"{code_question} -> {blind.text} (truth {truth}, {time.perf_counter() - t:.2f} s)"
    )
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
