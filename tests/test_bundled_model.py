"""The model that ships in the package: it loads by default, and answers a fixed set of generated test pages
(every size bucket, every question kind) at the accuracy recorded when it was exported, so a broken model,
processor or tokenizer cannot pass."""

from __future__ import annotations

import json

import pytest

from llava_uhd.auto import load_pretrained
from llava_uhd.bundled import bundled_model_dir, model_dir
from llava_uhd.eval.synthdoc import evaluate_synthdoc

SLACK = 0.03  # another thread count may flip a near-tie or two


@pytest.fixture(scope="module")
def shipped():
    folder = bundled_model_dir()
    record = json.loads((folder / "shipped_accuracy.json").read_text())
    model, processor = load_pretrained(folder)
    return model, processor, record


def test_the_bundled_model_is_the_default_and_small():
    folder = bundled_model_dir()
    assert model_dir(None) == folder
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 30 * 2**20


def test_it_answers_at_the_accuracy_it_shipped_with(shipped):
    model, processor, record = shipped
    report = evaluate_synthdoc(
        model, processor, record["documents"], seed=record["seed"], split=record["split"]
    )
    assert report["questions"] >= 300  # enough that chance (1 in 64 codes, 1 in 5 colours) cannot pass
    assert set(report["by_bucket"]["code"]) == {"448-699", "700-899", "900-1099", "1100-1344"}
    for kind, rate in record["by_kind"].items():
        assert report["by_kind"][kind]["accuracy"] >= rate["accuracy"] - SLACK, (
            kind,
            report["by_kind"][kind],
        )
    for name, rate in record["targets"].items():
        assert report["targets"][name]["accuracy"] >= rate["accuracy"] - SLACK, (
            name,
            report["targets"][name],
        )


def test_its_image_processor_loads_through_transformers(shipped):
    from PIL import Image
    from transformers import AutoImageProcessor

    _, processor, _ = shipped
    loaded = AutoImageProcessor.from_pretrained(bundled_model_dir())
    image = Image.new("RGB", (900, 500), (30, 120, 200))
    ours, theirs = processor.image_processor([image]), loaded([image])
    assert type(loaded) is type(processor.image_processor)
    assert (ours.piece_grids == theirs.piece_grids).all()
    assert (ours.pixel_values == theirs.pixel_values).all()
