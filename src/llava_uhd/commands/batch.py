"""Answer a JSONL file of questions about images, in batches, with a saved model (the bundled one by default).

    llava-uhd batch IN.jsonl --output OUT.jsonl [--model DIR] [--batch-size 8] [--resume]

Each input line is ``{"id", "image", "question"}``; each output line, in input order, is
``{"id", "answer", "visual_tokens"}``, or ``{"id", "error"}`` for a line that could not be answered (not
JSON, a missing field, a repeated id, an unreadable image): the run goes on and exits 1 at the end if any
line failed. Images are local paths, relative to the current folder or else to IN's folder. Requests of a
batch may have different slice counts. ``--resume`` keeps the answers already in OUT (a line cut short by
a kill is dropped) and answers only the other ids. Decoding options are those of ``ask``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llava_uhd.commands._common import (
    add_decoding_arguments,
    add_model_arguments,
    check_output_file,
    decoding_options,
    load_model,
)
from llava_uhd.errors import ConfigError

HELP = "answer a JSONL file of {id, image, question} lines in batches"
FIELDS = ("id", "image", "question")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", type=Path, metavar="IN.jsonl", help="one {id, image, question} object a line"
    )
    parser.add_argument(
        "--output", required=True, type=Path, metavar="OUT.jsonl", help="answers, in input order"
    )
    add_model_arguments(parser, dtype=False)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per generate call (8)")
    parser.add_argument("--resume", action="store_true", help="skip ids already answered in OUT")
    add_decoding_arguments(parser)


def read_requests(path: Path) -> list[dict[str, Any]]:
    """Every line of IN as ``{"id", "image", "question"}`` or ``{"id", "error"}`` (never raises per line)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not an input file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such input file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            items.append(
                {"id": None, "line": number, "error": f"line {number}: not UTF-8 text ({exc.reason})"}
            )
            continue
        except json.JSONDecodeError as exc:
            items.append({"id": None, "line": number, "error": f"line {number}: not JSON ({exc.msg})"})
            continue
        if not isinstance(record, dict):
            items.append(
                {
                    "id": None,
                    "line": number,
                    "error": f"line {number}: expected an object, got {type(record).__name__}",
                }
            )
            continue
        rid = record.get("id")
        missing = [f for f in FIELDS if f not in record]
        wrong = [f for f in ("image", "question") if f in record and not isinstance(record[f], str)]
        if missing or wrong or not isinstance(rid, str | int) or isinstance(rid, bool):
            problem = (
                f"missing {missing}" if missing else f"{wrong or ['id']} must be strings (id: or an integer)"
            )
            valid_id = isinstance(rid, str | int) and not isinstance(rid, bool)
            items.append(
                {"id": rid if valid_id else None, "line": number, "error": f"line {number}: {problem}"}
            )
            continue
        if str(rid) in seen:
            items.append(
                {"id": rid, "line": number, "error": f"line {number}: id {rid!r} repeats an earlier line"}
            )
            continue
        seen.add(str(rid))
        items.append(
            {"id": rid, "image": _resolve(record["image"], path.parent), "question": record["question"]}
        )
    return items


def _resolve(image: str, base: Path) -> str:
    candidate = Path(image)
    if candidate.exists() or candidate.is_absolute():
        return image
    beside = base / candidate
    return str(beside) if beside.exists() else image


def answered(path: Path) -> tuple[set[str], int]:
    """Keys (:func:`_key`) of the lines already in OUT and how many of them are errors; a line cut short
    by a kill is removed."""
    if not path.is_file():
        return set(), 0
    kept, ids, errors = [], set(), 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the partial line of an interrupted write
        if isinstance(record, dict) and "id" in record:
            kept.append(line)
            ids.add(_key(record))
            errors += "error" in record
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    return ids, errors


def _key(record: dict[str, Any]) -> str:
    """How --resume recognises a line: a line-level error by its line number, anything else by its id."""
    return f"line:{record['line']}" if "line" in record else str(record["id"])


def run(args: argparse.Namespace) -> int:
    from llava_uhd.inference.generate import GenerationOptions

    options = decoding_options(args)
    GenerationOptions(**options)  # refuse bad decoding flags before the model loads
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_file(args.output, "--output")
    items = read_requests(args.input)
    done, failed_before = answered(args.output) if args.resume else (set(), 0)
    todo = [item for item in items if _key(item) not in done]
    if not args.resume and args.output.exists():
        args.output.unlink()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("a", encoding="utf-8") as out:
        failed = _answer_all(args, todo, out, options)
    print(
        f"{len(todo)} answered, {failed} failed, {len(items) - len(todo)} already in {args.output}"
        f" ({failed_before} of them failed)",
        file=sys.stderr,
    )
    return 1 if failed or failed_before else 0  # the exit code speaks for the whole output file


def _answer_all(
    args: argparse.Namespace, todo: list[dict[str, Any]], out: Any, options: dict[str, Any]
) -> int:
    from tqdm.auto import tqdm

    from llava_uhd.inference.batch import Request, answer_batch, batched
    from llava_uhd.model.feature_cache import cache_frozen_tower

    model = processor = None
    if any("error" not in item for item in todo):  # a file of bad lines alone needs no model
        model, processor = load_model(args)
        cache_frozen_tower(model)  # questions about the same image encode it once
    failed = 0
    with tqdm(total=len(todo), desc="batch", unit="q", file=sys.stderr, dynamic_ncols=True) as bar:
        for chunk in batched(todo, args.batch_size):
            good = [item for item in chunk if "error" not in item]
            answers = iter(
                answer_batch(
                    model, processor, [Request((i["image"],), i["question"]) for i in good], **options
                )
                if good
                else []
            )
            for item in chunk:  # input order, errors in place
                if "error" in item:
                    record = {k: item[k] for k in ("id", "line", "error") if k in item}
                else:
                    a = next(answers)
                    record = (
                        {"id": item["id"], "error": a.error}
                        if a.error is not None
                        else {"id": item["id"], "answer": a.text, "visual_tokens": a.visual_tokens}
                    )
                failed += "error" in record
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(chunk))
    return failed
