"""The processor: pixel layout, token expansion, separators, budgets, batching, persistence."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from llava_uhd.budget import budget_slice_limits, plan_with_budget
from llava_uhd.config import TINY, SlicingConfig
from llava_uhd.errors import ConfigError, PlaceholderMismatchError, TokenBudgetError
from llava_uhd.images import check_image_file, load_image, probe_image_size
from llava_uhd.layout import visual_token_count
from llava_uhd.pixels import draft_size, image_patches, patches_to_piece
from llava_uhd.processing import PRESET_FILE, LlavaUHDProcessor
from llava_uhd.slicing import plan_slices
from llava_uhd.tokens import expand_image_tokens, separator_token_ids

Q = TINY.resampler.num_queries
P = TINY.slicing.patch_size


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """Sharp edges, text and noise: a hard case for resampling differences."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 37):
        draw.line([(i, 0), (width - i, height)], fill=(255, 255, 255), width=1)
    draw.text((5, 5), "LLaVA-UHD 0123456789", fill=(0, 0, 0))
    return image


@pytest.fixture(scope="module")
def processor(llama_tokenizer) -> LlavaUHDProcessor:
    return LlavaUHDProcessor(llama_tokenizer, TINY, resize_mode="exact")


def _reference_pieces(image: Image.Image, config: SlicingConfig) -> list[np.ndarray]:
    """Independent computation: PIL bicubic resizes, crops, then (x / 255 - mean) / std in numpy, HWC."""
    plan = plan_slices(*image.size, config)
    pieces = []
    if plan.refine_size is not None:
        refine = image.resize(plan.refine_size, Image.Resampling.BICUBIC)
        pieces = [refine.crop(box) for box in plan.slice_boxes()]
    pieces.append(image.resize(plan.overview, Image.Resampling.BICUBIC))
    mean, std = np.array(config.image_mean), np.array(config.image_std)
    return [(np.asarray(p, dtype=np.float64) / 255.0 - mean) / std for p in pieces]


