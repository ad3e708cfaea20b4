"""Score a file of predictions against a file of ground truth with one benchmark's metric (no torch).

Predictions are JSONL lines ``{"question_id", "answer"}`` (``"text"``, as LLaVA's answer files name it,
is read when there is no ``"answer"``); ground truth lines are ``{"question_id", "answers": [...]}`` (or
one ``"answer"`` string) plus what the metric needs: ``category`` (MME subtask, POPE split), ``image``
(MME pairs), ``choices`` (multiple choice). Ids are compared as strings, so ``7`` and ``"7"`` are the same
question. A prediction line with an ``"error"`` and no answer (a question ``llava-uhd eval`` could not
answer) counts as no prediction. A ground-truth question without a prediction scores 0 and is counted as ``missing``;
predictions for ids not in the ground truth are counted as ``extra`` and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_uhd.errors import EvalInputError
from llava_uhd.eval.metrics import anls, choice_accuracy, exact_match, gqa_match, relaxed_accuracy
from llava_uhd.eval.vqa import vqa_accuracy
from llava_uhd.eval.yesno import YesNoItem, mme_scores, mme_yes_no, pope_scores, pope_yes_no

METRICS: tuple[str, ...] = ("vqa", "anls", "relaxed", "exact", "gqa", "pope", "mme", "mc")

_ANSWER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "vqa": vqa_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
    "exact": exact_match,
    "gqa": gqa_match,
}


@dataclass(frozen=True)
class Question:
    """One ground-truth line: its id as written, the answers, and the fields some metrics need."""

    question_id: str | int
    answers: tuple[Any, ...]
    category: str | None = None
    image: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return str(self.question_id)


def read_jsonl(path: Path, role: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``path``; any bad line is an error naming it."""
    if path.is_dir():
        raise EvalInputError(f"{role} {path}: is a folder, not a JSONL file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EvalInputError(f"{role} {path}: no such file") from None
    except OSError as exc:
        raise EvalInputError(f"{role} {path}: cannot be read ({exc.strerror or exc})") from None
    records = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise EvalInputError(f"{role} {path}: line {number}: not UTF-8 text ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{role} {path}: line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise EvalInputError(
                f"{role} {path}: line {number}: expected an object, got {type(record).__name__}"
            )
        records.append((number, record))
    return records


def _question_id(record: dict[str, Any], where: str) -> str | int:
    qid = record.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, str | int):
        shown = "missing" if "question_id" not in record else f"{qid!r}, not a string or an integer"
        raise EvalInputError(f"{where}: question_id is {shown}")
    return qid


def _no_repeats(ids: Iterable[tuple[str | int, str]], role: str, path: Path) -> None:
    seen: dict[str, str] = {}
    for qid, where in ids:
        if str(qid) in seen:
            raise EvalInputError(f"{role} {path}: question_id {qid!r} repeats ({seen[str(qid)]} and {where})")
        seen[str(qid)] = where


def load_predictions(path: Path) -> dict[str, str]:
    """Prediction text by id (as a string) from a JSONL file of ``{"question_id", "answer"}`` lines."""
    predictions: dict[str, str] = {}
    ids = []
    for number, record in read_jsonl(path, "predictions"):
        where = f"predictions {path}: line {number}"
        qid = _question_id(record, where)
        answer = record.get("answer", record.get("text"))
        ids.append((qid, f"line {number}"))
        if answer is None and "error" in record:
            continue  # a question the run could not answer: scored as missing
        if not isinstance(answer, str):
            shown = "missing" if answer is None else f"{type(answer).__name__}, not a string"
            raise EvalInputError(f"{where}: answer is {shown}")
        predictions[str(qid)] = answer
    _no_repeats(ids, "predictions", path)
    return predictions


