"""Yes/no benchmarks: POPE (hallucination, per split) and MME (14 subtasks), as their evaluators score them.

POPE reads a free-form answer as LLaVA's POPE evaluator does; MME as the MME evaluation tool does (the two
rules differ, and each benchmark's numbers are only comparable under its own). A question without a
prediction is counted as answered wrongly: in POPE it is neither a "yes" nor a "no" (it cannot be a true
or false positive, and counts as a false negative when the truth is "yes").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llava_uhd.errors import EvalInputError

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip


def pope_yes_no(prediction: str) -> str:
    """ "yes" or "no" as LLaVA's POPE evaluator reads an answer: only its first sentence (up to the first
    "."), commas removed, split on spaces; "no" if a word is "no", "No" or "not", else "yes"."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def mme_yes_no(prediction: str) -> str:
    """ "yes", "no" or "other" as the MME tool reads an answer: lower-cased; "yes"/"no" as they are, else
    "yes" if its first four characters hold "yes", else "no" if they hold "no", else "other"."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _gold_yes_no(answer: str, where: str) -> str:
    label = answer.strip().lower().rstrip(".")
    if label not in ("yes", "no"):
        raise EvalInputError(f"{where}: the answer must be yes or no, got {answer!r}")
    return label


@dataclass(frozen=True)
class YesNoItem:
    """One question: its split or subtask, the gold "yes"/"no", the prediction (None: missing), and for
    MME the image whose two questions are paired for accuracy+."""

    category: str
    answer: str
    prediction: str | None
    image: str | None = None


def pope_scores(items: Iterable[YesNoItem]) -> dict[str, Any]:
    """Per split and over all items: accuracy, precision, recall, F1 and the yes-ratio (the share of
    questions answered "yes"), with the counts behind them. A rate whose denominator is 0 is 0."""
    by_split: dict[str, list[YesNoItem]] = {}
    every = list(items)
    for item in every:
        by_split.setdefault(item.category, []).append(item)
    result = {split: _pope(group) for split, group in sorted(by_split.items())}
    return {"splits": result, "overall": _pope(every)}


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _pope(items: Sequence[YesNoItem]) -> dict[str, Any]:
    tp = fp = tn = fn = missing = 0
    for item in items:
        gold = _gold_yes_no(item.answer, f"POPE split {item.category!r}")
        said = None if item.prediction is None else pope_yes_no(item.prediction)
        missing += said is None
        tp += said == "yes" and gold == "yes"
        fp += said == "yes" and gold == "no"
        tn += said == "no" and gold == "no"
        fn += said != "yes" and gold == "yes"
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(items)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(items)),
        "count": len(items),
        "missing": missing,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def mme_scores(items: Iterable[YesNoItem]) -> dict[str, Any]:
    """Per subtask: accuracy (per question) and accuracy+ (per image, both questions right), both in
    percent, and their sum, the subtask score (at most 200). ``perception`` sums the ten perception
    subtasks (at most 2000: the total LLaVA reports), ``cognition`` the four cognition ones (at most 800),
    ``total`` both (at most 2800). A subtask not in MME's two lists counts in neither total.

    Questions are paired by ``image``; an item without one is paired with its neighbour in the file order
    of its subtask (MME lists each image's two questions one after the other).
    """
    by_task: dict[str, list[YesNoItem]] = {}
    for item in items:
        by_task.setdefault(item.category, []).append(item)
    subtasks = {task: _mme_task(task, group) for task, group in by_task.items()}
    perception = sum(s["score"] for t, s in subtasks.items() if t in MME_PERCEPTION)
    cognition = sum(s["score"] for t, s in subtasks.items() if t in MME_COGNITION)
    return {
        "subtasks": dict(sorted(subtasks.items())),
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "reported": "perception",
    }


def _mme_task(task: str, items: Sequence[YesNoItem]) -> dict[str, Any]:
    images: dict[str, list[bool]] = {}
    correct = missing = 0
    for position, item in enumerate(items):
        gold = _gold_yes_no(item.answer, f"MME subtask {task!r}")
        right = item.prediction is not None and mme_yes_no(item.prediction) == gold
        correct += right
        missing += item.prediction is None
        key = item.image if item.image is not None else f"#pair{position // 2}"
        images.setdefault(key, []).append(right)
    both = sum(all(v) for v in images.values())
    accuracy = 100.0 * correct / len(items)
    accuracy_plus = 100.0 * both / len(images)
    return {
        "accuracy": accuracy,
        "accuracy_plus": accuracy_plus,
        "score": accuracy + accuracy_plus,
        "questions": len(items),
        "images": len(images),
        "missing": missing,
    }
