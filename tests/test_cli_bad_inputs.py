"""Every command over bad inputs: exit code 2 (1 where a command reports an item in place and goes on),
exactly one line on stderr naming the input, never a traceback; checked in this process over a table
and in fresh processes for one case a command, so that no library's log or progress line slips in.
Then a fuzz of saved model folders: whatever is damaged, only the package's typed errors escape
``load_pretrained``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_uhd.cli import main
from llava_uhd.errors import LlavaUHDError
from test_cli_batch import tiny_model  # noqa: F401 (a fixture)
from test_convert_official import tiny_parts, write_released

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "debug-cpu.yaml"
_GARBAGE = random.Random(0).randbytes(3000)


@dataclass(frozen=True)
class Inputs:
    """The bad (and a few good) inputs every case draws from; all paths absolute."""

    root: Path
    model: Path
    released: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _copy(source: Path, target: Path, change: Callable[[Path], None]) -> None:
    shutil.copytree(source, target)
    change(target)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _RunsCode:
    """A pickle that would create ``marker`` if unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, llama_tokenizer_dir: Path) -> Inputs:  # noqa: F811
    root = tmp_path_factory.mktemp("bad-inputs")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "empty.png").write_bytes(b"")
    (root / "folder").mkdir()
    (root / "file").write_text("not a folder")
    (root / "unclosed.yaml").write_text("name: [unclosed\n  x: {")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00 name")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "zero-slices.yaml").write_text("name: mine\nslicing: {max_slices: 0}\n")
    (root / "questions.jsonl").write_text(json.dumps({"id": 1, "image": "ok.png", "question": "hi"}) + "\n")
    (root / "unclosed.json").write_text('[{"id": 1,')
    (root / "binary.json").write_bytes(b"\xff\xfe[]")
    (root / "object.json").write_text('{"id": 1}')

    weights = "model.safetensors"
    _copy(tiny_model, root / "m-random-weights", lambda d: (d / weights).write_bytes(_GARBAGE))
    _copy(tiny_model, root / "m-truncated-weights", lambda d: _truncate(d / weights))
    _copy(tiny_model, root / "m-no-tokenizer", lambda d: (d / "tokenizer.json").unlink())
    _copy(tiny_model, root / "m-config-not-json", lambda d: (d / "config.json").write_text("{oops"))

    released = write_released(
        root / "released", tiny_parts(seed=7), "safetensors-sharded", llama_tokenizer_dir
    )
    shard = "model-00001-of-00002.safetensors"
    _copy(released, root / "r-random-shard", lambda d: (d / shard).write_bytes(_GARBAGE))
    _copy(released, root / "r-truncated-shard", lambda d: _truncate(d / shard))
    _copy(released, root / "r-no-tokenizer", lambda d: (d / "tokenizer.json").unlink())
    bin_released = write_released(root / "r-bin", tiny_parts(seed=7), "bin", llama_tokenizer_dir)
    _copy(bin_released, root / "r-bin-truncated", lambda d: _truncate(d / "pytorch_model.bin"))
    _copy(bin_released, root / "r-bin-random", lambda d: (d / "pytorch_model.bin").write_bytes(_GARBAGE))
    _copy(
        bin_released,
        root / "r-bin-code",
        lambda d: torch.save({"w": _RunsCode(root / "code-ran")}, d / "pytorch_model.bin"),
    )
    return Inputs(root, tiny_model, released)


# {r}: the inputs folder, {m}: a good tiny model, {rel}: a good released checkpoint, {cfg}: debug-cpu.yaml
TRAIN = "train --config {cfg} --set output_dir={r}/run"
CONVERT = "convert --from official-v1"
BATCH = "batch {r}/questions.jsonl --output"

