"""`llava-uhd eval` on tiny generated benchmarks with the bundled model: each input format round trip,
sharded equals unsharded, resume after a kill equals an uninterrupted run."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from llava_uhd.cli import main
from llava_uhd.eval.benchmarks import MULTIPLE_CHOICE, SHORT_ANSWER


def image_bytes(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def run_eval(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_question_jsonl_with_answers_file(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    questions, truth = [], []
    for i, (colour, label) in enumerate([("red", "yes"), ("blue", "no"), ("green", "yes")]):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(colour))
        questions.append({"question_id": i, "image": f"{i}.png", "text": f"Is there a {colour} box?"})
        truth.append({"question_id": i, "answers": [label], "category": "random"})
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "gt.jsonl"
    answers.write_text("".join(json.dumps(t) + "\n" for t in truth))
    out = tmp_path / "out"
    code, scores, _ = run_eval(
        capsys,
        *(
            "--benchmark",
            "pope",
            "--data",
            str(data),
            "--answers",
            str(answers),
            "--images",
            str(tmp_path / "imgs"),
        ),
        *("--output", str(out), "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2"),
    )
    assert code == 0
    predictions = lines(out / "predictions.jsonl")
    assert [p["question_id"] for p in predictions] == [0, 1]  # --limit 2, in data order
    assert predictions[0]["prompt"] == f"Is there a red box?\n{SHORT_ANSWER}"
    assert all(isinstance(p["answer"], str) for p in predictions)
    saved = json.loads((out / "scores.json").read_text())
    assert saved["scores"] == scores and scores["count"] == 2 and "random" in scores["splits"]
    assert saved["counts"] == {"questions": 2, "answered": 2, "errors": 0}
    assert saved["prompt"]["convention"] == "short-answer" and saved["decoding"]["max_new_tokens"] == 2
    assert saved["preset"] == "synthdoc" and saved["slicing"]["max_slices"] == 6


def test_vlmevalkit_tsv(tmp_path, capsys):
    header = "index\timage\tquestion\tA\tB\tanswer\tcategory\n"
    rows = [
        f"10\t{base64.b64encode(image_bytes('red')).decode()}\tWhich colour?\tred\tblue\tA\tcolour\n",
        "11\t10\tWhich colour is it not?\tred\tblue\tB\tcolour\n",  # image shared with row 10 by index
    ]
    data = tmp_path / "bench.tsv"
    data.write_text(header + "".join(rows))
    out = tmp_path / "out"
    code, scores, _ = run_eval(
        capsys, "--benchmark", "mmbench", "--data", str(data), "--output", str(out), "--max-new-tokens", "2"
    )
    assert code == 0
    predictions = lines(out / "predictions.jsonl")
    assert [p["question_id"] for p in predictions] == ["10", "11"]
    assert predictions[0]["prompt"] == f"Which colour?\nA. red\nB. blue\n{MULTIPLE_CHOICE}"
    assert scores["metric"] == "mc" and scores["count"] == 2 and scores["missing"] == 0


SYNTHDOC = ("--benchmark", "synthdoc", "--documents", "1", "--batch-size", "2", "--max-new-tokens", "3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(["eval", *SYNTHDOC, "--output", str(out)]) == 0
    return out


def test_synthdoc_is_a_benchmark(uninterrupted):
    saved = json.loads((uninterrupted / "scores.json").read_text())
    assert saved["data"] == {"split": "test", "documents": 1, "seed": 0}
    assert saved["counts"]["questions"] == saved["scores"]["count"] >= 3  # codes, colours and the count
    assert saved["scores"]["metric"] == "exact"


def test_sharded_equals_unsharded(uninterrupted, tmp_path, capsys):
    out = tmp_path / "sharded"
    for shard in ("1", "0"):
        code, _, err = run_eval(
            capsys, *SYNTHDOC, "--output", str(out), "--num-shards", "2", "--shard", shard
        )
        assert code == 0 and "merge with --merge" in err
    assert not (out / "predictions.jsonl").exists()
    code, scores, _ = run_eval(capsys, *SYNTHDOC, "--output", str(out), "--num-shards", "2", "--merge")
    assert code == 0
    assert (out / "predictions.jsonl").read_text() == (uninterrupted / "predictions.jsonl").read_text()
    assert scores == json.loads((uninterrupted / "scores.json").read_text())["scores"]


def test_merge_refuses_a_missing_shard(tmp_path, capsys):
    out = tmp_path / "half"
    assert main(["eval", *SYNTHDOC, "--output", str(out), "--num-shards", "3", "--shard", "0"]) == 0
    code, _, err = run_eval(capsys, *SYNTHDOC, "--output", str(out), "--num-shards", "3", "--merge")
    assert code == 2 and "shard 1 of 3 has not run" in err


def test_resume_after_a_kill_equals_an_uninterrupted_run(uninterrupted, tmp_path, capsys):
    out = tmp_path / "killed"
    out.mkdir()
    whole = (uninterrupted / "predictions.jsonl").read_text().splitlines(keepends=True)
    # what a kill during the second batch leaves: the first batch, one line of the second, a cut-off line
    (out / "predictions.jsonl").write_text("".join(whole[:3]) + whole[3][:20])
    (out / "run.json").write_text((uninterrupted / "run.json").read_text())
    code, _, _ = run_eval(capsys, *SYNTHDOC, "--output", str(out), "--resume")
    assert code == 0
    assert (out / "predictions.jsonl").read_text() == "".join(whole)


def test_resume_refuses_other_settings(uninterrupted, tmp_path, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "run.json").write_text((uninterrupted / "run.json").read_text())
    argv = [a if a != "2" else "3" for a in SYNTHDOC]  # another batch size (and token budget)
    code, _, err = run_eval(capsys, *argv, "--output", str(out), "--resume")
    assert code == 2 and "batch_size" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--benchmark", "gqa", "--output", "o"), "needs --data"),
        (("--benchmark", "gqa", "--data", "nope.jsonl", "--output", "o"), "no such file"),
        (("--benchmark", "gqa", "--data", "x.tsv", "--output", "o"), "no such file"),
        (("--benchmark", "gqa", "--data", "x.jsonl", "--ocr", "--output", "o"), "textvqa only"),
    ],
)
def test_bad_arguments(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_eval(capsys, *argv)
    assert code == 2 and message in err
