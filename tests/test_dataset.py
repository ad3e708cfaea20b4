"""LlavaDataset: record forms, <image> placeholders, truncation, stages, the bad-record policy."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_uhd.config import TINY
from llava_uhd.data import AugmentConfig, LlavaDataset, parse_record, read_skip_log
from llava_uhd.errors import BadSampleError, ConfigError
from llava_uhd.layout import visual_token_count
from llava_uhd.processing import LlavaUHDProcessor
from llava_uhd.slicing import apply_plan, plan_slices
from llava_uhd.templates import IGNORE_INDEX
from llava_uhd.tokens import pad_token_id

Q = TINY.resampler.num_queries


def patchify(piece: Image.Image) -> torch.Tensor:
    """Reference: CLIP-normalise a piece and flatten its patches row-major as (C, P, P) each."""
    p, cfg = TINY.slicing.patch_size, TINY.slicing
    x = torch.from_numpy(np.asarray(piece, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (C, H, W)
    x = (x - torch.tensor(cfg.image_mean).view(3, 1, 1)) / torch.tensor(cfg.image_std).view(3, 1, 1)
    c, h, w = x.shape
    patches = [
        x[:, r * p : (r + 1) * p, q * p : (q + 1) * p].reshape(-1)
        for r in range(h // p)
        for q in range(w // p)
    ]
    return torch.stack(patches)


@pytest.fixture(scope="module")
def processor(llama_tokenizer):
    # exact resizing, so pixels can be checked against apply_plan; a copy: the processor adds <image>
    return LlavaUHDProcessor(copy.deepcopy(llama_tokenizer), TINY, resize_mode="exact")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "wide.png")  # 300x200 at S=112: sliced
    Image.new("RGB", (60, 90), (30, 30, 200)).save(root / "small.png")  # below S*S: overview only
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def conv(question: str, answer: str = "Yes.") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def image_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<image>")


def test_sample_keys_pixels_and_layout(processor, folder):
    ds = LlavaDataset(
        [{"id": "a", "image": "wide.png", "conversations": conv("<image>\nColour?")}],
        folder,
        processor,
        max_length=512,
    )
    sample = ds[0]
    plan = plan_slices(300, 200, TINY.slicing)
    assert plan.num_slices > 1
    assert sample["id"] == "a"
    assert sample["piece_grids"].tolist() == [list(g) for g in plan.piece_grids]
    assert sample["pieces_per_image"].tolist() == [plan.num_slices + 1]
    # pixels: an independent path through apply_plan + patchify, piece by piece
    slices, overview = apply_plan(Image.open(folder / "wide.png").convert("RGB"), plan)
    expected = torch.cat([patchify(p) for p in [*slices, overview]])
    torch.testing.assert_close(sample["pixel_values"], expected, rtol=0, atol=1e-5)
    assert sample["pixel_values"].shape[0] == sum(r * c for r, c in plan.piece_grids)
    # layout: Q placeholders per piece, one separator token after each slice
    assert int((sample["input_ids"] == image_id(processor)).sum()) == (plan.num_slices + 1) * Q
    assert sample["num_visual_tokens"] == visual_token_count(plan, Q)
    assert sample["num_text_tokens"] + sample["num_visual_tokens"] == len(sample["input_ids"])
    assert ds.lengths() == [len(sample["input_ids"])]
    visual = sample["input_ids"] == image_id(processor)
    assert (sample["labels"][visual] == IGNORE_INDEX).all()


def test_overview_only_stage1(processor, folder):
    record = {"id": "cap", "image": "wide.png", "conversations": conv("<image>", "A red page.")}
    ds = LlavaDataset([record], folder, processor, template="plain", overview_only=True)
    sample = ds[0]
    plan = plan_slices(300, 200, TINY.slicing)
    assert sample["piece_grids"].tolist() == [list(plan.piece_grids[-1])]
    assert sample["num_visual_tokens"] == Q
    assert sample["input_ids"][1 : 1 + Q].tolist() == [image_id(processor)] * Q
    assert ds.lengths() == [len(sample["input_ids"])]


def test_json_and_jsonl_and_role_content_forms_agree(processor, folder, tmp_path):
    llava = {"id": "x", "image": "small.png", "conversations": conv("<image>\nWhat?", "Blue.")}
    openai = {
        "id": "x",
        "image": "small.png",
        "conversations": [
            {"role": "user", "content": "<image>\nWhat?"},
            {"role": "assistant", "content": "Blue."},
        ],
    }
    (tmp_path / "d.json").write_text(json.dumps([llava]))
    (tmp_path / "d.jsonl").write_text("\n" + json.dumps(openai) + "\n\n")
    a = LlavaDataset(tmp_path / "d.json", folder, processor)[0]
    b = LlavaDataset(tmp_path / "d.jsonl", folder, processor)[0]
    for key in ("input_ids", "labels", "pixel_values", "piece_grids"):
        assert torch.equal(a[key], b[key])


def test_bad_data_files(processor, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        LlavaDataset(tmp_path / "bad.jsonl", None, processor)
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(ConfigError, match="must hold a list of records, got dict"):
        LlavaDataset(tmp_path / "obj.json", None, processor)


def test_placeholders_missing_one_several():
    missing = parse_record({"id": "m", "image": ["a.png", "b.png"], "conversations": conv("Compare.")})
    assert missing.turns[0].text == "<image>\n<image>\nCompare."
    one = parse_record({"id": "o", "image": "a.png", "conversations": conv("Look: <image> now")})
    assert one.turns[0].text == "Look: <image> now"
    several = parse_record(
        {"id": "s", "image": ["a.png", "b.png"], "conversations": conv("<image> vs <image>")}
    )
    assert several.images == ("a.png", "b.png")
    with pytest.raises(
        BadSampleError, match=r"sample 'c': image-count mismatch: 2 <image> placeholder\(s\) for 1"
    ):
        parse_record({"id": "c", "image": "a.png", "conversations": conv("<image><image>")})
    with pytest.raises(BadSampleError, match=r"'t': image-count mismatch: 1 <image> placeholder\(s\) for 0"):
        parse_record({"id": "t", "conversations": conv("<image> text only")})


def test_several_images_in_text_order(processor, folder):
    record = {"id": "two", "image": ["small.png", "wide.png"], "conversations": conv("<image> then <image>")}
    sample = LlavaDataset([record], folder, processor)[0]
    small, wide = plan_slices(60, 90, TINY.slicing), plan_slices(300, 200, TINY.slicing)
    assert sample["pieces_per_image"].tolist() == [1, wide.num_slices + 1]
    assert sample["piece_grids"].tolist() == [list(g) for g in (*small.piece_grids, *wide.piece_grids)]


def test_malformed_turns():
    with pytest.raises(BadSampleError, match=r"'r': malformed turns: roles \['assistant', 'user'\]"):
        parse_record(
            {"id": "r", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}
        )
    with pytest.raises(BadSampleError, match=r"'#3': malformed turns: turn 0 has role 'bot'"):
        parse_record({"conversations": [{"from": "bot", "value": "a"}]}, index=3)
    with pytest.raises(
        BadSampleError, match="'e': malformed turns: 'conversations' must be a non-empty list"
    ):
        parse_record({"id": "e", "conversations": []})
    sys_first = parse_record(
        {"id": "s", "conversations": [{"role": "system", "content": "Be brief."}, *conv("Hi")]}
    )
    assert [t.role for t in sys_first.turns] == ["system", "user", "assistant"]


def test_truncation_never_cuts_a_visual_block(processor, folder):
    long_answer = " ".join(["word"] * 200)
    record = {"id": "long", "image": "small.png", "conversations": conv("<image>\nTell me.", long_answer)}
    full = LlavaDataset([record], folder, processor, max_length=4096)[0]
    start = int((full["input_ids"] == image_id(processor)).nonzero()[0])
    visual_end = start + Q
    cut = LlavaDataset([record], folder, processor, max_length=visual_end + 20)[0]
    assert len(cut["input_ids"]) == visual_end + 20
    assert torch.equal(cut["input_ids"], full["input_ids"][: visual_end + 20])
    assert torch.equal(cut["labels"], full["labels"][: visual_end + 20])
    with pytest.raises(
        BadSampleError,
        match=rf"'long': visual block too long: image 0 occupies tokens "
        rf"{start}..{visual_end - 1}, beyond max_length={visual_end - 1}",
    ):
        LlavaDataset([record], folder, processor, max_length=visual_end - 1)[0]
    # cut right after the image and the question: nothing supervised is left
    with pytest.raises(BadSampleError, match="no supervised token left after truncation"):
        LlavaDataset([record], folder, processor, max_length=visual_end + 2)[0]


BAD_RECORDS = [
    (
        {"id": "missing", "image": "nope.png", "conversations": conv("<image>")},
        "image 'nope.png' cannot be loaded",
    ),
    (
        {"id": "corrupt", "image": "corrupt.png", "conversations": conv("<image>")},
        "image 'corrupt.png' cannot be loaded",
    ),
    ({"id": "turns", "conversations": [{"from": "human", "value": "only a question"}]}, "malformed turns"),
    ({"id": "count", "image": "small.png", "conversations": conv("<image><image>")}, "image-count mismatch"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_RECORDS, ids=[r["id"] for r, _ in BAD_RECORDS])
def test_bad_record_error_names_id_and_reason(processor, folder, record, reason):
    ds = LlavaDataset([record], folder, processor, on_bad_sample="error")
    with pytest.raises(BadSampleError) as info:
        ds[0]
    assert info.value.sample_id == record["id"]
    assert reason in info.value.reason
    assert str(info.value).startswith(f"sample {record['id']!r}: ")


def _is_empty(sample, processor) -> bool:
    """What a bad record reads as under skip: one pad token without a label, no image."""
    return (
        sample["input_ids"].tolist() == [pad_token_id(processor.tokenizer)]
        and sample["labels"].tolist() == [IGNORE_INDEX]
        and sample["pixel_values"].shape[0] == 0
        and sample["piece_grids"].shape == (0, 2)
    )


def test_bad_record_skip_reports_each_once_and_stands_in_for_none(processor, folder, tmp_path):
    good = {"id": "good", "image": "small.png", "conversations": conv("<image>\nOk?")}
    records = [r for r, _ in BAD_RECORDS[:2]] + [good] + [r for r, _ in BAD_RECORDS[2:]]
    log = tmp_path / "logs" / "skipped.jsonl"
    ds = LlavaDataset(records, folder, processor, on_bad_sample="skip", skip_log=log)
    assert ds.usable_indices() == [2]  # checked up front: the bad ones are never drawn
    for _ in range(2):  # read again (a later epoch): nothing new is reported
        for index in range(len(ds)):
            sample = ds[index]
            assert sample["id"] == records[index]["id"]  # a bad record stands in for no other record
            assert _is_empty(sample, processor) is (index != 2)
    assert ds.usable_indices() == [2]
    entries = read_skip_log(log)
    assert [(e["id"], e["index"]) for e in entries] == [
        ("missing", 0),
        ("corrupt", 1),
        ("turns", 3),
        ("count", 4),
    ]
    for entry, (_, reason) in zip(entries, BAD_RECORDS, strict=True):
        assert reason in entry["reason"]
    assert ds.skipped == 4
    # another process (a DataLoader worker, a resumed run) finds them in the file and adds nothing
    again = LlavaDataset(records, folder, processor, on_bad_sample="skip", skip_log=log)
    assert again.usable_indices() == [2] and [again[i]["id"] for i in (0, 1)] == ["missing", "corrupt"]
    assert len(read_skip_log(log)) == 4 and again.skipped == 0
    all_bad = LlavaDataset(records[:2], folder, processor, on_bad_sample="skip")
    assert all_bad.usable_indices() == [] and all_bad.skipped == 2


def test_pixels_corrupt_past_a_good_header_are_found_when_read(processor, folder, tmp_path):
    """A truncated PNG passes the header check; reading it reports it once and gives an empty sample."""
    data = (folder / "wide.png").read_bytes()
    images = tmp_path / "images"
    images.mkdir()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    (images / "small.png").write_bytes((folder / "small.png").read_bytes())
    records = [
        {"id": "cut", "image": "cut.png", "conversations": conv("<image>")},
        {"id": "ok", "image": "small.png", "conversations": conv("<image>")},
    ]
    log = tmp_path / "skipped.jsonl"
    ds = LlavaDataset(records, images, processor, on_bad_sample="skip", skip_log=log)
    assert ds.usable_indices() == [0, 1] and read_skip_log(log) == []
    assert _is_empty(ds[0], processor) and _is_empty(ds[0], processor)
    assert not _is_empty(ds[1], processor)
    entries = read_skip_log(log)
    assert [(e["id"], e["index"]) for e in entries] == [("cut", 0)]
    assert "image 'cut.png' cannot be loaded" in entries[0]["reason"] and "truncated" in entries[0]["reason"]


def test_a_malformed_jsonl_line_is_a_bad_record_under_skip(processor, folder, tmp_path):
    good = json.dumps({"id": "good", "image": "small.png", "conversations": conv("<image>\nOk?")})
    path = tmp_path / "data.jsonl"
    path.write_bytes(f"{good}\n\n{{oops\n{good}\n".encode() + b"\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"data.jsonl:3: not valid JSON"):
        LlavaDataset(path, folder, processor)  # error: the run stops at the line
    log = tmp_path / "skipped.jsonl"
    ds = LlavaDataset(path, folder, processor, on_bad_sample="skip", skip_log=log)
    assert len(ds) == 4 and ds.usable_indices() == [0, 2]
    assert _is_empty(ds[1], processor) and _is_empty(ds[3], processor)
    entries = read_skip_log(log)
    assert [(e["id"], e["index"]) for e in entries] == [("#1", 1), ("#3", 3)]
    assert (
        entries[0]["reason"] == f"{path}:3: not valid JSON: Expecting property name enclosed in double quotes"
    )
    assert entries[1]["reason"].startswith(f"{path}:5: not UTF-8 text")


@pytest.fixture
def escapes(tmp_path):
    """An image folder, an image beside it, and records that reach that image from inside the folder."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (60, 90), (30, 30, 200)).save(images / "inside.png")
    Image.new("RGB", (60, 90), (200, 30, 30)).save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")  # inside by name, outside once resolved
    (images / "inner-link.png").symlink_to(images / "inside.png")
    outside = [
        {"id": "dotdot", "image": "sub/../../outside.png", "conversations": conv("<image>")},
        {"id": "absolute", "image": str(tmp_path / "outside.png"), "conversations": conv("<image>")},
        {"id": "symlink", "image": "link.png", "conversations": conv("<image>")},
    ]
    inside = [
        {"id": "plain", "image": "inside.png", "conversations": conv("<image>")},
        {"id": "dotdot-inside", "image": "sub/../inside.png", "conversations": conv("<image>")},
        {"id": "inner-link", "image": "inner-link.png", "conversations": conv("<image>")},
    ]
    return images, outside, inside


