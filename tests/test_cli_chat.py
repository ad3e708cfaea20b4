"""`llava-uhd chat` on the bundled model with piped stdin, `ask --show-plan`, and the decoding options of
`ask`, `batch` and `chat`: the image is encoded once per conversation, each turn's prompt is the training
render of the conversation, streamed text equals non-streamed text, and seeds and beams reach generate."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from llava_uhd import auto
from llava_uhd.bundled import bundled_model_dir
from llava_uhd.cli import main
from llava_uhd.errors import LlavaUHDError
from llava_uhd.inference.chat import ChatSession
from llava_uhd.inference.generate import GenerationOptions, answer, answer_prepared, seeded
from llava_uhd.inference.streaming import TextStream
from llava_uhd.synth.synthdoc import document_seed, make_document, render_document
from llava_uhd.templates import IGNORE_INDEX, IMAGE_TOKEN, Turn

COUNT = "How many boxes are there?"


@pytest.fixture(scope="module")
def bundled():
    """The bundled model and processor, loaded once for the module."""
    return auto.load_pretrained(bundled_model_dir())


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Two synthdoc pages of different slice counts, as PNG files, with their documents."""
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for name, index, size in (("page", 0, (560, 448)), ("other", 1, (448, 896))):
        doc = make_document(document_seed("test", index), size=size)
        path = folder / f"{name}.png"
        render_document(doc).save(path)
        out[name] = (path, doc)
    return out


@pytest.fixture
def cli(bundled, monkeypatch, capsys):
    """Run ``llava-uhd ARGV`` with STDIN piped in; returns (exit code, stdout, stderr). The commands get the
    module's model (no reload per run); ``vision`` records the pieces of every vision-tower call."""
    model, processor = bundled
    vision: list[int] = []
    hook = model.vision_tower.register_forward_hook(lambda _m, args, _o: vision.append(args[1].shape[0]))
    monkeypatch.setattr(auto, "load_pretrained", lambda folder, **_: (model, processor))

    def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    run.vision = vision
    yield run
    hook.remove()
    model.vision_tower.__dict__.pop("forward", None)  # `batch` routes the tower through a feature cache


def reference_answers(model, processor, image: Path, questions: list[str], **options) -> list[str]:
    """Each turn answered the `ask` way: the whole conversation prepared from the image file by the
    processor (read, sliced and encoded again every turn), ids and pixels to generate, no streaming."""
    turns: list[Turn] = []
    answers = []
    for question in questions:
        turns.append(Turn("user", f"{IMAGE_TOKEN}\n{question}" if not turns else question))
        prepared = processor.prepare(turns, [str(image)], model.config.template, generation_prompt=True)
        answers.append(answer_prepared(model, processor, prepared, GenerationOptions(**options)))
        turns.append(Turn("assistant", answers[-1]))
    return answers


def test_chat_encodes_the_image_once_and_answers_every_turn_like_ask(cli, bundled, pages):
    model, processor = bundled
    path, doc = pages["page"]
    questions = [COUNT, f"What is the code in the {doc.boxes[0].colour} box?", COUNT]
    stdin = f"{questions[0]}\n{questions[1]}\n/plan\n\n{questions[2]}\n"  # ends at EOF, no /exit
    code, out, err = cli(["chat", "--image", str(path), "--max-new-tokens", "8"], stdin)
    assert code == 0 and err == ""
    plan = processor.process_images([str(path)]).plans[0]
    assert cli.vision == [plan.num_slices + 1]  # one call, every piece of the image, for three turns
    lines = out.splitlines()
    expected = reference_answers(model, processor, path, questions, max_new_tokens=8)
    assert [lines[0], lines[1], lines[-1]] == expected
    assert expected[0] == answer(model, processor, str(path), questions[0], max_new_tokens=8)
    assert lines[2].startswith(f"{path}: 560x448: 2x2 grid (cols x rows)") and "LLM tokens" in lines[2]
    assert lines[3].startswith("  layout: [s1] , [s2] \\n [s3] , [s4] \\n [overview]")
    assert (
        lines[4].startswith("prompt: ")
        and lines[5] == "conversation: 2 question(s) answered (prompt: the last one's)"
    )