def _unflatten(patches: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows*cols, C*P*P) -> (rows*P, cols*P, C), written out with numpy only."""
    out = np.zeros((rows * P, cols * P, 3))
    for index, patch in enumerate(patches):
        r, c = divmod(index, cols)
        out[r * P : (r + 1) * P, c * P : (c + 1) * P, :] = patch.reshape(3, P, P).transpose(1, 2, 0)
    return out


# --- pixels -------------------------------------------------------------------------------------------


def test_exact_pixels_match_an_independent_pil_numpy_computation(processor: LlavaUHDProcessor) -> None:
    image = scene(300, 200)
    out = processor("<image>", [image])
    plan = plan_slices(300, 200, TINY.slicing)
    assert out["pixel_values"].shape == (plan.vit_patches, 3 * P * P)
    assert out["pixel_values"].dtype == torch.float32
    assert out["piece_grids"].tolist() == [list(g) for g in plan.piece_grids]
    assert out["pieces_per_image"].tolist() == [plan.num_slices + 1]
    pixels = out["pixel_values"].numpy()
    offset = 0
    for (rows, cols), expected in zip(
        out["piece_grids"].tolist(), _reference_pieces(image, TINY.slicing), strict=True
    ):
        piece = _unflatten(pixels[offset : offset + rows * cols], rows, cols)
        np.testing.assert_allclose(piece, expected, atol=1e-5)
        offset += rows * cols
    assert offset == pixels.shape[0]


def test_exact_mode_matches_transformers_clip_processor_bit_for_bit() -> None:
    from transformers import CLIPImageProcessorPil

    image = scene(500, 260, seed=1)
    config = SlicingConfig()
    plan = plan_slices(*image.size, config)
    ours = image_patches([image], [plan], config, mode="exact")
    clip = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    from llava_uhd.slicing import apply_plan

    slices, overview = apply_plan(image, plan)
    offset = 0
    for piece, (rows, cols) in zip((*slices, overview), plan.piece_grids, strict=True):
        theirs = clip(piece, return_tensors="pt")["pixel_values"][0]  # (C, H, W)
        mine = patches_to_piece(ours[offset : offset + rows * cols], rows, cols, config.patch_size)
        assert torch.equal(mine, theirs)
        offset += rows * cols


def test_patches_to_piece_inverts_the_flattening() -> None:
    chw = torch.arange(3 * 2 * P * 3 * P, dtype=torch.float32).view(3, 2 * P, 3 * P)
    flat = chw.view(3, 2, P, 3, P).permute(1, 3, 0, 2, 4).reshape(6, 3 * P * P)  # (rows, cols, C, P, P)
    assert torch.equal(patches_to_piece(flat, 2, 3, P), chw)
    # the first patch is the top-left P x P block of every channel, channel-major
    assert torch.equal(flat[0].view(3, P, P), chw[:, :P, :P])


@pytest.mark.parametrize("size", [(1024, 768), (1920, 1080), (672, 1008), (337, 336), (90, 60)])
def test_fast_mode_is_close_to_exact(size: tuple[int, int]) -> None:
    config = SlicingConfig()
    image = scene(*size, seed=2)
    plan = plan_slices(*size, config)
    fast = image_patches([image], [plan], config, mode="fast")
    exact = image_patches([image], [plan], config, mode="exact")
    std = torch.tensor(config.image_std).repeat_interleave(P * P)
    levels = ((fast - exact) * std * 255).abs()  # difference in 8-bit pixel levels
    assert levels.mean() < 1.0, levels.mean()
    assert levels.max() <= 48, levels.max()  # edge pixels; measured maxima are in benchmarks/README.md


def test_jpeg_bytes_are_decoded_at_a_draft_scale_and_stay_close(llama_tokenizer) -> None:
    image = scene(1600, 1200, seed=3)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    plan = plan_slices(1600, 1200, TINY.slicing)
    assert load_image(data, draft_size=draft_size(plan)).size == (800, 600)  # decoded at DCT scale 1/2
    fast = LlavaUHDProcessor(llama_tokenizer, TINY).process_images([data])
    exact = LlavaUHDProcessor(llama_tokenizer, TINY, resize_mode="exact").process_images([data])
    assert fast.plans == exact.plans == (plan,)
    assert fast.pixel_values.shape == exact.pixel_values.shape
    std = torch.tensor(SlicingConfig().image_std).repeat_interleave(P * P)
    levels = ((fast.pixel_values - exact.pixel_values) * std * 255).abs()
    assert levels.mean() < 2.0, levels.mean()  # 1.44 measured on this noisy, hard-edged scene


def png_with_late_exif(image: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk (EXIF orientation) comes after the pixel data, just before IEND."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")  # PNG stores the bare TIFF structure
    chunk = b"eXIf" + payload
    chunk = struct.pack(">I", len(payload)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    iend = data.rindex(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    return data[:iend] + chunk + data[iend:]


@pytest.mark.parametrize("budget", [None, 4 * Q])
def test_png_orientation_after_the_pixels_is_planned_from_the_decoded_image(llama_tokenizer, budget) -> None:
    """The header probe cannot see it; the processor plans the request again once the decoder has, so
    the PNG is sliced upright, beside a JPEG of the same request and under a shared token budget."""
    stored = scene(300, 120, seed=5)
    late = png_with_late_exif(stored, orientation=6)  # rotated 90 degrees: the model sees 120x300
    buffer = io.BytesIO()
    scene(1600, 1200, seed=6).save(buffer, "JPEG", quality=95)
    jpeg = buffer.getvalue()
    assert probe_image_size(late) == (300, 120) and check_image_file(late) == (120, 300)
    fast = LlavaUHDProcessor(llama_tokenizer, TINY)
    got = fast.process_images([late, jpeg], max_visual_tokens=budget)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    expected = fast.process_images([upright, jpeg], max_visual_tokens=budget)
    assert (got.plans[0].width, got.plans[0].height) == (120, 300)
    assert got.plans == expected.plans
    assert torch.equal(got.pixel_values, expected.pixel_values)


def test_pre_resize_is_planned_and_applied(llama_tokenizer) -> None:
    preset = TINY.with_overrides(slicing={"pre_resize_long_side": 448})
    image = scene(900, 500, seed=4)
    fast = LlavaUHDProcessor(llama_tokenizer, preset).process_images([image])
    exact = LlavaUHDProcessor(llama_tokenizer, preset, resize_mode="exact").process_images([image])
    assert fast.plans[0].pre_resized == (448, 248)
    std = torch.tensor(SlicingConfig().image_std).repeat_interleave(P * P)
    assert ((fast.pixel_values - exact.pixel_values) * std * 255).abs().mean() < 1.5
    with pytest.raises(ConfigError, match="resize_mode must be one of"):
        LlavaUHDProcessor(llama_tokenizer, preset, resize_mode="slow")  # type: ignore[arg-type]


# --- text ---------------------------------------------------------------------------------------------


def test_separator_ids_llama(llama_tokenizer) -> None:
    ids = separator_token_ids(llama_tokenizer)
    assert llama_tokenizer.convert_ids_to_tokens(list(ids[","])) == [","]
    assert llama_tokenizer.convert_ids_to_tokens(list(ids["\n"])) == ["<0x0A>"]
    assert llama_tokenizer.convert_ids_to_tokens(llama_tokenizer.encode(",", add_special_tokens=False)) != [
        ","
    ]


def test_separator_ids_other_tokenizers(qwen_tokenizer, bpe_tokenizer) -> None:
    for tokenizer in (qwen_tokenizer, bpe_tokenizer):
        ids = separator_token_ids(tokenizer)
        assert tokenizer.decode(list(ids[","])) == ","
        assert tokenizer.decode(list(ids["\n"])) == "\n"


def test_expansion_layout_counts_and_separators(processor: LlavaUHDProcessor, llama_tokenizer) -> None:
    image = scene(300, 200)  # tiny preset: 3 cols x 2 rows
    plan = plan_slices(300, 200, TINY.slicing)
    assert plan.grid == (2, 3)
    out = processor("Look: <image> ok", [image], add_special_tokens=False)
    ids = out["input_ids"][0].tolist()
    prefix = processor.tokenizer.encode("Look: <image> ok", add_special_tokens=False)
    start = prefix.index(processor.image_token_id)
    visual = ids[start : start + visual_token_count(plan, Q)]
    assert len(ids) == len(prefix) - 1 + visual_token_count(plan, Q)
    assert ids[:start] == prefix[:start] and ids[start + len(visual) :] == prefix[start + 1 :]
    assert visual.count(processor.image_token_id) == (plan.num_slices + 1) * Q
    tokens = llama_tokenizer.convert_ids_to_tokens(
        [visual[(i + 1) * (Q + 1) - 1] for i in range(plan.num_slices)]
    )
    assert tokens == [",", ",", "<0x0A>", ",", ",", "<0x0A>"]
    assert visual[-Q:] == [processor.image_token_id] * Q  # the overview closes the layout


def test_expand_image_tokens_with_labels_and_mismatch() -> None:
    plan = plan_slices(300, 200, TINY.slicing)
    seps = {",": (7,), "\n": (8, 9)}  # a two-token newline is counted as such
    ids, labels = expand_image_tokens(
        [1, 99, 2], [plan], image_token_id=99, num_queries=2, separator_ids=seps, labels=[10, 11, 12]
    )
    layout = [99, 99, 7, 99, 99, 7, 99, 99, 8, 9, 99, 99, 7, 99, 99, 7, 99, 99, 8, 9, 99, 99]
    assert ids == [1, *layout, 2]
    assert labels == [10, *([-100] * len(layout)), 12]
    assert len(layout) == visual_token_count(plan, 2, {",": 1, "\n": 2})
    with pytest.raises(PlaceholderMismatchError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        expand_image_tokens([99, 99], [plan], image_token_id=99, num_queries=2, separator_ids=seps)


def test_image_count_mismatch_names_both_counts(processor: LlavaUHDProcessor) -> None:
    image = scene(64, 64)
    with pytest.raises(PlaceholderMismatchError, match=r"has 2 <image> placeholder\(s\) but 1 image\(s\)"):
        processor("<image> and <image>", [image])
    with pytest.raises(
        PlaceholderMismatchError, match=r"prompt 1 has 0 <image> placeholder\(s\) but 1 image"
    ):
        processor(["<image>", "none"], [[image], [image]])


def test_batch_several_images_padding_and_text_only(processor: LlavaUHDProcessor) -> None:
    big, small = scene(300, 200), scene(50, 40)
    right = processor(["<image> a <image>", "only text"], [big, small])
    left = processor(["<image> a <image>", "only text"], [[big, small], []], padding_side="left")
    plans = [plan_slices(*im.size, TINY.slicing) for im in (big, small)]
    assert right["pieces_per_image"].tolist() == [p.num_slices + 1 for p in plans]
    assert right["piece_grids"].shape == (sum(p.num_slices + 1 for p in plans), 2)
    assert torch.equal(right["pixel_values"], left["pixel_values"])
    n_text = int(right["attention_mask"][1].sum())
    assert right["attention_mask"][1].tolist() == [1] * n_text + [0] * (right["input_ids"].shape[1] - n_text)
    assert left["attention_mask"][1].tolist() == [0] * (left["input_ids"].shape[1] - n_text) + [1] * n_text
    assert left["input_ids"][1, -n_text:].tolist() == right["input_ids"][1, :n_text].tolist()
    text_only = processor("no images here")
    assert set(text_only.keys()) == {"input_ids", "attention_mask"}
    with pytest.raises(ConfigError, match="padding_side must be 'left' or 'right', got 'middle'"):
        processor("x", padding_side="middle")


def test_per_call_max_slices(processor: LlavaUHDProcessor) -> None:
    image = scene(300, 200)
    out = processor("<image>", [image], max_slices=2, return_plans=True)
    assert out.plans[0].num_slices == 2
    assert out["pieces_per_image"].tolist() == [3]
    with pytest.raises(ConfigError, match="max_slices must be >= 1, got 0"):
        processor("<image>", [image], max_slices=0)


# --- budget -------------------------------------------------------------------------------------------

sizes_strategy = st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(sizes_strategy, st.integers(1, 800))
def test_budget_never_exceeded_and_larger_images_keep_higher_limits(sizes, budget) -> None:
    config = TINY.slicing
    seps = {",": 1, "\n": 1}
    try:
        limits = budget_slice_limits(
            sizes, config, num_queries=Q, max_visual_tokens=budget, separator_lengths=seps
        )
    except TokenBudgetError as exc:
        overview_only = sum(
            visual_token_count(plan_slices(w, h, replace(config, max_slices=1)), Q) for w, h in sizes
        )
        assert overview_only > budget
        assert f"max_visual_tokens={budget}" in str(exc)
        return
    plans = plan_with_budget(sizes, config, num_queries=Q, max_visual_tokens=budget, separator_lengths=seps)
    assert sum(visual_token_count(p, Q, seps) for p in plans) <= budget
    for (w, h), limit, plan in zip(sizes, limits, plans, strict=True):
        assert plan.num_slices <= limit
        for (w2, h2), limit2 in zip(sizes, limits, strict=True):
            if w * h > w2 * h2:
                assert limit >= limit2
    # the limits are as high as the budget allows: lifting the lowest-limited image's limit overflows
    unbudgeted = plan_with_budget(sizes, config, num_queries=Q, separator_lengths=seps)
    if any(limit < config.max_slices for limit in limits):
        assert sum(visual_token_count(p, Q, seps) for p in unbudgeted) > budget


def test_budget_largest_image_keeps_most_slices(llama_tokenizer) -> None:
    processor = LlavaUHDProcessor(llama_tokenizer, TINY)
    images = [scene(400, 300), scene(200, 150), scene(600, 450)]
    unlimited = processor.plan_images([im.size for im in images])
    assert [p.num_slices for p in unlimited] == [6, 4, 6]
    out = processor("<image><image><image>", images, max_visual_tokens=200, return_plans=True)
    counts = [p.num_slices for p in out.plans]
    assert counts[2] >= counts[0] >= counts[1]
    assert out["input_ids"][0].eq(processor.image_token_id).sum() == sum(c + 1 for c in counts) * Q
    total = sum(visual_token_count(p, Q) for p in out.plans)
    assert total <= 200
    with pytest.raises(TokenBudgetError, match="max_visual_tokens=40 cannot hold 3 image"):
        processor("<image><image><image>", images, max_visual_tokens=40)


# --- persistence --------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, llama_tokenizer) -> None:
    processor = LlavaUHDProcessor(llama_tokenizer, TINY, padding_side="left", max_visual_tokens=300)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / PRESET_FILE).is_file()
    loaded = LlavaUHDProcessor.from_pretrained(tmp_path)
    assert loaded.preset == TINY
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.separator_ids == processor.separator_ids
    assert (loaded.padding_side, loaded.max_visual_tokens, loaded.resize_mode) == ("left", 300, "fast")
    image = scene(300, 200)
    a, b = processor(["<image> hi", "x"], [image]), loaded(["<image> hi", "x"], [image])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ConfigError, match="no llava_uhd_preset.yaml"):
        LlavaUHDProcessor.from_pretrained(tmp_path / "missing")
