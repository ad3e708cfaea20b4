"""`llava-uhd batch` and `llava-uhd demo` on a tiny random model in the synthdoc layout: input order, errors
in place, exit codes, --resume after a kill, batched answers equal to one-at-a-time answers across images of
different slice counts, and the demo end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from llava_uhd.cli import main
from llava_uhd.config import get_preset
from llava_uhd.layout import visual_token_count
from llava_uhd.slicing import plan_slices
from llava_uhd.synth.synthdoc import all_questions, document_seed, make_document, render_document


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random synthdoc-shaped model (tiny widths) with the synthdoc tokenizer, saved with its processor."""
    from llava_uhd.model import LlavaUHDConfig, LlavaUHDForConditionalGeneration
    from llava_uhd.processing import LlavaUHDProcessor
    from llava_uhd.synth.tokenizer import build_tokenizer

    preset = get_preset("synthdoc").with_overrides(
        vision={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 1,
            "num_heads": 2,
            "stem_channels": (8, 8),
        },
        resampler={"num_queries": 4, "num_heads": 2},
        text={
            "config": {
                **get_preset("synthdoc").text.config,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            }
        },
    )
    processor = LlavaUHDProcessor(build_tokenizer(), preset)
    torch.manual_seed(0)
    model = LlavaUHDForConditionalGeneration(
        LlavaUHDConfig.from_preset(preset, image_token_id=processor.image_token_id)
    )
    folder = tmp_path_factory.mktemp("tiny-synthdoc") / "model"
    model.save_pretrained(str(folder))
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Three pages of 6, 2 and 3 slices and a JSONL of questions about them, with bad lines mixed in."""
    root = tmp_path_factory.mktemp("batch")
    rows = []
    for k, index in enumerate((0, 15, 59)):
        doc = make_document(document_seed("test", index))
        render_document(doc).save(root / f"page{k}.png")
        rows += [
            {"id": f"p{k}-{j}", "image": f"page{k}.png", "question": q.question}
            for j, q in enumerate(all_questions(doc)[:3])
        ]
    return root, rows


def _write(path: Path, rows: list, extra: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows]
    for position, line in enumerate(extra):
        lines.insert(2 + 3 * position, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_answers_in_input_order_with_errors_in_place(tiny_model, pages, tmp_path):
    root, rows = pages
    bad = (
        "not json",
        json.dumps({"id": "q", "image": "missing.png", "question": "What?"}),
        json.dumps({"id": "p0-0", "image": "page0.png", "question": "again"}),
        json.dumps({"image": "page0.png"}),
    )
    source = _write(root / "in.jsonl", rows, bad)
    out = tmp_path / "out.jsonl"
    code, _, err = _run(
        "batch",
        str(source),
        "--output",
        str(out),
        "--model",
        str(tiny_model),
        "--batch-size",
        "4",
        "--max-new-tokens",
        "3",
    )
    assert code == 1 and "failed" in err
    written = _read(out)
    assert len(written) == len(rows) + len(bad)
    answers = [r for r in written if "answer" in r]
    assert [r["id"] for r in answers] == [r["id"] for r in rows]  # input order
    errors = [r for r in written if "error" in r]
    assert [e["id"] for e in errors] == [None, "q", "p0-0", None]
    assert "not JSON" in errors[0]["error"] and "missing.png" in errors[1]["error"]
    assert "repeats" in errors[2]["error"] and "missing ['id', 'question']" in errors[3]["error"]
    preset = get_preset("synthdoc")
    for r in answers:
        k = int(r["id"][1])
        doc = make_document(document_seed("test", (0, 15, 59)[k]))
        plan = plan_slices(doc.width, doc.height, preset.slicing)
        assert (
            r["visual_tokens"] == visual_token_count(plan, 4) == (plan.num_slices + 1) * 4 + plan.num_slices
        )
    # a file without bad lines exits 0
    clean = _write(root / "clean.jsonl", rows[:2])
    assert (
        _run(
            "batch",
            str(clean),
            "--output",
            str(tmp_path / "c.jsonl"),
            "--model",
            str(tiny_model),
            "--max-new-tokens",
            "2",
        )[0]
        == 0
    )


def test_batched_answers_equal_one_at_a_time(tiny_model, pages, tmp_path):
    root, rows = pages
    docs = [make_document(document_seed("test", i)) for i in (0, 15, 59)]
    slices = {plan_slices(d.width, d.height, get_preset("synthdoc").slicing).num_slices for d in docs}
    assert len(slices) > 1  # the batch mixes slice counts
    source = _write(root / "mixed.jsonl", rows)
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    for out, size in ((one, "1"), (many, "9")):
        assert (
            _run(
                "batch",
                str(source),
                "--output",
                str(out),
                "--model",
                str(tiny_model),
                "--batch-size",
                size,
                "--max-new-tokens",
                "4",
            )[0]
            == 0
        )
    assert _read(one) == _read(many)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_model, pages, tmp_path):
    root, rows = pages
    source = _write(root / "resume.jsonl", rows, ("not json",))
    whole = tmp_path / "whole.jsonl"
    _run(
        "batch",
        str(source),
        "--output",
        str(whole),
        "--model",
        str(tiny_model),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
    )
    lines = whole.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:4]) + lines[4][:9])  # killed in the middle of writing line 5
    code, _, err = _run(
        "batch",
        str(source),
        "--output",
        str(part),
        "--model",
        str(tiny_model),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--resume",
    )
    assert code == 1 and "4 already in" in err
    assert part.read_text() == whole.read_text()


def test_bad_flags_and_inputs_are_one_line_errors(tmp_path, tiny_model):
    code, _, err = _run("batch", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "no such input file" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "in.jsonl").write_text("{}\n")
    code, _, err = _run(
        "batch", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--batch-size", "0"
    )
    assert code == 2 and "--batch-size" in err
    code, _, err = _run(
        "batch", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--num-beams", "0"
    )
    assert code == 2 and "num_beams" in err


def test_demo_runs_end_to_end(tiny_model, tmp_path):
    code, out, _ = _run("demo", "--model", str(tiny_model), "--seed", "4", "--out-dir", str(tmp_path))
    assert code == 0
    assert (tmp_path / "slices.png").is_file()
    doc_line = next(line for line in out.splitlines() if line.startswith("synthdoc test page 4"))
    assert "grid" in doc_line or "no slices" in doc_line
    table = out.split("\nquestion", 1)[1].splitlines()[1:4]
    starts = ("What is the code in the ", "How many boxes are there?", "What color is the box with the code ")
    assert all(
        row.startswith(start) and row.rstrip().endswith(("ok", "wrong"))
        for row, start in zip(table, starts, strict=True)
    )
    assert "slices withheld (overview alone" in out