# (id, command line, exit code, text the one stderr line must hold)
CASES: list[tuple[str, str, int, str]] = [
    # plan reports each item in place and exits 1; a bad preset or flag stops it (2)
    ("plan-missing-file", "plan {r}/nope.png", 1, "nope.png: neither a size"),
    ("plan-folder", "plan {r}/folder", 1, "folder: is a directory"),
    ("plan-corrupt-image", "plan {r}/corrupt.png", 1, "corrupt.png: not an image"),
    ("plan-empty-image", "plan {r}/empty.png", 1, "empty.png: empty file"),
    ("plan-preset-missing", "plan --preset {r}/nope.yaml 9x9", 2, "nope.yaml: no such preset file"),
    (
        "plan-preset-not-yaml",
        "plan --preset {r}/unclosed.yaml 9x9",
        2,
        "unclosed.yaml: a preset is not valid",
    ),
    ("plan-preset-not-utf8", "plan --preset {r}/binary.yaml 9x9", 2, "binary.yaml: not UTF-8 text"),
    ("plan-preset-a-list", "plan --preset {r}/list.yaml 9x9", 2, "list.yaml: a preset must be a mapping"),
    ("plan-preset-bad-value", "plan --preset {r}/zero-slices.yaml 9x9", 2, "zero-slices.yaml: max_slices"),
    ("plan-zero-slices", "plan --max-slices 0 9x9", 2, "max_slices must be >= 1, got 0"),
    ("plan-flag-not-an-int", "plan --max-slices many 9x9", 2, "argument --max-slices: invalid int"),
    ("plan-unknown-flag", "plan --bogus 9x9", 2, "unrecognized arguments: --bogus"),
    ("slice-missing-image", "slice {r}/nope.png --out {r}/x.png", 2, "nope.png: no such file"),
    ("slice-corrupt-image", "slice {r}/corrupt.png --out {r}/x.png", 2, "corrupt.png: not an image"),
    ("slice-out-folder-missing", "slice {r}/ok.png --out {r}/no/x.png", 2, "no/x.png: folder"),
    ("slice-out-not-png", "slice {r}/ok.png --out {r}/x.jpg", 2, "x.jpg: the picture is written as PNG"),
    ("slice-bad-preset", "slice {r}/ok.png --out {r}/x.png --preset {r}/unclosed.yaml", 2, "unclosed.yaml"),
    ("ask-no-model-folder", "ask --model {r}/nope hi", 2, "nope: no such model folder"),
    ("ask-random-weights", "ask --model {r}/m-random-weights hi", 2, "m-random-weights: cannot read the"),
    (
        "ask-truncated-weights",
        "ask --model {r}/m-truncated-weights hi",
        2,
        "m-truncated-weights: cannot read",
    ),
    ("ask-no-tokenizer", "ask --model {r}/m-no-tokenizer hi", 2, "m-no-tokenizer: cannot load the tokenizer"),
    ("ask-config-not-json", "ask --model {r}/m-config-not-json hi", 2, "config.json is not JSON"),
    ("ask-missing-image", "ask --model {m} --image {r}/nope.png hi", 2, "nope.png: no such file"),
    ("ask-image-folder", "ask --model {m} --image {r}/folder hi", 2, "folder: is a directory"),
    ("ask-corrupt-image", "ask --model {m} --image {r}/corrupt.png hi", 2, "corrupt.png: not an image"),
    (
        "ask-two-placeholders",
        "ask --model {m} --image {r}/ok.png <image><image>hi",
        2,
        "2 <image> placeholder",
    ),
    ("ask-zero-beams", "ask --model {m} hi --num-beams 0", 2, "num_beams must be >= 1, got 0"),
    ("batch-missing-input", "batch {r}/nope.jsonl --output {r}/o.jsonl", 2, "nope.jsonl: no such input file"),
    ("batch-input-folder", "batch {r}/folder --output {r}/o.jsonl", 2, "folder: is a folder"),
    ("batch-output-folder", f"{BATCH} {{r}}/folder", 2, "--output"),
    ("batch-output-under-a-file", f"{BATCH} {{r}}/file/o.jsonl", 2, "file is a file, not a folder"),
    ("batch-bad-model", f"{BATCH} {{r}}/o.jsonl --model {{r}}/m-random-weights", 2, "m-random-weights"),
    ("batch-zero-batch-size", f"{BATCH} {{r}}/o.jsonl --batch-size 0", 2, "--batch-size must be >= 1"),
    ("convert-no-source", f"{CONVERT} {{r}}/nope {{r}}/out", 2, "nope: no such checkpoint folder"),
    ("convert-random-shard", f"{CONVERT} {{r}}/r-random-shard {{r}}/out", 2, "00002.safetensors: not a"),
    (
        "convert-truncated-shard",
        f"{CONVERT} {{r}}/r-truncated-shard {{r}}/out",
        2,
        "00002.safetensors: not a",
    ),
    ("convert-truncated-bin", f"{CONVERT} {{r}}/r-bin-truncated {{r}}/out", 2, "model.bin: cannot be read"),
    ("convert-random-bin", f"{CONVERT} {{r}}/r-bin-random {{r}}/out", 2, "model.bin: refused to load"),
    ("convert-bin-that-runs-code", f"{CONVERT} {{r}}/r-bin-code {{r}}/out", 2, "GLOBAL posix.system"),
    (
        "convert-no-tokenizer",
        f"{CONVERT} {{r}}/r-no-tokenizer {{r}}/out",
        2,
        "no tokenizer.model or tokenizer",
    ),
    ("convert-dst-a-file", f"{CONVERT} {{rel}} {{r}}/file", 2, "file: already exists"),
    ("convert-bad-shard-size", f"{CONVERT} {{rel}} {{r}}/out --max-shard-size lots", 2, "--max-shard-size"),
    ("convert-unknown-layout", "convert --from v9 {rel} {r}/out", 2, "invalid choice: 'v9'"),
    ("train-config-missing", "train --config {r}/nope.yaml", 2, "nope.yaml: no such training config file"),
    ("train-config-folder", "train --config {r}/folder", 2, "folder: no such training config file"),
    ("train-config-not-yaml", "train --config {r}/unclosed.yaml", 2, "unclosed.yaml: a training config is"),
    ("train-config-not-utf8", "train --config {r}/binary.yaml", 2, "binary.yaml: not UTF-8 text"),
    ("train-set-without-value", f"{TRAIN} --set lr", 2, "--set expects key=value, got 'lr'"),
    ("train-set-unknown-key", f"{TRAIN} --set bogus=1", 2, "unknown field(s) ['bogus']"),
    ("train-data-missing", f"{TRAIN} --set data.train={{r}}/nope.json", 2, "nope.json: no such data file"),
    ("train-data-not-json", f"{TRAIN} --set data.train={{r}}/unclosed.json", 2, "unclosed.json: not valid"),
    ("train-data-not-utf8", f"{TRAIN} --set data.train={{r}}/binary.json", 2, "binary.json: not UTF-8"),
    ("train-data-an-object", f"{TRAIN} --set data.train={{r}}/object.json", 2, "object.json: a LLaVA JSON"),
    ("train-tokenizer-empty", f"{TRAIN} --set model.tokenizer={{r}}/folder", 2, "folder: cannot load the"),
    ("train-pretrained-damaged", f"{TRAIN} --set model.pretrained={{r}}/m-random-weights", 2, "m-random-w"),
    (
        "train-init-from-damaged",
        f"{TRAIN} --set model.init_from={{r}}/m-truncated-weights",
        2,
        "m-truncated-weights/model.safetensors: not a readable safetensors file",
    ),  # fmt: skip
    ("train-resume-missing", f"{TRAIN} --resume {{r}}/nope", 2, "nope': no such checkpoint folder"),
    (
        "train-output-a-file",
        "train --config {cfg} --set output_dir={r}/file",
        2,
        "exists and is not a folder",
    ),
    ("synthdoc-out-a-file", "synthdoc data {r}/file --n 1", 2, "file: exists and is not a folder"),
    ("synthdoc-no-pages", "synthdoc data {r}/pages --n 0", 2, "needs n >= 1"),
    ("synthdoc-negative-jitter", "synthdoc data {r}/pages --n 1 --colour-jitter -3", 2, "--colour-jitter"),
    ("synthdoc-json-name-a-path", "synthdoc data {r}/pages --n 1 --json-name ../x.json", 2, "'../x.json'"),
    ("synthdoc-tokenizer-out-a-file", "synthdoc tokenizer {r}/file", 2, "file: exists and is not a folder"),
    ("demo-no-model-folder", "demo --model {r}/nope", 2, "nope: no such model folder"),
    ("serve-beams-over-limit", "serve --num-beams 9 --port 0", 2, "--num-beams 9 is over --max-beams 8"),
    ("serve-bad-port", "serve --port 70000", 2, "--port must be in 0..65535, got 70000"),
    ("demo-missing-image", "demo --model {m} --image {r}/nope.png", 2, "nope.png: no such file"),
    ("demo-out-dir-a-file", "demo --model {m} --out-dir {r}/file", 2, "--out-dir"),
]


