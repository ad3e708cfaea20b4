"""Hugging Face conventions: config round trip, save/load, Auto classes, building from downloaded parts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llava_uhd.config import OFFICIAL_V1, PAPER, TINY
from llava_uhd.errors import CheckpointError
from llava_uhd.model import LlavaUHDConfig, LlavaUHDForConditionalGeneration, build_from_pretrained_parts
from llava_uhd.model.resampler import PerceiverResampler

IMAGE_TOKEN_ID = 32000
Q = TINY.resampler.num_queries


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """One 3-piece image (2 slices of 8x4 patches + a 6x6 overview) inside a short text."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[8, 4], [8, 4], [6, 6]])
    ids = (
        [1, 5, 6]
        + [IMAGE_TOKEN_ID] * Q
        + [29892]
        + [IMAGE_TOKEN_ID] * Q
        + [13]
        + [IMAGE_TOKEN_ID] * Q
        + [7, 8]
    )
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(int(grids.prod(dim=1).sum()), 3 * 14 * 14, generator=generator),
        "piece_grids": grids,
    }


@pytest.fixture(scope="module")
def tiny_model() -> LlavaUHDForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaUHDForConditionalGeneration(
        LlavaUHDConfig.from_preset(TINY, image_token_id=IMAGE_TOKEN_ID)
    ).eval()


@pytest.mark.parametrize("preset", [TINY, PAPER, OFFICIAL_V1], ids=lambda p: p.name)
def test_config_round_trips_the_typed_preset(preset, tmp_path) -> None:
    text_config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = LlavaUHDConfig.from_preset(preset, text_config=text_config, image_token_id=7)
    assert config.to_preset() == preset
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaUHDConfig) and loaded.model_type == "llava_uhd"
    assert loaded.to_preset() == preset and loaded.image_token_id == 7
    assert loaded.text_config.hidden_size == 64


def test_state_dict_names(tiny_model) -> None:
    keys = set(tiny_model.state_dict())
    assert {"resampler.query", "resampler.pos_embed", "resampler.kv_proj.weight", "resampler.proj"} <= keys
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("vision_tower.blocks.0.") for k in keys)


def test_save_load_gives_identical_logits(tiny_model, tmp_path) -> None:
    with torch.no_grad():
        tiny_model.resampler.pos_embed.add_(0.5)  # a trained table must be loaded, not recomputed
        expected = tiny_model(**_inputs()).logits
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_uhd"
    for loader in (LlavaUHDForConditionalGeneration, AutoModelForImageTextToText, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, LlavaUHDForConditionalGeneration)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**_inputs()).logits, expected, rtol=0, atol=0)


def test_load_in_bfloat16(tiny_model, tmp_path) -> None:
    tiny_model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = loaded(**_inputs()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_fresh_model_uses_released_resampler_init() -> None:
    model = LlavaUHDForConditionalGeneration(LlavaUHDConfig.from_preset(TINY, image_token_id=IMAGE_TOKEN_ID))
    resampler = model.resampler
    assert isinstance(resampler, PerceiverResampler)
    reference = PerceiverResampler(TINY.resampler, TINY.vision.hidden_size, 64)
    torch.testing.assert_close(resampler.pos_embed, reference.pos_embed)  # the sin-cos table
    assert torch.all(resampler.ln_q.weight == 1) and torch.all(resampler.attn.out_proj.bias == 0)


def test_loading_initialises_only_the_missing_tensors(tiny_model, tmp_path) -> None:
    """The one init recipe runs for tensors a checkpoint lacks and leaves the loaded ones alone."""
    from safetensors.torch import load_file, save_file

    with torch.no_grad():
        tiny_model.resampler.pos_embed.add_(0.5)  # unlike the sin-cos table the recipe would write
    tiny_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = ("resampler.query", "resampler.proj", "vision_tower.pos_embed")
    save_file({k: v for k, v in weights.items() if k not in missing}, tmp_path / "model.safetensors")
    loaded = LlavaUHDForConditionalGeneration.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for name in ("resampler.pos_embed", "resampler.ln_q.weight", "vision_tower.cls_token"):
        assert torch.equal(state[name], weights[name]), name
    for name in missing:
        assert not torch.equal(state[name], weights[name]) and torch.isfinite(state[name]).all(), name
    assert state["resampler.proj"].std().item() == pytest.approx(64**-0.5, rel=0.1)


def _tiny_parts(tmp_path):
    torch.manual_seed(1)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
        )
    )
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    llm.save_pretrained(tmp_path / "llm")
    return clip, llm


