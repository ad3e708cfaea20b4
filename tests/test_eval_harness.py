"""The harness adapters on the bundled model: lmms-eval-shaped requests and a VLMEvalKit message list."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

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


# --- lmms-eval's own objects: its Instance requests, its model registry, its constructor call --------------


@pytest.fixture(scope="module")
def lmms_eval_models():
    pytest.importorskip("lmms_eval", reason="lmms-eval (extra eval) is not installed")
    import lmms_eval.models

    return lmms_eval.models


@pytest.fixture(scope="module")
def documents():
    """A small in-memory task as lmms-eval's evaluator hands it over: ``task_dict[task][split][doc_id]``."""
    docs = []
    for number in range(2):
        doc = make_document(document_seed("test", number))
        docs += [
            {"image": render_document(doc), "question": q.question, "answer": q.answer}
            for q in all_questions(doc)[:2]
        ]
    return {"synthdoc": {"test": docs}}


@pytest.fixture(scope="module")
def lmms_model(lmms_eval_models, documents):
    """Our class as lmms-eval builds it: looked up by name, then ``create_from_arg_string`` with the
    ``--model_args`` text and the evaluator's own settings."""
    from llava_uhd.bundled import bundled_model_dir

    cls = lmms_eval_models.get_model("llava_uhd")
    lm = cls.create_from_arg_string(
        f"pretrained={bundled_model_dir()},max_new_tokens=8",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"},
    )
    lm.task_dict = documents
    return lm


@pytest.fixture(scope="module")
def reference():
    """The bundled model through our own loader, to answer the same questions with :func:`answer`."""
    from llava_uhd.auto import load_pretrained
    from llava_uhd.bundled import bundled_model_dir

    return load_pretrained(bundled_model_dir(), device="cpu", dtype=torch.float32)


def lmms_instance(request_type, arguments, doc_id):
    from lmms_eval.api.instance import Instance

    return Instance(
        request_type=request_type,
        arguments=arguments,
        idx=0,
        metadata={"task": "synthdoc", "doc_id": doc_id, "repeats": 1},
    )


def doc_to_target(doc):
    return doc["answer"]


def test_lmms_eval_resolves_llava_uhd_to_our_class(lmms_eval_models):
    from lmms_eval.api.model import lmms

    from llava_uhd.eval.lmms_eval_model import LlavaUHDLmms

    # the registry lmms-eval's evaluator asks (models.get_model), filled from our entry point
    resolved = lmms_eval_models.MODEL_REGISTRY_V2.resolve("llava_uhd")
    assert (resolved.model_type, resolved.class_path) == (
        "simple",
        "llava_uhd.eval.lmms_eval_model.LlavaUHDLmms",
    )
    assert lmms_eval_models.get_model("llava_uhd") is LlavaUHDLmms
    assert issubclass(LlavaUHDLmms, lmms) and LlavaUHDLmms.is_simple


def test_lmms_generate_until_equals_our_generate(lmms_model, documents, reference):
    from llava_uhd.inference.generate import answer

    docs = documents["synthdoc"]["test"]
    gen_kwargs = {"until": ["\n\n"], "max_new_tokens": 8, "do_sample": False, "temperature": 0, "top_p": None}
    requests = [
        lmms_instance(
            "generate_until", (doc["question"], dict(gen_kwargs), to_visual, i, "synthdoc", "test"), i
        )
        for i, doc in enumerate(docs)
    ]
    answers = lmms_model.generate_until(requests)
    model, processor = reference
    expected = [answer(model, processor, doc["image"], doc["question"], max_new_tokens=8) for doc in docs]
    assert answers == expected
    assert all(answers), "the bundled model answers every synthdoc question with some text"


def _answer_log_prob(model, processor, images, question, continuation):
    """log p(continuation + end of turn | prompt), summed token by token from the model's logits on the
    prompt followed by the answer's ids (tokenized as the template appends them: " answer</s>")."""
    from llava_uhd.inference.generate import prompt_inputs
    from llava_uhd.tokens import encode_text

    tokenizer = processor.tokenizer
    inputs = prompt_inputs(processor, images, question, model.config.template).model_inputs()
    answer_ids = encode_text(tokenizer, f" {continuation}{tokenizer.eos_token}", at_start=False)
    prompt_length = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        logits = model(**inputs).logits[0].double()
    total, greedy = 0.0, True
    for k, token in enumerate(answer_ids):
        row = torch.log_softmax(logits[prompt_length - 1 + k], dim=-1)
        total += row[token].item()
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


