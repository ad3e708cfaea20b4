r"""VQA accuracy as the VQA and TextVQA evaluators compute it (VQAv2, TextVQA, VizWiz).

An answer is normalised by the EvalAI answer processor that the TextVQA evaluator applies to the
prediction and to each of the ten human answers alike (the same processor LLaVA runs over VQAv2 and VizWiz
predictions before submitting them): lower-case; drop commas and question marks; split off "'s"; tabs and
newlines to spaces; the punctuation rule; number words to digits; articles dropped; contractions restored.
The score is ``min(#humans who gave the answer / 3, 1)`` averaged over the ten subsets of nine humans.

Quirks of the original code kept on purpose, because scores must match it:

* the period rule's look-behind is written as a look-ahead (``(?!<=\d)``), so every period not followed by
  a digit goes, after a digit too ("2." -> "2");
* that substitution is given ``re.UNICODE`` where its ``count`` belongs, so at most the first 32 such
  periods of an answer are removed (an answer ending in 40 periods keeps 8);
* contraction keys with capitals ("Im", "Ive") can never match, since words are lower-cased first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llava_uhd.errors import EvalInputError

HUMAN_ANSWERS = 10  # answers per question in VQAv2, TextVQA and VizWiz; the evaluator asserts it

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# the evaluators' contraction map, written "without=with" (keys are single words, as they are looked up)
_CONTRACTION_TABLE = """
'ow'sat='ow's'at 'ows'at='ow's'at I'dve=I'd've Id've=I'd've Im=I'm Ive=I've aint=ain't arent=aren't
cant=can't couldn'tve=couldn't've couldnt=couldn't couldnt've=couldn't've couldve=could've
didnt=didn't doesnt=doesn't dont=don't hadn'tve=hadn't've hadnt=hadn't hadnt've=hadn't've
hasnt=hasn't havent=haven't he'dve=he'd've hed=he'd hed've=he'd've hes=he's howd=how'd howll=how'll
hows=how's isnt=isn't it'dve=it'd've itd=it'd itd've=it'd've itll=it'll let's=let's maam=ma'am
mightn'tve=mightn't've mightnt=mightn't mightnt've=mightn't've mightve=might've mustnt=mustn't
mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at
shant=shan't she'dve=she'd've she's=she's shed've=she'd've shouldn'tve=shouldn't've
shouldnt=shouldn't shouldnt've=shouldn't've shouldve=should've somebody'd=somebodyd
somebody'dve=somebody'd've somebodyd've=somebody'd've somebodyll=somebody'll somebodys=somebody's
someone'dve=someone'd've someoned=someone'd someoned've=someone'd've someonell=someone'll
someones=someone's something'dve=something'd've somethingd=something'd somethingd've=something'd've
somethingll=something'll thats=that's there'dve=there'd've thered=there'd thered've=there'd've
therere=there're theres=there's they'dve=they'd've theyd=they'd theyd've=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't we'dve=we'd've wed've=we'd've werent=weren't
weve=we've whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've who'dve=who'd've whod=who'd whod've=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldn'tve=wouldn't've
wouldnt=wouldn't wouldnt've=wouldn't've wouldve=would've y'all'dve=y'all'd've y'alld've=y'all'd've
y'allll=y'all'll yall=y'all yall'd've=y'all'd've yall'll=y'all'll you'dve=you'd've youd=you'd
youd've=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=") for pair in _CONTRACTION_TABLE.split())

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = re.UNICODE  # the flag's value, 32, passed as the count (module docstring)
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")


def process_punctuation(text: str) -> str:
    """The evaluators' punctuation rule: each mark next to a space (or any mark, when the text has a comma
    between digits) is deleted, otherwise replaced by a space; then periods not before a digit go."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, _PERIOD_COUNT)


def process_digits_articles(text: str) -> str:
    """Lower-cased words, number words as digits, articles dropped, contractions restored, one space apart."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """``answer`` as the TextVQA evaluator's EvalAI processor normalises it before comparing."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of ``prediction`` against the ten human ``answers``, in [0, 1].

    Each human is left out in turn; the prediction scores ``min(matches among the other nine / 3, 1)``
    and the ten scores are averaged. Raises :class:`EvalInputError` unless there are exactly ten answers
    (the evaluator asserts it; fewer would silently change what a match is worth).
    """
    if isinstance(answers, str) or len(answers) != HUMAN_ANSWERS:
        got = "a string" if isinstance(answers, str) else f"{len(answers)} answers"
        raise EvalInputError(f"VQA accuracy needs exactly {HUMAN_ANSWERS} human answers, got {got}")
    humans = [normalize_vqa_answer(a) for a in answers]
    predicted = normalize_vqa_answer(prediction)
    scores = []
    for left_out in range(HUMAN_ANSWERS):
        matches = sum(1 for i, h in enumerate(humans) if i != left_out and h == predicted)
        scores.append(min(1, float(matches) / 3))
    return sum(scores) / len(scores)