def load_ground_truth(path: Path) -> list[Question]:
    """The questions of a ground-truth JSONL file, in file order."""
    questions = []
    for number, record in read_jsonl(path, "ground truth"):
        where = f"ground truth {path}: line {number}"
        qid = _question_id(record, where)
        answers = record["answers"] if "answers" in record else record.get("answer")
        if isinstance(answers, str | int) and not isinstance(answers, bool):
            answers = [answers]
        if not isinstance(answers, list) or not answers:
            raise EvalInputError(f"{where}: answers must be a non-empty list, got {answers!r}")
        choices = record.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
        ):
            raise EvalInputError(f"{where}: choices must be a list of strings, got {choices!r}")
        for name in ("category", "image"):
            if record.get(name) is not None and not isinstance(record[name], str):
                raise EvalInputError(f"{where}: {name} must be a string, got {record[name]!r}")
        questions.append(
            Question(
                qid,
                tuple(answers),
                record.get("category"),
                record.get("image"),
                None if choices is None else tuple(choices),
            )
        )
    _no_repeats(((q.question_id, f"line {n}") for n, q in enumerate(questions, 1)), "ground truth", path)
    return questions


def _item_score(metric: str, question: Question, prediction: str) -> float:
    where = f"question {question.question_id!r}"
    try:
        if metric in _ANSWER_METRICS:
            return float(_ANSWER_METRICS[metric](prediction, list(question.answers)))
        gold = question.answers[0]
        if metric == "mc":
            if question.choices is None:
                raise EvalInputError("multiple choice needs the question's choices")
            return choice_accuracy(prediction, gold, question.choices)
        if not isinstance(gold, str):
            raise EvalInputError(f"the answer must be yes or no, got {gold!r}")
        said = pope_yes_no(prediction) if metric == "pope" else mme_yes_no(prediction)
        return float(said == gold.strip().lower().rstrip("."))
    except EvalInputError as exc:
        raise EvalInputError(f"{where}: {exc}") from None


def score(
    metric: str, questions: Sequence[Question], predictions: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The aggregate of ``metric`` over ``questions`` and the per-question scores in their order.

    The aggregate always has ``metric``, ``score``, ``count``, ``missing`` and ``extra``. ``score`` is the
    mean per-question score in [0, 1], except for MME, whose ``score`` is the perception total (0-2000);
    POPE adds ``splits`` (every rate per split) and its overall rates; MME adds ``subtasks`` and the
    ``perception``, ``cognition`` and ``total`` sums.
    """
    if metric not in METRICS:
        raise EvalInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "mme" and any(q.category is None for q in questions):
        raise EvalInputError("mme needs a category (the subtask) on every ground-truth line")
    per_item = []
    for question in questions:
        prediction = predictions.get(question.key)
        value = 0.0 if prediction is None else _item_score(metric, question, prediction)
        per_item.append({"question_id": question.question_id, "score": value})
    keys = {q.key for q in questions}
    counts = {
        "count": len(questions),
        "missing": sum(q.key not in predictions for q in questions),
        "extra": sum(k not in keys for k in predictions),
    }
    if metric in ("pope", "mme"):
        items = [
            YesNoItem(q.category or "all", str(q.answers[0]), predictions.get(q.key), q.image)
            for q in questions
        ]
        if metric == "pope":
            rates = pope_scores(items)
            overall = {k: v for k, v in rates["overall"].items() if k not in ("count", "missing")}
            return {
                "metric": metric,
                "score": overall["accuracy"],
                **counts,
                **overall,
                "splits": rates["splits"],
            }, per_item
        rates = mme_scores(items)
        return {"metric": metric, "score": rates["perception"], **counts, **rates}, per_item
    mean = sum(p["score"] for p in per_item) / len(per_item) if per_item else 0.0
    return {"metric": metric, "score": mean, **counts}, per_item


def score_files(
    metric: str, predictions: Path, ground_truth: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`score` over a predictions file and a ground-truth file."""
    if metric not in METRICS:
        raise EvalInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    questions = load_ground_truth(ground_truth)
    if not questions:
        raise EvalInputError(f"ground truth {ground_truth}: has no questions")
    return score(metric, questions, load_predictions(predictions))
