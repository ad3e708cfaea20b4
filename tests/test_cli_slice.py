"""`llava-uhd slice` and `llava-uhd demo`: the picture, the printed plan, and every bad input."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_uhd.cli import main
from llava_uhd.config import PAPER
from llava_uhd.slicing import plan_slices


def _write(path: Path, image: Image.Image, fmt: str = "PNG") -> Path:
    image.save(path, fmt)
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    return _write(tmp_path / "photo.png", Image.fromarray(pixels).resize((1000, 750)))


def test_slice_writes_picture_and_prints_plan(photo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "seen.png"
    assert main(["slice", str(photo), "--out", str(out), "--max-slices", "4"]) == 0
    printed = capsys.readouterr().out
    assert "[s1] , [s2] \\n [s3] , [s4] \\n [overview]" in printed  # 1000x750 with 4 slices: 2x2
    assert f"wrote {out}" in printed
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.width == 1400 and picture.height > 600


def test_slice_unsliced_image(tmp_path: Path, capsys) -> None:
    small = _write(tmp_path / "small.png", Image.new("RGB", (120, 90), (10, 200, 30)))
    out = tmp_path / "small-seen.png"
    assert main(["slice", str(small), "--out", str(out)]) == 0
    plan = plan_slices(120, 90, PAPER.slicing)
    assert plan.grid is None
    assert f"no slices, overview {plan.overview.width}x{plan.overview.height}" in capsys.readouterr().out
    assert Image.open(out).size[0] == 1400


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    big = _write(tmp_path / "big.png", Image.new("RGB", (400, 300)))
    strip = _write(tmp_path / "strip.png", Image.new("RGB", (2000, 1)))
    return [
        ([str(tmp_path / "missing.png")], "missing.png: no such file"),
        ([str(tmp_path)], "is a directory"),
        ([str(empty)], "empty file (0 bytes)"),
        ([str(text)], "not an image"),
        ([str(truncated)], "truncated"),
        ([str(big), "--max-image-pixels", "1000"], "over the limit max_pixels=1000"),
        ([str(strip), "--pre-resize-long-side", "1000"], "a side of 0 pixels"),
        ([str(big), "--max-vit-patches", "100"], "over the limit max_vit_patches=100"),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.png"
    for argv, reason in _bad_inputs(tmp_path):
        assert main(["slice", *argv, "--out", str(out)]) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llava-uhd slice: error: "), captured.err
        assert reason in lines[0] and argv[0] in lines[0], (reason, lines[0])
        assert not out.exists()


def test_bad_out_path(photo: Path, tmp_path: Path, capsys) -> None:
    assert main(["slice", str(photo), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "give a path ending in .png" in capsys.readouterr().err
    assert main(["slice", str(photo), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_uhd.cli",
            "slice",
            str(tmp_path / "nope.jpg"),
            "--out",
            str(tmp_path / "o.png"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"llava-uhd slice: error: {tmp_path / 'nope.jpg'}: no such file\n"


def test_demo_uses_the_bundled_model_and_says_where(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--seed", "11"]) == 0
    printed = capsys.readouterr().out
    target = tmp_path / "demo-output" / "slices.png"
    assert f"what the model sees: {target}" in printed
    assert "model: bundled synthdoc model" in printed
    assert "synthdoc test page 11 (seed 7)" in printed
    assert Image.open(target).format == "PNG"
