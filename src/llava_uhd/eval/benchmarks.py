"""The benchmarks the runner knows: their metric, prompt convention and data readers (no torch).

Prompts follow the LLaVA-1.5 evaluation that LLaVA-UHD reports (arXiv 2403.11703, section 5): the
question, then a short-answer or multiple-choice instruction on its own line; VizWiz adds the
"Unanswerable" instruction; TextVQA optionally lists the OCR tokens ("Reference OCR token: ...") before
the instruction. A question that already ends in its instruction (LLaVA's own question files) is kept as is.

Data comes as LLaVA-style question JSONL (``question_id``, ``image``, ``text``; optional ``answers``,
``category``, ``choices``, ``hint``, ``ocr_tokens``) with the answers inline or in a ground-truth JSONL, or
as a VLMEvalKit TSV (``index``, ``image`` in base64, ``question``, ``answer``, options ``A``... ``Z``,
``hint``, ``category``). ``synthdoc`` pages are generated from a seed.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llava_uhd.errors import EvalInputError
from llava_uhd.eval.metrics import option_letters
from llava_uhd.eval.scoring import Question, load_ground_truth, read_jsonl

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
OCR_PREFIX = "Reference OCR token: "


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's metric (:mod:`llava_uhd.eval.scoring`), its prompt convention and instruction, and
    the default token budget of an answer."""

    name: str
    metric: str
    convention: str
    instruction: str
    max_new_tokens: int = 128  # LLaVA's evaluation default; answers end at EOS long before


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("vqav2", "vqa", "short-answer", SHORT_ANSWER),
        Benchmark("textvqa", "vqa", "short-answer", SHORT_ANSWER),
        Benchmark("vizwiz", "vqa", "short-answer", f"{UNANSWERABLE}\n{SHORT_ANSWER}"),
        Benchmark("gqa", "gqa", "short-answer", SHORT_ANSWER),
        Benchmark("docvqa", "anls", "short-answer", SHORT_ANSWER),
        Benchmark("chartqa", "relaxed", "short-answer", SHORT_ANSWER),
        Benchmark("pope", "pope", "short-answer", SHORT_ANSWER),
        Benchmark("mme", "mme", "short-answer", SHORT_ANSWER),
        Benchmark("scienceqa", "mc", "multiple-choice", MULTIPLE_CHOICE),
        Benchmark("mmbench", "mc", "multiple-choice", MULTIPLE_CHOICE),
        # the bundled model was trained on the bare synthdoc questions, so they are asked as they are
        Benchmark("synthdoc", "exact", "synthdoc", "", max_new_tokens=8),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise EvalInputError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


@dataclass(frozen=True)
class EvalItem:
    """One question to ask: its ground truth (id, answers, fields for the metric), the prompt and a
    function that returns the image (a path, bytes or a PIL image)."""

    truth: Question
    prompt: str
    image: Callable[[], Any] = field(compare=False)

    @property
    def question_id(self) -> str | int:
        return self.truth.question_id


def build_prompt(
    benchmark: Benchmark,
    question: str,
    *,
    choices: Sequence[str] | None = None,
    hint: str | None = None,
    ocr_tokens: Sequence[str] | None = None,
) -> str:
    """The text asked: hint, question, lettered options, OCR tokens, then the benchmark's instruction."""
    text = question
    if choices:
        text = (f"{hint}\n" if hint else "") + question
        text += "".join(
            f"\n{letter}. {choice}"
            for letter, choice in zip(option_letters(len(choices)), choices, strict=True)
        )
    if ocr_tokens is not None:
        text += f"\n{OCR_PREFIX}{', '.join(ocr_tokens)}"
    if benchmark.instruction and not text.rstrip().endswith(benchmark.instruction):
        text += f"\n{benchmark.instruction}"
    return text


def _image_path(image: str, images: Path | None, base: Path) -> Callable[[], str]:
    candidate = Path(image)
    if images is not None:
        candidate = images / image
    elif not candidate.is_absolute() and not candidate.exists():
        candidate = base / image
    path = str(candidate)
    return lambda: path


