"""The benchmark metrics on hand-worked examples, the awkward ones first."""

from __future__ import annotations

import pytest

from llava_uhd.errors import EvalInputError
from llava_uhd.eval.metrics import (
    anls,
    choice_accuracy,
    exact_match,
    extract_choice,
    gqa_match,
    levenshtein,
    relaxed_accuracy,
)
from llava_uhd.eval.vqa import normalize_vqa_answer, vqa_accuracy
from llava_uhd.eval.yesno import YesNoItem, mme_scores, mme_yes_no, pope_scores, pope_yes_no


def ten(*groups: tuple[str, int]) -> list[str]:
    answers = [a for a, n in groups for _ in range(n)]
    assert len(answers) == 10
    return answers


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("The Dog.", "dog"),
        ("yes!", "yes"),
        ("left-hand", "left hand"),  # a mark between letters becomes a space
        ("yes - no", "yes no"),  # a mark beside a space is deleted
        ("3,000", "3000"),  # commas go before the punctuation rule
        ("2.5", "2.5"),
        ("2.", "2"),  # the period rule also strips a period after a digit
        ("dont", "don't"),
        ("what's up?", "what 's up"),
        ("none", "0"),
        ("line\none\ttab", "line 1 tab"),
        ("", ""),
        ("Ｙｅｓ", "ｙｅｓ"),  # full-width letters are lower-cased but not folded to ASCII
    ],
)
def test_vqa_normalisation(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_removes_at_most_32_periods() -> None:
    assert normalize_vqa_answer("yes" + "." * 32) == "yes"
    assert normalize_vqa_answer("yes" + "." * 40) == "yes" + "." * 8
    assert vqa_accuracy("yes" + "." * 40, ten(("yes", 10))) == 0.0
    assert vqa_accuracy("yes" + "." * 32, ten(("yes", 10))) == 1.0


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("two", ten(("2", 10)), 1.0),
        ("2", ten(("two", 10)), 1.0),
        ("a dog", ten(("dog", 3), ("cat", 7)), 0.9),  # 3 * 2/3 + 7 * 1, over 10
        ("Yes.", ten(("yes", 10)), 1.0),
        ("dog", ten(("dog", 1), ("cat", 9)), 0.3),  # 9 subsets hold the one match
        ("dog", ten(("dog", 2), ("cat", 8)), 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("bird", ten(("dog", 2), ("cat", 8)), 0.0),
        ("２", ten(("2", 10)), 0.0),
        ("", ten(("yes", 10)), 0.0),
        ("", ten(("", 10)), 1.0),
    ],
)
def test_vqa_accuracy(prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("answers", [["yes"] * 9, ["yes"] * 11, [], "yes"])
def test_vqa_needs_ten_answers(answers: list[str]) -> None:
    with pytest.raises(EvalInputError, match="exactly 10 human answers"):
        vqa_accuracy("yes", answers)


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("ａ", "a") == 1


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("abc", ["abd"], 2 / 3),
        ("ab", ["ac"], 0.5),  # exactly at the threshold: kept
        ("abcde", ["abxyz"], 0.0),  # similarity 0.4 < 0.5
        (" Hello ", ["hello"], 1.0),
        ("helo", ["nothing", "hello"], 0.8),  # the best answer counts
        ("", [""], 1.0),  # the evaluator's 0/0, defined as identical
        ("", ["a"], 0.0),
        ("a", [""], 0.0),
    ],
)
def test_anls(prediction: str, answers: list[str], expected: float) -> None:
    assert anls(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("10.4", "10", 1.0),
        ("10.5", "10", 1.0),  # exactly 5%
        ("10.6", "10", 0.0),
        ("50%", "0.5", 1.0),
        ("0", "0", 1.0),  # a zero answer is matched as text
        ("0.0", "0", 0.0),
        ("Yes", "yes", 1.0),
        (" 12 ", "12", 1.0),
        ("twelve", "12", 0.0),
        ("-95", "-100", 1.0),
    ],
)
def test_relaxed_accuracy(prediction: str, answer: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, [answer]) == expected