def test_each_turn_prompt_is_the_training_render_of_the_conversation(bundled, pages):
    model, processor = bundled
    path, doc = pages["page"]
    session = ChatSession(model, processor, GenerationOptions(max_new_tokens=6))
    session.set_image(str(path))
    session.ask(COUNT)
    session.ask(f"What color is the box with the code {doc.boxes[0].code}?")
    question = f"What is the code in the {doc.boxes[-1].colour} box?"
    prompt = session.prompt(question)
    turns = [*session.turns, Turn("user", question)]
    assert session.turns[0].text == f"{IMAGE_TOKEN}\n{COUNT}" and len(turns) == 5
    template = model.config.template
    inference = processor.prepare(turns, [str(path)], template, generation_prompt=True).text
    training = processor.prepare([*turns, Turn("assistant", "42")], [str(path)], template).text
    assert prompt.input_ids == inference.input_ids and prompt.visual_spans == inference.visual_spans
    assert training.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    # the earlier answers are training targets, the open one's tokens follow the prompt
    assert training.labels[len(prompt.input_ids)] != IGNORE_INDEX
    with pytest.raises(LlavaUHDError, match="only the first question of a conversation may hold <image>"):
        session.ask(f"{IMAGE_TOKEN} again?")
    assert len(session.turns) == 4  # a refused question leaves the conversation as it was


def test_streamed_text_equals_the_non_streamed_text(bundled, pages):
    model, processor = bundled
    path, _ = pages["other"]
    for options in (
        GenerationOptions(max_new_tokens=8),  # greedy
        GenerationOptions(max_new_tokens=24, temperature=5.0, seed=11),  # long and messy text
    ):
        session = ChatSession(model, processor, options)
        session.set_image(str(path))
        pieces: list[str] = []
        streamed = session.ask(COUNT, on_text=pieces.append)
        assert "".join(pieces) == streamed == answer(model, processor, str(path), COUNT, **vars(options))
        assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) >= 3  # the sampled answer came in pieces, as it was generated


def test_text_stream_holds_back_partial_characters_and_trailing_spaces(bundled):
    _, processor = bundled
    tokenizer = processor.tokenizer
    ids = tokenizer.encode(" café  ok \n", add_special_tokens=False)
    pieces: list[str] = []
    stream = TextStream(tokenizer, pieces.append)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt: not part of the answer
    seen_before_end = []
    for token in ids:
        stream.put(torch.tensor([token]))
        seen_before_end.append("".join(pieces))
    stream.end()
    assert "".join(pieces) == stream.text == "café  ok"
    assert "caf" in seen_before_end and "café" in seen_before_end  # streamed, é whole once complete
    assert all("\ufffd" not in piece and not piece.endswith(" ") for piece in pieces)


def test_image_command_starts_a_new_conversation_and_reset_forgets(cli, bundled, pages):
    model, processor = bundled
    page, _ = pages["page"]
    other, _ = pages["other"]
    stdin = (
        f"{COUNT}\n/image {other}\n/plan\n{COUNT}\nWhat is the code in the red box?\n/reset\n{COUNT}\n/exit\n"
    )
    code, out, err = cli(["chat", "--image", str(page), "--max-new-tokens", "6"], stdin)
    assert code == 0 and len(cli.vision) == 2  # one encoding per image
    assert err.splitlines() == [
        f"llava-uhd chat: new conversation about {other}",
        "llava-uhd chat: conversation reset",
    ]
    lines = out.splitlines()
    assert (
        lines[1].startswith(f"{other}: 448x896: 1x3 grid")
        and lines[3] == "conversation: 0 question(s) answered"
    )
    fresh = answer(model, processor, str(other), COUNT, max_new_tokens=6)
    assert lines[0] == answer(model, processor, str(page), COUNT, max_new_tokens=6)
    assert lines[4] == fresh and lines[6] == fresh  # after /reset, as in a new conversation


def test_bad_commands_images_and_questions_are_one_line_each_and_the_chat_goes_on(cli, pages, tmp_path):
    page, _ = pages["page"]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(page.read_bytes()[:600])
    stdin = "\n".join(
        [
            "/bogus",
            "/image",
            f"/image {tmp_path / 'missing.png'}",
            f"/image {text}",
            f"/image '{truncated}'",
            COUNT,
            f"{IMAGE_TOKEN} and again?",
            COUNT,
            "/exit",
            "never read",
        ]
    )
    code, out, err = cli(["chat", "--image", str(page), "--max-new-tokens", "4"], stdin)
    assert code == 0
    errors = err.splitlines()
    assert len(errors) == 6 and all(line.startswith("llava-uhd chat: error: ") for line in errors)
    assert "unknown command '/bogus'" in errors[0] and "/image needs a path" in errors[1]
    assert "missing.png" in errors[2] and "notes.txt" in errors[3] and "cut.png" in errors[4]
    assert "only the first question" in errors[5]
    assert len(out.splitlines()) == 2  # two answers; "never read" after /exit is not
    assert len(cli.vision) == 1  # the failed images replaced nothing


