"""`llava-uhd score`: predictions from any system rescored against ground truth, no model loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_uhd.cli import main


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_score(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["score", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_vqa_ids_as_strings_missing_and_per_item(tmp_path, capsys):
    gt = write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": 1, "answers": ["two"] * 10},
            {"question_id": "2", "answers": ["dog"] * 3 + ["cat"] * 7},
            {"question_id": 3, "answers": ["yes"] * 10},
        ],
    )
    pred = write_jsonl(
        tmp_path / "pred.jsonl",
        [
            {"question_id": "1", "answer": "2"},
            {"question_id": 2, "answer": "A dog."},
            {"question_id": 99, "answer": "extra"},
        ],
    )
    per_item = tmp_path / "items" / "per_item.jsonl"
    code, aggregate, _ = run_score(capsys, "--metric", "vqa", str(pred), str(gt), "--per-item", str(per_item))
    assert code == 0
    assert aggregate["score"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert (aggregate["count"], aggregate["missing"], aggregate["extra"]) == (3, 1, 1)
    lines = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [1, "2", 3]  # GT order, ids as written there
    assert [line["score"] for line in lines] == pytest.approx([1.0, 0.9, 0.0])


def test_pope_and_mme_breakdowns(tmp_path, capsys):
    gt = write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": "a", "answers": ["yes"], "category": "random", "image": "1.jpg"},
            {"question_id": "b", "answers": ["no"], "category": "random", "image": "1.jpg"},
            {"question_id": "c", "answers": ["yes"], "category": "popular", "image": "2.jpg"},
            {"question_id": "d", "answers": ["no"], "category": "popular", "image": "2.jpg"},
        ],
    )
    pred = write_jsonl(
        tmp_path / "pred.jsonl",
        [
            {"question_id": "a", "answer": "Yes, there is."},
            {"question_id": "b", "answer": "No."},
            {"question_id": "c", "answer": "There is no such thing."},
        ],
    )
    code, pope, _ = run_score(capsys, "--metric", "pope", str(pred), str(gt))
    assert code == 0
    assert pope["splits"]["random"]["accuracy"] == 1.0 and pope["splits"]["popular"]["accuracy"] == 0.0
    assert pope["score"] == pope["accuracy"] == 0.5 and pope["missing"] == 1
    code, mme, _ = run_score(capsys, "--metric", "mme", str(pred), str(gt))
    assert code == 0
    assert mme["subtasks"]["random"]["score"] == 200.0 and mme["subtasks"]["popular"]["score"] == 0.0
    assert mme["perception"] == 0.0  # neither split is an MME perception subtask


def test_mc(tmp_path, capsys):
    gt = write_jsonl(
        tmp_path / "gt.jsonl",
        [
            {"question_id": 1, "answers": ["B"], "choices": ["cat", "dog"]},
            {"question_id": 2, "answers": [0], "choices": ["cat", "dog"]},
        ],
    )
    pred = write_jsonl(
        tmp_path / "p.jsonl",
        [{"question_id": 1, "answer": "The answer is B."}, {"question_id": 2, "answer": "(B)"}],
    )
    code, aggregate, _ = run_score(capsys, "--metric", "mc", str(pred), str(gt))
    assert code == 0 and aggregate["score"] == 0.5


@pytest.mark.parametrize(
    ("pred_rows", "gt_rows", "message"),
    [
        (
            [{"question_id": 1, "answer": "a"}, {"question_id": "1", "answer": "b"}],
            [{"question_id": 1, "answers": ["a"] * 10}],
            "question_id '1' repeats",
        ),
        (
            [{"question_id": 1, "answer": "a"}],
            [{"question_id": 1, "answers": ["a"] * 10}, {"question_id": 1, "answers": ["a"] * 10}],
            "question_id 1 repeats",
        ),
        ([{"question_id": 1, "answer": "a"}], [{"question_id": 1, "answers": ["a"] * 9}], "exactly 10"),
        ([{"question_id": 1}], [{"question_id": 1, "answers": ["a"] * 10}], "answer is missing"),
        ([{"answer": "a"}], [{"question_id": 1, "answers": ["a"] * 10}], "question_id is missing"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, capsys, pred_rows, gt_rows, message):
    pred = write_jsonl(tmp_path / "p.jsonl", pred_rows)
    gt = write_jsonl(tmp_path / "g.jsonl", gt_rows)
    code, _, err = run_score(capsys, "--metric", "vqa", str(pred), str(gt))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_not_json_and_missing_file(tmp_path, capsys):
    gt = tmp_path / "g.jsonl"
    gt.write_text('{"question_id": 1, "answers": ["a"]}\n{oops\n')
    pred = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "answer": "a"}])
    code, _, err = run_score(capsys, "--metric", "exact", str(pred), str(gt))
    assert code == 2 and "line 2: not JSON" in err
    good = write_jsonl(tmp_path / "good.jsonl", [{"question_id": 1, "answers": ["a"]}])
    code, _, err = run_score(capsys, "--metric", "exact", str(tmp_path / "none.jsonl"), str(good))
    assert code == 2 and "no such file" in err


def test_score_runs_without_torch(tmp_path):
    gt = write_jsonl(tmp_path / "g.jsonl", [{"question_id": 1, "answers": ["a"]}])
    pred = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "answer": "a"}])
    blocker = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
    code = f"{blocker}from llava_uhd.cli import main; sys.exit(main(['score', '--metric', 'exact', {str(pred)!r}, {str(gt)!r}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["score"] == 1.0
