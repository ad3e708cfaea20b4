"""Per-question scores of the short-answer benchmarks, as their evaluators compute them (no torch).

* :func:`anls`: DocVQA / ST-VQA average normalised Levenshtein similarity, threshold 0.5.
* :func:`relaxed_accuracy`: ChartQA, a number within 5% of a numeric answer, exact otherwise.
* :func:`gqa_match`: GQA, the prediction as LLaVA hands it to the GQA evaluator, then exact.
* :func:`exact_match`: the same string after stripping surrounding whitespace (synthdoc).
* :func:`extract_choice` and :func:`choice_accuracy`: multiple choice (ScienceQA, MMBench style).

VQA accuracy is in :mod:`llava_uhd.eval.vqa`, POPE and MME in :mod:`llava_uhd.eval.yesno`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from llava_uhd.errors import EvalInputError

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05  # ChartQA: "within 5% of the gold answer" for numeric answers


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b`` over code points (insert, delete, substitute: cost 1 each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _similarity(prediction: str, answer: str) -> float:
    p, a = prediction.lower().strip(), answer.lower().strip()
    longest = max(len(p), len(a))
    # Both empty: the evaluator divides 0 by 0 here; two empty strings are identical, so similarity 1.
    if longest == 0:
        return 1.0
    return 1 - levenshtein(p, a) / longest


def anls(prediction: str, answers: Sequence[str]) -> float:
    """ANLS of one question: the best similarity ``1 - distance / longer length`` over ``answers`` after
    lower-casing and stripping both sides; a similarity below 0.5 counts 0 (exactly 0.5 is kept).

    An empty prediction against an empty answer scores 1 (the evaluator's 0 / 0, defined here as identical
    strings); against a non-empty answer it scores 0."""
    answers = _answer_list(answers, "ANLS")
    best = max(_similarity(prediction, a) for a in answers)
    return best if best >= ANLS_THRESHOLD else 0.0


def _to_float(text: str) -> float | None:
    """ChartQA's number reading: Python's ``float``, with a trailing "%" meaning hundredths."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, answer: str) -> bool:
    """ChartQA relaxed correctness: numbers within 5% of a non-zero numeric answer, else case-insensitive
    equality (a zero answer, having no relative tolerance, is matched as text)."""
    predicted, target = _to_float(prediction), _to_float(answer)
    if predicted is not None and target:
        return abs(predicted - target) / abs(target) <= RELAXED_TOLERANCE
    return prediction.lower() == answer.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the stripped ``prediction`` relaxed-matches any of ``answers``, else 0.0."""
    answers = _answer_list(answers, "relaxed accuracy")
    return float(any(relaxed_match(prediction.strip(), a) for a in answers))


def gqa_match(prediction: str, answers: Sequence[str]) -> float:
    """GQA accuracy: trailing periods dropped and lower-cased (as LLaVA converts predictions for the GQA
    evaluator), then compared exactly with the answer."""
    answers = _answer_list(answers, "GQA")
    return float(prediction.rstrip(".").lower() in answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if ``prediction`` equals one of ``answers`` once surrounding whitespace is stripped."""
    answers = _answer_list(answers, "exact match")
    return float(prediction.strip() in {a.strip() for a in answers})


# --- multiple choice ------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_OPTION_SEPARATORS = ".()[],:;!*#{}"


def option_letters(count: int) -> tuple[str, ...]:
    """The first ``count`` option letters, "A", "B", ..."""
    if not 1 <= count <= len(string.ascii_uppercase):
        raise EvalInputError(f"a multiple-choice question needs 1 to 26 choices, got {count}")
    return tuple(string.ascii_uppercase[:count])


def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks among ``choices``, or None if it picks none or several.

    In order (the first rule that decides wins): the answer is a letter; it starts "X. "; it says
    "The answer is X." exactly once (the three ScienceQA rules); exactly one letter stands alone as a word
    once the separators ``.()[],:;!*#{}`` are spaces ("(B)", "B) a cat"); exactly one choice's text appears
    in the lower-cased answer (MMBench's fall-back, for answers at most twice as long as all choices).
    """
    letters = option_letters(len(choices))
    text = prediction.strip()
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    said = _ANSWER_IS.findall(text)
    if len(said) == 1:
        return said[0] if said[0] in letters else None
    spaced = text
    for mark in _OPTION_SEPARATORS:
        spaced = spaced.replace(mark, " ")
    words = set(spaced.split())
    standing = [letter for letter in letters if letter in words]
    if len(standing) == 1:
        return standing[0]
    if standing:
        return None
    lowered = text.lower()
    if not lowered or len(lowered) > 2 * sum(len(str(c)) for c in choices):
        return None
    named = [
        letter for letter, choice in zip(letters, choices, strict=True) if str(choice).lower() in lowered
    ]
    return named[0] if len(named) == 1 else None


def answer_letter(answer: str | int, choices: Sequence[str]) -> str:
    """The gold option as a letter: a letter itself, a 0-based index, or the text of one choice."""
    letters = option_letters(len(choices))
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return letters[answer]
        raise EvalInputError(f"answer index {answer} is out of range for {len(choices)} choices")
    if isinstance(answer, str):
        if answer.strip() in letters:
            return answer.strip()
        if answer in choices:
            return letters[list(choices).index(answer)]
    raise EvalInputError(f"answer {answer!r} is neither a letter, an index nor a choice of {list(choices)}")


def choice_accuracy(prediction: str, answer: str | int, choices: Sequence[str]) -> float:
    """1.0 if the letter :func:`extract_choice` reads from ``prediction`` is the gold option, else 0.0."""
    gold = answer_letter(answer, choices)
    return float(extract_choice(prediction, choices) == gold)


def _answer_list(answers: Sequence[str], metric: str) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise EvalInputError(f"{metric} needs a non-empty list of answer strings, got {answers!r}")
    return list(answers)