def test_chat_start_errors_exit_2(cli, tmp_path):
    code, _, err = cli(["chat", "--image", str(tmp_path / "nope.png")])
    assert code == 2 and err.count("\n") == 1 and "nope.png" in err
    code, _, err = cli(["chat", "--seed", "-1"])
    assert code == 2 and "seed must be in [0, " in err


def test_text_only_chat_and_a_conversation_too_long_for_the_model(bundled):
    model, processor = bundled
    session = ChatSession(model, processor, GenerationOptions(max_new_tokens=2))
    assert isinstance(session.ask("Hello?"), str) and session.last_prompt.num_visual_tokens == 0
    with pytest.raises(LlavaUHDError, match=r"the conversation is \d+ tokens and the model's limit is 1024"):
        session.ask("word " * 1100)


def test_ask_show_plan_goes_to_stderr_and_leaves_stdout_the_answer(cli, bundled, pages):
    model, processor = bundled
    page, _ = pages["page"]
    code, plain, _ = cli(["ask", "--image", str(page), COUNT, "--max-new-tokens", "4"])
    assert code == 0
    code, out, err = cli(["ask", "--image", str(page), COUNT, "--max-new-tokens", "4", "--show-plan"])
    assert code == 0 and out == plain
    from llava_uhd.inference.generate import prompt_inputs

    prompt = prompt_inputs(processor, [str(page)], COUNT, model.config.template).text
    lines = err.splitlines()
    assert lines[0].startswith(f"{page}: 560x448: 2x2 grid") and lines[1].startswith("  layout: ")
    assert lines[2] == (
        f"prompt: {len(prompt.input_ids)} tokens ({prompt.num_visual_tokens} visual, {prompt.num_text_tokens} text)"
    )


def test_decoding_options_reach_generate_in_ask_batch_and_chat(cli, bundled, pages, tmp_path, monkeypatch):
    model, _ = bundled
    page, _ = pages["page"]
    seen: list[dict] = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append(
            {k: kwargs.get(k) for k in ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p")}
        )
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    flags = ["--max-new-tokens", "5", "--beams", "2", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"id": 1, "image": str(page), "question": COUNT}) + "\n")
    assert cli(["ask", "--image", str(page), COUNT, *flags])[0] == 0
    assert cli(["batch", str(requests), "--output", str(tmp_path / "out.jsonl"), *flags])[0] == 0
    assert cli(["chat", "--image", str(page), *flags], f"{COUNT}\n")[0] == 0
    wanted = {"max_new_tokens": 5, "num_beams": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert seen == [wanted] * 3


def test_a_seed_makes_sampling_reproducible_everywhere(cli, pages, tmp_path):
    page, _ = pages["page"]
    sample = ["--temperature", "2.0", "--max-new-tokens", "12"]

    def ask(seed: int) -> str:
        code, out, _ = cli(["ask", "--image", str(page), COUNT, *sample, "--seed", str(seed)])
        assert code == 0
        return out

    assert ask(5) == ask(5)
    assert len({ask(seed) for seed in range(4)}) > 1  # the seed is what changes the draws
    chat = cli(["chat", "--image", str(page), *sample, "--seed", "5"], f"{COUNT}\n{COUNT}\n")[1]
    assert chat.splitlines()[0] + "\n" == ask(5)  # every answer is seeded alike: the first one is ask's
    requests = tmp_path / "in.jsonl"
    requests.write_text(
        "".join(json.dumps({"id": i, "image": str(page), "question": COUNT}) + "\n" for i in range(2))
    )
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        assert cli(["batch", str(requests), "--output", str(out), *sample, "--seed", "9"])[0] == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]


def test_seeded_puts_the_callers_random_state_back():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with seeded(5, torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected) and not torch.equal(inside, expected)


def test_beam_search_answers_in_ask_and_chat(cli, bundled, pages):
    model, processor = bundled
    page, doc = pages["page"]
    question = f"What is the code in the {doc.boxes[0].colour} box?"
    beams = answer(model, processor, str(page), question, max_new_tokens=6, num_beams=3)
    code, out, _ = cli(["ask", "--image", str(page), question, "--max-new-tokens", "6", "--num-beams", "3"])
    assert code == 0 and out == beams + "\n"
    code, out, _ = cli(
        ["chat", "--image", str(page), "--max-new-tokens", "6", "--beams", "3"], f"{question}\n"
    )
    assert code == 0 and out == beams + "\n"