def test_image_paths_outside_the_image_folder_are_bad_samples(processor, escapes, tmp_path):
    images, outside, inside = escapes
    for record in outside:
        with pytest.raises(BadSampleError, match="outside the image folder") as info:
            LlavaDataset([record], images, processor)[0]
        assert info.value.sample_id == record["id"]
        assert (
            f"image {record['image']!r} resolves to {tmp_path.resolve() / 'outside.png'}" in info.value.reason
        )
        assert "data.allow_outside_image_folder" in info.value.reason
    assert [LlavaDataset([r], images, processor)[0]["id"] for r in inside] == [r["id"] for r in inside]

    log = tmp_path / "skipped.jsonl"
    ds = LlavaDataset([*outside, inside[0]], images, processor, on_bad_sample="skip", skip_log=log)
    assert ds.lengths()[:3] == [0, 0, 0]  # never probed
    assert ds.usable_indices() == [3] and ds[3]["id"] == "plain"
    entries = read_skip_log(log)
    assert [e["id"] for e in entries] == ["dotdot", "absolute", "symlink"]
    assert all("outside the image folder" in e["reason"] for e in entries)


def test_outside_image_paths_load_when_allowed(processor, escapes):
    images, outside, _ = escapes
    ds = LlavaDataset(outside, images, processor, allow_outside_image_folder=True)
    assert [ds[i]["id"] for i in range(len(ds))] == ["dotdot", "absolute", "symlink"]
    assert all(length > 0 for length in ds.lengths())


