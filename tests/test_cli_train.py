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


def _train(data: Path, images: Path, out: Path, policy: str, *extra: str) -> int:
    return main([
        "train", "--config", str(CONFIG), "--on-bad-sample", policy,
        "--set", f"data.train={data}", "--set", f"data.image_folder={images}",
        "--set", "data.synthetic_samples=0", "--set", "data.synthetic_eval_samples=0",
        "--set", f"output_dir={out}", "--set", "global_batch_size=2", "--set", "micro_batch_size=2", *extra,
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


@pytest.fixture(scope="module")
def many_bad_in_a_row(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """A JSONL of 8 good records around 12 bad ones in a row (missing images, malformed turns, a line
    that is not JSON); returns (data, image folder, indices of the good records)."""
    folder = tmp_path_factory.mktemp("many-bad")
    dataset = make_dataset(folder, n=8, seed=0, kinds=("caption",))
    good = json.loads(dataset.json_path.read_text())
    turns = good[0]["conversations"]
    bad = [{"id": f"ghost{k}", "image": f"missing{k}.png", "conversations": turns} for k in range(6)]
    bad += [{"id": f"mute{k}", "conversations": turns[:1]} for k in range(5)]
    lines = [json.dumps(r) for r in good[:4] + bad] + ["{not json"] + [json.dumps(r) for r in good[4:]]
    data = folder / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, dataset.image_folder, [0, 1, 2, 3, 16, 17, 18, 19]


def test_skip_reports_each_bad_record_once_and_draws_each_good_one_once_per_epoch(
    many_bad_in_a_row, tmp_path, monkeypatch
):
    from llava_uhd.data import LlavaDataset

    data, images, good = many_bad_in_a_row
    drawn: list[int] = []
    build = LlavaDataset.build

    def counting_build(self, index):
        if len(self) == 20:  # the training set
            drawn.append(index)
        return build(self, index)

    monkeypatch.setattr(LlavaDataset, "build", counting_build)
    out = tmp_path / "run"
    assert _train(data, images, out, "skip", "--set", "global_batch_size=4", "--set", "epochs=2") == 0
    assert sorted(drawn) == sorted(good * 2)  # every good record once per epoch, never a bad one
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [entry["index"] for entry in skipped] == list(range(4, 16))
    assert [entry["id"] for entry in skipped[:11]] == [f"ghost{k}" for k in range(6)] + [
        f"mute{k}" for k in range(5)
    ]
    assert skipped[11]["id"] == "#15" and skipped[11]["reason"].startswith(f"{data}:16: not valid JSON")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {record["skipped"] for record in metrics if "skipped" in record} == {12}


@pytest.mark.parametrize("grouped", [False, True])
def test_two_ranks_share_out_the_good_records_of_an_epoch(many_bad_in_a_row, grouped):
    """What each of 2 ranks reads: together every good record once per epoch, no bad one, no repeat."""
    from llava_uhd.data import LlavaDataset
    from llava_uhd.train.batches import BatchGeometry, epoch_order, rank_steps
    from llava_uhd.train.config import TrainConfig
    from llava_uhd.train.setup import build_processor

    data, images, good = many_bad_in_a_row
    processor = build_processor(TrainConfig.load(CONFIG).resolved())
    dataset = LlavaDataset(data, images, processor, on_bad_sample="skip", max_length=512)
    usable = dataset.usable_indices(report=False)
    assert usable == good and dataset.skipped == 0
    lengths = dataset.lengths() if grouped else None
    geometry = BatchGeometry(global_batch_size=4, micro_batch_size=1, world_size=2)
    for epoch in range(2):
        order = epoch_order(len(dataset), 0, epoch, lengths, 4, usable)
        read = [
            index
            for rank in (0, 1)
            for step in rank_steps(order, geometry, rank)
            for micro in step
            for index in micro
        ]
        assert sorted(read) == good