def test_build_from_pretrained_parts(tmp_path) -> None:
    clip, llm = _tiny_parts(tmp_path)
    model = build_from_pretrained_parts(tmp_path / "clip", tmp_path / "llm", TINY, image_token_id=500)
    for name, value in llm.state_dict().items():
        torch.testing.assert_close(model.language_model.state_dict()[name], value, rtol=0, atol=0)
    (clip_patch,) = (
        v for k, v in clip.state_dict().items() if k.endswith("embeddings.patch_embedding.weight")
    )
    torch.testing.assert_close(model.vision_tower.patch_embed.weight, clip_patch, rtol=0, atol=0)
    preset = model.config.to_preset()
    assert preset.text.name_or_path == str(tmp_path / "llm") and preset.vision.hidden_size == 32
    assert preset.resampler == TINY.resampler and preset.slicing == TINY.slicing
    assert model.config.text_config.num_key_value_heads == 2
    ids = [1, 5] + [500] * Q + [7]
    grids = torch.tensor([[8, 8]])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=torch.randn(64, 588), piece_grids=grids)
    assert out.logits.shape == (1, len(ids), 500)


def test_build_from_pretrained_parts_names_a_bad_folder(tmp_path) -> None:
    _tiny_parts(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere"):
        build_from_pretrained_parts(tmp_path / "nowhere", tmp_path / "llm", TINY)


def test_processor_and_model_save_and_load_together(bpe_tokenizer, tmp_path) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    from llava_uhd.auto import load_pretrained, save_pretrained
    from llava_uhd.processing import LlavaUHDProcessor

    tokenizer = bpe_tokenizer.__class__.from_pretrained(_saved(bpe_tokenizer, tmp_path / "tok"))
    processor = LlavaUHDProcessor(tokenizer, TINY, padding_side="left")
    text = {**TINY.text.config, "vocab_size": processor.image_token_id}  # <image> stays out of the vocab
    config = LlavaUHDConfig.from_preset(
        TINY.with_overrides(text={"config": text}), image_token_id=processor.image_token_id
    )
    torch.manual_seed(0)
    model = LlavaUHDForConditionalGeneration(config).eval()
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (90, 120), (20, 20, 220))]
    batch = processor(["<image> What is it?", "Two: <image> and"], [[images[0]], [images[1]]])
    assert batch["piece_grids"].shape[0] > 2  # the first image is sliced
    with torch.no_grad():
        expected = model(**batch).logits
    save_pretrained(tmp_path / "saved", model, processor)
    loaded, loaded_processor = load_pretrained(tmp_path / "saved")
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "saved"), LlavaUHDProcessor)
    again = loaded_processor(["<image> What is it?", "Two: <image> and"], [[images[0]], [images[1]]])
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, expected, rtol=0, atol=0)
    out = loaded.generate(**again, max_new_tokens=3, num_beams=3, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def _saved(tokenizer, folder) -> str:
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture
def saved_tiny(tiny_model, tmp_path):
    """The tiny model saved alone (config.json + model.safetensors), and its config as a dict."""
    folder = tmp_path / "saved"
    tiny_model.save_pretrained(folder)
    return folder, json.loads((folder / "config.json").read_text())


def _write_config(folder, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))


