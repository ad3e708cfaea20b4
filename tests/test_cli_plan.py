"""`llava-uhd plan`: the JSON contract, error lines, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llava_uhd.cli import main

KEYS = {"width", "height", "grid", "overview", "slices", "separators", "vit_patches", "llm_tokens"}


def run_plan(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["plan", "--json", *argv])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_json_contract(capsys):
    code, records, _ = run_plan(capsys, "1024x768", "300x200")
    assert code == 0
    sliced, small = records
    assert set(sliced) == KEYS
    assert sliced["width"] == 1024 and sliced["height"] == 768
    assert sliced["grid"] == {"rows": 2, "cols": 3}
    assert sliced["overview"] == {"width": 378, "height": 280}
    assert sliced["slices"] == [{"width": 308, "height": 350}] * 6
    assert sliced["separators"] == [",", ",", "\n", ",", ",", "\n"]
    assert sliced["vit_patches"] == 6 * 22 * 25 + 27 * 20
    assert sliced["llm_tokens"] == 6 * 65 + 64
    assert small["grid"] is None and small["slices"] == [] and small["separators"] == []
    assert small["llm_tokens"] == 64


def test_preset_and_flags(capsys):
    _, (rec,), _ = run_plan(capsys, "--preset", "official-v1", "4000x3000")
    assert len(rec["slices"]) <= 7 and rec["llm_tokens"] == len(rec["slices"]) * 145 + 144
    _, (rec,), _ = run_plan(capsys, "--max-slices", "2", "4000x3000")
    assert len(rec["slices"]) == 2
    _, (rec,), _ = run_plan(capsys, "--pre-resize-long-side", "1024", "474x474")
    assert rec["pre_resized"] == {"width": 1023, "height": 1024}
    assert rec["width"] == 474


def test_bad_items_get_error_lines_and_exit_1(capsys):
    code, records, _ = run_plan(capsys, "640x480", "0x10", "1x100000", "/no/such/file.png")
    assert code == 1
    assert [("error" in r) for r in records] == [False, True, True, True]
    assert records[1]["width"] == 0 and records[1]["height"] == 10 and "0 pixels" in records[1]["error"]
    assert "max_vit_patches" in records[2]["error"] and records[2]["width"] == 1
    assert "/no/such/file.png" in records[3]["error"] and records[3]["width"] is None
    assert set(records[1]) == {"width", "height", "error"}


def test_pre_resize_to_zero_is_an_error_line(capsys):
    code, records, _ = run_plan(capsys, "--pre-resize-long-side", "1024", "1x5000", "640x480")
    assert code == 1
    assert "0x1024" in records[0]["error"] and "pre_resized" in records[1]


def test_human_output_and_usage_errors(capsys):
    assert main(["plan", "1920x1080"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1920x1080: 3x2 grid (cols x rows), slices 364x308")  # the size is not repeated
    assert "[s1] , [s2] , [s3] \\n" in out
    assert main(["plan", "--preset", "nope", "10x10"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_console_script_runs_without_a_traceback(tmp_path):
    exe = [sys.executable, "-m", "llava_uhd.cli"]
    done = subprocess.run([*exe, "plan", "--json", "10x300", "0x5"], capture_output=True, text=True)
    assert done.returncode == 1
    assert json.loads(done.stdout.splitlines()[0])["overview"] == {"width": 56, "height": 1834}
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("items", [[f"{w}x{h}" for w in range(1, 1001, 37) for h in (1, 500, 3001)]])
def test_many_items_one_line_each(capsys, items):
    code, records, _ = run_plan(capsys, *items)
    assert code == 0 and len(records) == len(items)


def test_image_files_are_checked_not_just_their_headers(capsys, tmp_path):
    from PIL import Image

    good = tmp_path / "good.jpg"
    image = Image.new("RGB", (640, 480), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the model sees 480x640
    image.save(good, exif=exif)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000)).save(bomb)
    code, records, _ = run_plan(capsys, str(good), str(truncated), str(bomb), "--max-image-pixels", "1000000")
    assert code == 1
    assert (records[0]["width"], records[0]["height"]) == (480, 640)
    assert records[1]["error"].startswith(str(truncated)) and "truncated" in records[1]["error"]
    assert "over the limit max_pixels=1000000" in records[2]["error"]
    code, records, _ = run_plan(capsys, str(bomb))
    assert code == 0 and records[0]["grid"] == {"rows": 2, "cols": 3}


def test_every_item_is_reported_in_place_even_when_it_looks_like_an_option(capsys):
    code, records, _ = run_plan(capsys, "--json", "10x10", "abc", "-5x5", "10x", "7x7")
    assert code == 1
    assert [r.get("width") for r in records] == [10, None, -5, None, 7]
    assert "abc: neither a size WxH (e.g. 1920x1080) nor an existing file" in records[1]["error"]
    assert "-5x5" in records[2]["error"] and "0 pixels or less" in records[2]["error"]
    assert "a size needs both sides" in records[3]["error"]


@pytest.mark.parametrize(
    ("argv", "limit"),
    [
        (("99999999999x2",), "max_image_pixels=178956970"),
        (("--max-image-pixels", "100", "1920x1080"), "=100"),
    ],
)
def test_sizes_meet_the_pixel_limit_of_files(capsys, argv, limit):
    code, records, _ = run_plan(capsys, "--json", *argv)
    assert code == 1 and "over the limit" in records[0]["error"] and limit in records[0]["error"]


def test_an_aspect_too_extreme_to_keep_is_refused(capsys):
    code, records, _ = run_plan(capsys, "--json", "700000x1", "4000x100")
    assert code == 1 and "too extreme to slice" in records[0]["error"]
    assert records[1]["grid"] == {"rows": 1, "cols": 5}