def _argv(line: str, inputs: Inputs) -> list[str]:
    values = {"r": inputs.root, "m": inputs.model, "rel": inputs.released, "cfg": CONFIG}
    return [part.format(**values) for part in line.split()]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code)


@pytest.mark.parametrize(("line", "code", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_naming_it(inputs, line, code, named, capfd, monkeypatch):
    monkeypatch.chdir(inputs.root)
    args = _argv(line, inputs)
    assert _run(args) == code
    _, err = capfd.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llava-uhd {args[0]}: error: ") and named in lines[0], lines[0]
    assert not (inputs / "code-ran").exists()


@pytest.mark.parametrize(
    "case",
    [
        "plan-preset-not-yaml",
        "slice-corrupt-image",
        "ask-no-tokenizer",
        "batch-bad-model",
        "convert-no-tokenizer",
        "train-data-not-json",
        "synthdoc-out-a-file",
        "demo-missing-image",
    ],
)
def test_in_a_fresh_process_no_library_line_comes_with_the_error(inputs, case):
    """Libraries log and draw progress bars once per process, so the table above cannot see them all."""
    _, line, code, named = next(c for c in CASES if c[0] == case)
    args = _argv(line, inputs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llava_uhd.cli", *args],
        capture_output=True,
        text=True,
        cwd=inputs.root,
        env=env,
    )
    assert done.returncode == code
    assert done.stderr.count("\n") == 1 and named in done.stderr, done.stderr


def test_an_animated_image_is_planned_by_its_first_frame_with_one_warning_line(inputs, capfd, monkeypatch):
    monkeypatch.chdir(inputs.root)
    frames = [Image.new("RGB", (640, 480), colour) for colour in ("red", "blue")]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:])
    assert _run(["plan", "anim.gif", "anim.gif"]) == 0
    out, err = capfd.readouterr()
    assert err == "llava-uhd plan: warning: anim.gif: a GIF image of 2 frames; only the first frame is used\n"
    assert out.count("640x480: 2x2 grid") == 2