def test_a_damaged_config_is_refused_before_any_weight_is_allocated(saved_tiny) -> None:
    from llava_uhd.auto import load_pretrained

    folder, _ = saved_tiny
    # Built, this config would be the full-size default model (a ViT-L and a 7B Llama).
    _write_config(folder, {"model_type": "llava_uhd", "nonsense": 1})
    with pytest.raises(CheckpointError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert message == (
        f"{folder}: config.json lacks the section(s) ['vision', 'resampler', 'slicing', 'text', 'text_config']"
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda c: {**c, "nonsense": 1}, "config.json has unknown key(s) ['nonsense']"),
        (lambda c: {**c, "vision": {**c["vision"], "bogus": 1}}, "preset.vision: unknown field(s) ['bogus']"),
        (lambda c: {**c, "model_type": "llama"}, "config.json model_type is 'llama', not 'llava_uhd'"),
        (
            lambda c: {**c, "text_config": {**c["text_config"], "model_type": "nope"}},
            "text_config has model_type 'nope', which transformers does not know",
        ),
    ],
    ids=["unknown-key", "unknown-section-field", "other-model", "unknown-text-model"],
)
def test_config_keys_and_sections_are_checked(saved_tiny, change, problem) -> None:
    from llava_uhd.auto import load_pretrained

    folder, config = saved_tiny
    _write_config(folder, change(config))
    with pytest.raises(CheckpointError, match=re.escape(problem)) as info:
        load_pretrained(folder)
    assert str(info.value).startswith(f"{folder}: ")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda c: {**c, "text_config": {**c["text_config"], "vocab_size": 64000}},
            "2 of another shape: language_model.lm_head.weight [32000, 64] (config: [64000, 64]), "
            "language_model.model.embed_tokens.weight [32000, 64] (config: [64000, 64])",
        ),
        (
            lambda c: {**c, "resampler": {**c["resampler"], "num_queries": 9}},
            "resampler.query [16, 64] (config: [9, 64])",
        ),
        (
            lambda c: {**c, "vision": {**c["vision"], "image_size": 224}},
            "vision_tower.pos_embed [65, 32] (config: [257, 32])",
        ),
        (
            lambda c: {**c, "text_config": {**c["text_config"], "num_hidden_layers": 40}},
            "it gives the language_model 40 layers, the weights hold 2",
        ),
        (  # refused from the headers: building 10^6 layers, even on the meta device, would take hours
            lambda c: {**c, "text_config": {**c["text_config"], "num_hidden_layers": 1_000_000}},
            "it gives the language_model 1000000 layers, the weights hold 2",
        ),
        (
            lambda c: {**c, "vision": {**c["vision"], "num_layers": 5}},
            "it gives the vision_tower 5 layers, the weights hold 2",
        ),
        (
            lambda c: {**c, "vision": {**c["vision"], "num_layers": 1}},
            "unexpected: vision_tower.blocks.1.",
        ),
    ],
    ids=[
        "lm-embed",
        "resampler-query",
        "vision-pos-embed",
        "more-lm-layers",
        "absurd-lm-layers",
        "more-vit-layers",
        "fewer-vit-layers",
    ],
)
def test_a_config_whose_sizes_disagree_with_the_weights_is_refused(saved_tiny, change, problem) -> None:
    from llava_uhd.auto import load_pretrained

    folder, config = saved_tiny
    _write_config(folder, change(config))
    with pytest.raises(CheckpointError, match=re.escape(problem)) as info:
        load_pretrained(folder)
    assert str(info.value).startswith(f"{folder}: the weights do not fit config.json: ")
    assert "\n" not in str(info.value)


def test_a_good_folder_passes_the_check_sharded_or_not(tiny_model, saved_tiny, tmp_path) -> None:
    from llava_uhd.auto import check_model_folder

    folder, config = saved_tiny
    assert check_model_folder(folder).to_dict() == LlavaUHDConfig.from_pretrained(folder).to_dict()
    sharded = tmp_path / "sharded"
    tiny_model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (
        sharded / "model.safetensors"
    ).exists()
    check_model_folder(sharded)
    _write_config(sharded, {**config, "resampler": {**config["resampler"], "num_queries": 9}})
    with pytest.raises(CheckpointError, match=re.escape("resampler.query [16, 64] (config: [9, 64])")):
        check_model_folder(sharded)


def test_a_tied_head_is_expected_once(tmp_path) -> None:
    from llava_uhd.auto import check_model_folder

    text = {**TINY.text.config, "tie_word_embeddings": True}
    model = LlavaUHDForConditionalGeneration(
        LlavaUHDConfig.from_preset(TINY.with_overrides(text={"config": text}))
    )
    model.save_pretrained(tmp_path)
    check_model_folder(tmp_path)


def test_a_folder_without_safetensors_weights_is_refused(saved_tiny) -> None:
    from llava_uhd.auto import check_model_folder

    folder, _ = saved_tiny
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: no model.safetensors")):
        check_model_folder(folder)
