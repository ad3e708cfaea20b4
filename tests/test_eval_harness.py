"""The harness adapters on the bundled model: lmms-eval-shaped requests and a VLMEvalKit message list."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from llava_uhd.errors import EvalInputError
from llava_uhd.eval.harness import HarnessModel
from llava_uhd.synth.synthdoc import all_questions, document_seed, make_document, render_document


@pytest.fixture(scope="module")
def page():
    doc = make_document(document_seed("test", 0))
    return render_document(doc), all_questions(doc)


@pytest.fixture(scope="module")
def harness(page):
    model = HarnessModel(None, device="cpu", batch_size=2, max_new_tokens=4)
    image, _ = page
    model.task_dict = {"synthdoc": {"test": [{"image": image}]}}
    return model


def to_visual(doc):
    return [doc["image"]]


def test_generate_until_matches_generate_inner(harness, page):
    image, questions = page
    requests = [
        SimpleNamespace(
            args=(q.question, {"until": ["\n"], "max_new_tokens": 4}, to_visual, 0, "synthdoc", "test")
        )
        for q in questions[:3]
    ]
    answers = harness.generate_until(requests)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # VLMEvalKit's interleaved message: the image, then the question
    message = [{"type": "image", "value": image}, {"type": "text", "value": questions[0].question}]
    assert harness.generate_inner(message, dataset="synthdoc") == answers[0]


def test_generate_until_cuts_at_until(harness, page):
    _, questions = page
    request = SimpleNamespace(args=(questions[0].question, {}, to_visual, 0, "synthdoc", "test"))
    whole = harness.generate_until([request])[0]
    if len(whole) >= 2:
        cut = SimpleNamespace(
            args=(questions[0].question, {"until": [whole[1]]}, to_visual, 0, "synthdoc", "test")
        )
        assert harness.generate_until([cut])[0] == whole.split(whole[1], 1)[0]


def test_loglikelihood_prefers_the_greedy_answer(harness, page):
    _, questions = page
    question = questions[0].question
    greedy = harness.generate_until([SimpleNamespace(args=(question, {}, to_visual, 0, "synthdoc", "test"))])[
        0
    ]
    other = "99" if greedy != "99" else "88"
    (good, good_greedy), (bad, bad_greedy) = harness.loglikelihood(
        [
            SimpleNamespace(args=(question, greedy, to_visual, 0, "synthdoc", "test")),
            SimpleNamespace(args=(question, lambda doc: other, to_visual, 0, "synthdoc", "test")),
        ]
    )
    assert good < 0 and math.isfinite(good) and good_greedy
    assert bad < good and not bad_greedy


def test_bad_requests(harness):
    with pytest.raises(EvalInputError, match="no document 5"):
        harness.generate_until([SimpleNamespace(args=("q", {}, to_visual, 5, "synthdoc", "test"))])
    with pytest.raises(EvalInputError, match="type must be"):
        harness.generate_inner([{"type": "video", "value": "x.mp4"}])
