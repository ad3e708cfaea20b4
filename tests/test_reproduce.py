"""benchmarks/reproduce.py end to end at a tiny scale: every encoding trained, evaluated, probed and
reported through the script itself, then a rerun that skips every finished step."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace
from pathlib import Path

import matplotlib  # noqa: F401  (the [dev] extra: the report's plot)

from llava_uhd.cli import main as llava_uhd
from llava_uhd.config import SYNTHDOC, ResamplerConfig, SlicingConfig, VisionConfig

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_synthdoc(path: Path) -> None:
    """synthdoc's layout (conv stem, centred pieces, its tokenizer's vocabulary) at test size: 112-px pieces."""
    text = {**SYNTHDOC.text.config, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    preset = replace(
        SYNTHDOC,
        name="synthdoc-test",
        slicing=SlicingConfig(scale_resolution=112, max_slices=4),
        vision=replace(
            SYNTHDOC.vision,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            image_size=112,
            stem_channels=(8, 16),
        ),
        resampler=ResamplerConfig(num_queries=4, num_heads=2),
        text=replace(SYNTHDOC.text, config={**text, "num_attention_heads": 2, "num_key_value_heads": 2}),
    )
    assert isinstance(preset.vision, VisionConfig)
    preset.save(path)


def test_reproduce_writes_the_table_and_resumes(tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    _tiny_synthdoc(preset)
    stage0 = tmp_path / "stage0"
    assert (
        llava_uhd(
            ["train", "--config", str(REPO / "configs/synthdoc/stage0-debug.yaml")]
            + ["--set", f"output_dir={stage0}", "--set", f"model.preset={preset}", "--set", "max_steps=1"]
        )
        == 0
    )
    out = tmp_path / "REPRODUCTION.md"
    argv = ["--stage0", str(stage0 / "final"), "--runs", str(tmp_path / "runs"), "--seeds", "0"]
    argv += ["--scale", "0.002", "--eval-pages", "1", "--probe-pages", "1", "--out", str(out)]
    script = _script()
    assert script.main(argv) == 0
    text = out.read_text()
    assert (tmp_path / "REPRODUCTION.png").stat().st_size > 1000
    rows = {m: next(line for line in text.splitlines() if f"(`{m}`)" in line) for m in script.ENCODINGS}
    # tokens per image follow the mode: resize is one piece of 4 queries; anyres is 3-5 pieces
    cells = {m: row.split("|") for m, row in rows.items()}
    assert float(cells["resize"][-4]) == 4 and float(cells["resize"][-3]) == 64
    assert 3 * 4 + 2 <= float(cells["anyres"][-4]) <= 5 * 4 + 4
    assert all(re.search(r"n=\d+", row) for row in rows.values())
    buckets = [line for line in text.splitlines() if re.match(r"\| LLaVA-\S+ \S+ \| \d+-\d+ \|", line)]
    assert buckets and all(len(line.split("|")) == 10 for line in buckets)  # 3 kinds and 3 costs a bucket
    assert "Stage-0 glyph probe" in text and "One seed per encoding" in text
    for mode in script.ENCODINGS:
        assert (tmp_path / "runs" / mode / "seed0" / "stage2" / "final" / "config.json").is_file()

    finals = sorted(p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("final/*"))
    evals = sorted(p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("eval-*.json"))
    assert script.main(argv) == 0  # a rerun: every step skipped, the report rewritten
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("final/*")) == finals
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("eval-*.json")) == evals
    assert out.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]  # the same table
