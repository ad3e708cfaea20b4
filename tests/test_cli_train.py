"""`llava-uhd train` from the outside: the --on-bad-sample contract on a real LLaVA JSON with a bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_uhd.cli import main
from llava_uhd.synth import make_dataset

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "debug-cpu.yaml"


@pytest.fixture(scope="module")
def data_with_a_bad_record(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("synth")
    dataset = make_dataset(folder, n=4, seed=0, kinds=("caption",))
    records = json.loads(dataset.json_path.read_text())
    records.insert(1, {"id": "ghost", "image": "missing.png", "conversations": records[0]["conversations"]})
    data = folder / "with_bad.json"
    data.write_text(json.dumps(records))
    return data, dataset.image_folder


def _train(data: Path, images: Path, out: Path, policy: str) -> int:
    return main([
        "train", "--config", str(CONFIG), "--on-bad-sample", policy,
        "--set", f"data.train={data}", "--set", f"data.image_folder={images}",
        "--set", "data.synthetic_samples=0", "--set", "data.synthetic_eval_samples=0",
        "--set", f"output_dir={out}", "--set", "global_batch_size=2", "--set", "micro_batch_size=2",
    ])  # fmt: skip


def test_skip_writes_the_bad_id_and_reason(data_with_a_bad_record, tmp_path):
    data, images = data_with_a_bad_record
    assert _train(data, images, tmp_path / "run", "skip") == 0
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {entry["id"] for entry in skipped} == {"ghost"}
    assert "missing.png" in skipped[0]["reason"]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_error_stops_with_the_id_named(data_with_a_bad_record, tmp_path, capsys):
    data, images = data_with_a_bad_record
    assert _train(data, images, tmp_path / "run", "error") == 2
    err = capsys.readouterr().err
    assert "ghost" in err and "missing.png" in err and "Traceback" not in err