def test_lmms_loglikelihood_is_the_answer_tokens_log_prob(lmms_model, documents, reference):
    from llava_uhd.inference.generate import answer

    model, processor = reference
    doc = documents["synthdoc"]["test"][0]
    greedy_answer = answer(model, processor, doc["image"], doc["question"], max_new_tokens=8)
    wrong = "99" if greedy_answer != "99" else "88"
    requests = [
        # a task's loglikelihood request: the continuation from its doc_to_target
        lmms_instance("loglikelihood", (doc["question"], doc_to_target, to_visual, 0, "synthdoc", "test"), 0),
        # multiple choice: each choice as the continuation, after lmms-eval's target delimiter " "
        lmms_instance(
            "loglikelihood", (doc["question"], f" {greedy_answer}", to_visual, 0, "synthdoc", "test"), 0
        ),
        lmms_instance("loglikelihood", (doc["question"], f" {wrong}", to_visual, 0, "synthdoc", "test"), 0),
    ]
    scores = lmms_model.loglikelihood(requests)
    for (score, greedy), continuation in zip(scores, [doc["answer"], greedy_answer, wrong], strict=True):
        expected, expected_greedy = _answer_log_prob(
            model, processor, [doc["image"]], doc["question"], continuation
        )
        assert score == pytest.approx(expected, abs=1e-3)
        assert greedy is expected_greedy
    # what greedy decoding produced is greedy, followed by the end of turn; a wrong number is not
    assert scores[1][1] is True and scores[2][1] is False and scores[2][0] < scores[1][0] < 0


def test_lmms_unconditional_loglikelihood_needs_no_document(lmms_model, reference):
    from lmms_eval.api.instance import Instance

    model, processor = reference
    request = Instance(
        "loglikelihood", ("", " 42"), idx=0, metadata={"task": "synthdoc", "doc_id": 0, "repeats": 1}
    )
    ((score, greedy),) = lmms_model.loglikelihood([request])
    expected, expected_greedy = _answer_log_prob(model, processor, [], "", "42")
    assert score == pytest.approx(expected, abs=1e-3) and greedy is expected_greedy
    assert math.isfinite(score) and score < 0


def test_lmms_model_args_are_checked(lmms_eval_models):
    from llava_uhd.bundled import bundled_model_dir

    cls = lmms_eval_models.get_model("llava_uhd")
    with pytest.raises(EvalInputError, match="batch_size must be a positive integer, got 'auto'"):
        cls.create_from_arg_string(
            f"pretrained={bundled_model_dir()}", {"batch_size": "auto", "device": "cpu"}
        )


def test_lmms_openai_compatible_model_talks_to_our_server(
    lmms_eval_models, documents, reference, monkeypatch
):
    """The documented API-model set-up: lmms-eval's ``openai_compatible`` (its chat backend) against the
    server on loopback answers one request as the model itself does."""
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    pytest.importorskip("uvicorn", reason="the server needs the serve extra")
    from llava_uhd.inference.generate import answer
    from llava_uhd.serve.app import create_app
    from llava_uhd.serve.build import build_server
    from serve_helpers import running

    doc = documents["synthdoc"]["test"][0]

    def doc_to_messages(doc):
        content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]
        return [{"role": "user", "content": content}]

    engine, batcher = build_server(None, max_new_tokens=8, batch_window_s=0.01, device="cpu")
    try:
        with running(create_app(engine, batcher)) as url:
            # the documented environment: the API base and a key the server does not check
            monkeypatch.setenv("OPENAI_API_BASE", f"{url}/v1")
            monkeypatch.setenv("OPENAI_API_KEY", "none")
            cls = lmms_eval_models.get_model("openai_compatible")
            lm = cls.create_from_arg_string("model_version=llava-uhd,max_retries=1,timeout=60")
            lm.task_dict = documents
            gen_kwargs = {"max_new_tokens": 8, "temperature": 0}
            request = lmms_instance(
                "generate_until", ("", doc_to_messages, gen_kwargs, 0, "synthdoc", "test"), 0
            )
            (result,) = lm.generate_until([request])
    finally:
        batcher.close()
    model, processor = reference
    assert result.text == answer(model, processor, doc["image"], doc["question"], max_new_tokens=8)