# --- checkpoint folders: only typed errors escape load_pretrained ----------------------------------

FILES = (
    "config.json",
    "model.safetensors",
    "llava_uhd_preset.yaml",
    "llava_uhd_processor.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
ODD_VALUES = (0, -1, 1, 3, 10**12, 1.5, "x", "", None, [], {}, True)


def _leaves(node: object, trail: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*trail, key))]
    if isinstance(node, list):
        return [leaf for k, value in enumerate(node) for leaf in _leaves(value, (*trail, k))]
    return [trail]


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, str, object]:
    """(file, how, parameter): how a saved folder is damaged."""
    name = draw(st.sampled_from(FILES))
    how = draw(st.sampled_from(["random", "truncate", "flip", "delete", "value", "value"]))
    if how == "random":
        return name, how, draw(st.binary(min_size=0, max_size=2048))
    if how in ("truncate", "flip"):
        return name, how, draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=6))
    if how == "value":
        name = draw(st.sampled_from([n for n in FILES if n.endswith(".json")]))
        return name, how, (draw(st.floats(0, 1, exclude_max=True)), draw(st.sampled_from(ODD_VALUES)))
    return name, how, None


def _damage(folder: Path, name: str, how: str, parameter: object) -> None:
    path = folder / name
    data = path.read_bytes()
    if how == "random":
        path.write_bytes(parameter)
    elif how == "truncate":
        path.write_bytes(data[: int(parameter[0] * len(data))])
    elif how == "flip":
        changed = bytearray(data)
        for where in parameter:
            changed[int(where * len(changed))] ^= 0x5A
        path.write_bytes(bytes(changed))
    elif how == "delete":
        path.unlink()
    else:  # one value of the JSON replaced by an odd one
        document = json.loads(data)
        where, value = parameter
        leaves = _leaves(document)
        trail = leaves[int(where * len(leaves))]
        node = document
        for key in trail[:-1]:
            node = node[key]
        if trail:
            node[trail[-1]] = value
        path.write_text(json.dumps(document))


@pytest.fixture(scope="module")
def other_sizes(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny model's folder with the config of a wider model: config and weights disagree."""
    folder = tmp_path_factory.mktemp("mismatch") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_and_weights_that_disagree_are_a_typed_error(other_sizes):
    from llava_uhd.auto import load_pretrained
    from llava_uhd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="the weights do not fit config.json: .* of another shape"):
        load_pretrained(other_sizes)


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(damaged=damage())
def test_only_typed_errors_escape_load_pretrained(tiny_model, tmp_path_factory, damaged):  # noqa: F811
    from llava_uhd.auto import load_pretrained

    folder = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_model, folder)
    _damage(folder, *damaged)
    try:
        model, processor = load_pretrained(folder)
    except LlavaUHDError:
        return
    assert processor.image_token_id == model.config.image_token_id