def read_question_jsonl(
    benchmark: Benchmark,
    path: Path,
    *,
    images: Path | None = None,
    answers: Path | None = None,
    use_ocr: bool = False,
) -> list[EvalItem]:
    """The items of a LLaVA-style question file; answers inline (``answers``/``answer``) or from ``answers``."""
    truth = {q.key: q for q in load_ground_truth(answers)} if answers is not None else {}
    items, seen = [], set()
    for number, record in read_jsonl(path, "questions"):
        where = f"questions {path}: line {number}"
        for name in ("question_id", "image", "text"):
            if name not in record:
                raise EvalInputError(f"{where}: missing {name}")
        qid = record["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, str | int):
            raise EvalInputError(f"{where}: question_id must be a string or an integer, got {qid!r}")
        if str(qid) in seen:
            raise EvalInputError(f"{where}: question_id {qid!r} repeats an earlier line")
        seen.add(str(qid))
        if not isinstance(record["image"], str) or not isinstance(record["text"], str):
            raise EvalInputError(f"{where}: image and text must be strings")
        gold = truth.get(str(qid))
        if gold is None:
            inline = record.get("answers", record.get("answer"))
            if inline is None:
                source = f"in {answers}" if answers is not None else "inline (give --answers FILE)"
                raise EvalInputError(f"{where}: question {qid!r} has no answers {source}")
            gold = Question(
                qid,
                tuple(inline if isinstance(inline, list) else [inline]),
                record.get("category"),
                record["image"],
                tuple(record["choices"]) if record.get("choices") else None,
            )
        choices = record.get("choices") or gold.choices
        ocr = record.get("ocr_tokens") if use_ocr else None
        if use_ocr and not isinstance(ocr, list):
            raise EvalInputError(f"{where}: --ocr needs an ocr_tokens list on every question")
        prompt = build_prompt(
            benchmark, record["text"], choices=choices, hint=record.get("hint"), ocr_tokens=ocr
        )
        items.append(EvalItem(gold, prompt, _image_path(record["image"], images, path.parent)))
    return items


def _cell(row: dict[str, str | None], name: str) -> str | None:
    value = row.get(name)
    return None if value is None or value.strip() in ("", "nan", "NaN", "None") else value


def read_tsv(benchmark: Benchmark, path: Path) -> list[EvalItem]:
    """The items of a VLMEvalKit TSV: base64 images (or the ``index`` of a row holding the image),
    options in columns ``A``..``Z``, answers a letter, a string or a Python list literal."""
    csv.field_size_limit(sys.maxsize)  # a base64 image is one field of several megabytes
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except FileNotFoundError:
        raise EvalInputError(f"data {path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvalInputError(f"data {path}: cannot be read as a TSV ({exc})") from None
    if not rows:
        raise EvalInputError(f"data {path}: has no rows")
    missing = [c for c in ("index", "image", "question", "answer") if c not in rows[0]]
    if missing:
        raise EvalInputError(f"data {path}: missing column(s) {missing}")
    by_index = {row["index"]: row["image"] for row in rows}
    items, seen = [], set()
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"data {path}: row {number}"
        qid = row["index"]
        if qid in seen:
            raise EvalInputError(f"{where}: index {qid!r} repeats an earlier row")
        seen.add(qid)
        image = row["image"] or ""
        if len(image) < 64 and image in by_index and image != qid:  # a reference to another row's image
            image = by_index[image]
        choices = [row[c] for c in option_letters(26) if _cell(row, c) is not None]
        answer = row["answer"]
        answers: list[Any] = [answer]
        if answer.startswith("[") and answer.endswith("]"):
            try:
                answers = list(ast.literal_eval(answer))
            except (ValueError, SyntaxError):
                answers = [answer]
        gold = Question(qid, tuple(answers), _cell(row, "category"), qid, tuple(choices) if choices else None)
        prompt = build_prompt(benchmark, row["question"], choices=choices or None, hint=_cell(row, "hint"))
        items.append(EvalItem(gold, prompt, _base64_image(image, where)))
    return items


def _base64_image(data: str, where: str) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise EvalInputError(f"{where}: the image column is not base64") from None

    return load


def synthdoc_items(benchmark: Benchmark, documents: int, seed: int, split: str = "test") -> list[EvalItem]:
    """Every question of ``documents`` synthdoc pages of ``split`` (page ``i`` from its seed string), ids
    ``"<page>-<question>"``, the category the question kind."""
    from llava_uhd.synth.synthdoc import all_questions, document_seed, make_document, render_document

    @lru_cache(maxsize=2)  # a page's questions are consecutive: render each page once
    def page(index: int) -> Any:
        return render_document(make_document(document_seed(split, index, seed)))

    items = []
    for index in range(documents):
        doc = make_document(document_seed(split, index, seed))
        for number, q in enumerate(all_questions(doc)):
            gold = Question(f"{index}-{number}", (q.answer,), q.kind, str(index))
            items.append(EvalItem(gold, build_prompt(benchmark, q.question), lambda i=index: page(i)))
    return items