def test_gqa_and_exact() -> None:
    assert gqa_match("Yes.", ["yes"]) == 1.0
    assert gqa_match("The dog", ["the dog"]) == 1.0
    assert gqa_match("yes", ["Yes"]) == 0.0  # the gold answer is compared as given
    assert exact_match(" AB ", ["AB"]) == 1.0
    assert exact_match("ab", ["AB"]) == 0.0


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("B. dog", "B"),
        ("The answer is C.", "C"),
        ("(A)", "A"),
        ("Answer: B) dog", "B"),
        ("dog", "B"),
        ("it is a dog or a bird", None),
        ("A or B", None),
        ("D", None),
        ("", None),
    ],
)
def test_extract_choice(prediction: str, letter: str | None) -> None:
    assert extract_choice(prediction, ["cat", "dog", "bird"]) == letter


def test_choice_accuracy_gold_forms() -> None:
    choices = ["cat", "dog", "bird"]
    assert choice_accuracy("B", "B", choices) == 1.0
    assert choice_accuracy("B", 1, choices) == 1.0
    assert choice_accuracy("B", "dog", choices) == 1.0
    assert choice_accuracy("C", 1, choices) == 0.0
    with pytest.raises(EvalInputError, match="out of range"):
        choice_accuracy("B", 3, choices)


@pytest.mark.parametrize(
    ("prediction", "label"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # LLaVA's rule knows "No", "no" and "not" only
        ("", "yes"),
    ],
)
def test_pope_yes_no(prediction: str, label: str) -> None:
    assert pope_yes_no(prediction) == label


@pytest.mark.parametrize(
    ("prediction", "label"),
    [("Yes", "yes"), ("No.", "no"), ("Not really", "no"), ("  yes", "other"), ("y", "other"), ("", "other")],
)
def test_mme_yes_no(prediction: str, label: str) -> None:
    assert mme_yes_no(prediction) == label


def test_pope_scores() -> None:
    items = [
        YesNoItem("random", "yes", "Yes"),
        YesNoItem("random", "yes", "No"),
        YesNoItem("random", "no", "Yes, it is."),
        YesNoItem("random", "no", "There is no cat."),
        YesNoItem("adversarial", "yes", None),  # missing: a false negative, never a positive
        YesNoItem("adversarial", "no", "no"),
    ]
    scores = pope_scores(items)
    random = scores["splits"]["random"]
    assert (random["tp"], random["fp"], random["tn"], random["fn"]) == (1, 1, 1, 1)
    assert random["accuracy"] == random["precision"] == random["recall"] == random["f1"] == 0.5
    assert random["yes_ratio"] == 0.5
    adversarial = scores["splits"]["adversarial"]
    assert adversarial["accuracy"] == 0.5 and adversarial["missing"] == 1
    assert adversarial["precision"] == 0.0 and adversarial["yes_ratio"] == 0.0  # 0/0 is reported as 0
    assert scores["overall"]["accuracy"] == pytest.approx(3 / 6)


def test_mme_scores() -> None:
    items = [
        YesNoItem("count", "Yes", "Yes", "1.jpg"),
        YesNoItem("count", "No", "No", "1.jpg"),
        YesNoItem("count", "Yes", "Yes", "2.jpg"),
        YesNoItem("count", "No", "Yes", "2.jpg"),
        YesNoItem("code_reasoning", "Yes", "yes"),  # no image: paired with its neighbour
        YesNoItem("code_reasoning", "No", "no"),
    ]
    scores = mme_scores(items)
    count = scores["subtasks"]["count"]
    assert (count["accuracy"], count["accuracy_plus"], count["score"]) == (75.0, 50.0, 125.0)
    assert scores["subtasks"]["code_reasoning"]["score"] == 200.0
    assert (scores["perception"], scores["cognition"], scores["total"]) == (125.0, 200.0, 325.0)
    assert scores["reported"] == "perception"