def test_the_training_config_flag_reaches_the_dataset(escapes, tmp_path):
    from pathlib import Path

    from llava_uhd.train.config import TrainConfig
    from llava_uhd.train.entry import build_data
    from llava_uhd.train.setup import build_processor
    from llava_uhd.train.stages import get_stage

    images, outside, _ = escapes
    (tmp_path / "data.json").write_text(json.dumps(outside))
    debug = Path(__file__).resolve().parents[1] / "configs" / "train" / "debug-cpu.yaml"
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={tmp_path / 'data.json'}",
        f"data.image_folder={images}",
    ]
    for flag in (False, True):
        config = TrainConfig.load(debug, [*base, f"data.allow_outside_image_folder={str(flag).lower()}"])
        config = config.resolved()
        data = build_data(config, get_stage(config.stage), build_processor(config), rank=0)
        assert data.dataset.allow_outside_image_folder is flag
        assert (data.lengths == [0, 0, 0]) is not flag


def test_invalid_settings(processor):
    with pytest.raises(ConfigError, match="on_bad_sample must be 'error' or 'skip', got 'drop'"):
        LlavaDataset([], None, processor, on_bad_sample="drop")
    with pytest.raises(ConfigError, match="max_length must be >= 1, got 0"):
        LlavaDataset([], None, processor, max_length=0)


