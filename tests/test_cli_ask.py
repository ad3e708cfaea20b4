"""`llava-uhd convert --from official-v1` then `llava-uhd ask` on a tiny checkpoint in the released layout,
end to end through the CLI, plus the one-line errors (exit 2) for bad folders."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_uhd.cli import main
from test_convert_official import tiny_parts, write_released


@pytest.fixture(scope="module")
def converted(tmp_path_factory, llama_tokenizer_dir) -> tuple[Path, Path, str]:
    """(released folder, converted folder, convert's stdout)."""
    root = tmp_path_factory.mktemp("ask")
    source = write_released(root / "released", tiny_parts(seed=7), "safetensors-sharded", llama_tokenizer_dir)
    destination = root / "converted"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert", "--from", "official-v1", str(source), str(destination)]) == 0
    return source, destination, out.getvalue()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (120, 200, 3), generator=generator, dtype=torch.uint8).numpy()
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_convert_prints_every_tensor_and_writes_a_model_folder(converted):
    from llava_uhd.model.convert_official import read_released
    from llava_uhd.processing import LlavaUHDProcessor

    source, destination, stdout = converted
    # (third-party libraries may log to stdout too: look at the report's own lines)
    lines = [
        line
        for line in stdout.splitlines()
        if line.startswith(("mapped ", "ignored ", "unexpected ", "converted "))
    ]
    state = read_released(source).state_dict
    reported = {line.split()[1] for line in lines[:-1]}
    assert reported == set(state)  # every released tensor has a line
    assert sum(line.startswith("mapped ") for line in lines) == len(state) - 4
    assert lines[-1].endswith(
        f"as preset official-v1: {len(state) - 4} mapped, 0 missing, 0 unexpected, 4 ignored"
    )
    processor = LlavaUHDProcessor.from_pretrained(destination)
    assert processor.preset.name == "official-v1" and processor.preset.slicing.max_slices == 7
    assert processor.preset.resampler.kind == "windowed" and processor.num_queries == 144
    config = json.loads((destination / "config.json").read_text())
    assert config["image_token_id"] == processor.image_token_id == 32000
    assert config["template"] == "vicuna_v1"


def test_ask_answers_with_the_saved_slicing(converted, image_path, capsys):
    _, destination, _ = converted
    argv = [
        "ask",
        "--model",
        str(destination),
        "--image",
        str(image_path),
        "What is in the image?",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["question"] == "What is in the image?" and record["images"] == [str(image_path)]
    assert isinstance(record["answer"], str)


def test_ask_with_beams_and_two_images(converted, image_path, capsys):
    _, destination, _ = converted
    argv = [
        "ask",
        "--model",
        str(destination),
        "--image",
        str(image_path),
        "--image",
        str(image_path),
        "Compare them.",
        "--max-new-tokens",
        "2",
        "--num-beams",
        "2",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_answer_matches_a_manual_greedy_decode(converted, image_path):
    """The answer is the model's greedy continuation of the vicuna_v1 prompt with the image expanded."""
    from llava_uhd.auto import load_pretrained
    from llava_uhd.inference.generate import answer, build_prompt

    _, destination, _ = converted
    model, processor = load_pretrained(destination)
    text = answer(model, processor, str(image_path), "Describe.", max_new_tokens=3)
    prompt = build_prompt("Describe.", 1, "vicuna_v1", processor.tokenizer)
    assert prompt.startswith("A chat between a curious user") and prompt.endswith(
        "USER: <image>\nDescribe. ASSISTANT:"
    )
    inputs = processor(prompt, [str(image_path)])
    ids = inputs["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == 144 * inputs["piece_grids"].shape[0]
    with torch.no_grad():
        for _ in range(3):
            logits = model(
                input_ids=ids, pixel_values=inputs["pixel_values"], piece_grids=inputs["piece_grids"]
            ).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = processor.tokenizer.decode(
        ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()
    assert text == expected


def test_ask_missing_model_folder_exits_2(tmp_path, image_path, capsys):
    assert main(["ask", "--model", str(tmp_path / "nope"), "--image", str(image_path), "hi"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and err.startswith("llava-uhd ask: error: ")
        and "nope: no such model folder" in err
    )


def test_ask_bad_options_exit_2(converted, image_path, capsys):
    _, destination, _ = converted
    assert (
        main(["ask", "--model", str(destination), "--image", str(image_path), "hi", "--num-beams", "0"]) == 2
    )
    assert "num_beams must be >= 1, got 0" in capsys.readouterr().err


def test_ask_dtype_loads_the_weights_in_it(converted, image_path, capsys, monkeypatch):
    from llava_uhd import auto

    _, destination, _ = converted
    loaded = []

    def spy(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        loaded.append(model)
        return model, processor

    load = auto.load_pretrained
    monkeypatch.setattr(auto, "load_pretrained", spy)
    argv = ["ask", "--model", str(destination), "--image", str(image_path), "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--dtype", "bfloat16", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["answer"], str)
    assert main(argv) == 0  # auto: float32 on a CPU
    assert [model.dtype for model in loaded] == [torch.bfloat16, torch.float32]
    assert {p.dtype for p in loaded[0].parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu0", "--device 'gpu0' is not a torch device"),
        pytest.param(
            "cuda",
            "--device 'cuda': this torch build or machine has no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_ask_bad_device_exits_2(converted, image_path, capsys, device, message):
    _, destination, _ = converted
    assert (
        main(["ask", "--model", str(destination), "--image", str(image_path), "hi", "--device", device]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_convert_errors_exit_2(tmp_path, converted, capsys):
    source, destination, _ = converted
    assert main(["convert", "--from", "official-v1", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: no such checkpoint folder" in err
    assert main(["convert", "--from", "official-v1", str(source), str(destination)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err


def test_convert_json_report(tmp_path, converted, capsys):
    source, _, _ = converted
    assert main(["convert", "--from", "official-v1", str(source), str(tmp_path / "out"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["preset"] == "official-v1" and record["missing"] == [] and record["unexpected"] == []
    assert record["mapped"]["model.mm_projector.proj"] == "resampler.proj"