def test_augment_off_by_default_and_deterministic(processor, folder):
    record = {"id": "a", "image": "wide.png", "conversations": conv("<image>\nColour?")}
    plain = LlavaDataset([record], folder, processor)[0]
    explicit_off = LlavaDataset([record], folder, processor, augment=AugmentConfig())[0]
    assert torch.equal(plain["pixel_values"], explicit_off["pixel_values"])
    aug = AugmentConfig(scale_range=(0.5, 2.0), aspect_jitter=0.3)
    ds1, ds2 = (LlavaDataset([record], folder, processor, augment=aug, seed=7) for _ in range(2))
    grids = []
    for epoch in range(4):
        ds1.set_epoch(epoch)
        ds2.set_epoch(epoch)
        a, b = ds1[0], ds2[0]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        grids.append(tuple(map(tuple, a["piece_grids"].tolist())))
    assert len(set(grids)) > 1  # the image size, hence the plan, changes with the epoch


def test_fast_resize_mode_same_layout_close_pixels(processor, folder, llama_tokenizer):
    """The processor's default (fast) resizing gives the same tokens and grids, pixels within resize noise."""
    fast = LlavaUHDProcessor(copy.deepcopy(llama_tokenizer), TINY)
    record = {"id": "a", "image": "wide.png", "conversations": conv("<image>\nColour?")}
    exact_sample = LlavaDataset([record], folder, processor)[0]
    fast_sample = LlavaDataset([record], folder, fast)[0]
    assert torch.equal(exact_sample["input_ids"], fast_sample["input_ids"])
    assert torch.equal(exact_sample["piece_grids"], fast_sample["piece_grids"])
    assert (exact_sample["pixel_values"] - fast_sample["pixel_values"]).abs().mean() < 0.05
