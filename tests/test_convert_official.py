"""Converting the released checkpoint layout: a tiny CLIP + tiny Llama + windowed resampler written under the
released names (sharded safetensors, sharded and single .bin), converted, and compared with a model built
directly from the same weights (identical logits); the report; round trips; clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llava_uhd.config import OFFICIAL_V1, TINY, Preset, VisionConfig
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.convert_official import (
    RESAMPLER_PREFIX,
    VISION_PREFIX,
    convert_released,
    official_preset,
    read_released,
    vision_config,
)

IMAGE_TOKEN_ID = 32000  # the id the processor gives <image> in a 32k Llama vocabulary
TINY_VISION = TINY.vision  # width 32, 2 layers, 4 heads, 112 px, patch 14
TINY_LLAMA = {k: v for k, v in TINY.text.config.items() if k != "model_type"}


def tiny_parts(seed: int = 0):
    """A tiny HF CLIP vision tower, a tiny Llama and a windowed resampler, all with random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava_uhd.model.resamplers import build_resampler

    torch.manual_seed(seed)
    clip_config = CLIPVisionConfig(
        hidden_size=TINY_VISION.hidden_size,
        intermediate_size=TINY_VISION.intermediate_size,
        num_hidden_layers=TINY_VISION.num_layers,
        num_attention_heads=TINY_VISION.num_heads,
        image_size=TINY_VISION.image_size,
        patch_size=TINY_VISION.patch_size,
        hidden_act="quick_gelu",
    )
    clip = CLIPVisionModel(clip_config).eval()
    llama_config = LlamaConfig(**TINY_LLAMA)
    llama = LlamaForCausalLM(llama_config).eval()
    resampler = build_resampler(OFFICIAL_V1.resampler, TINY_VISION.hidden_size, llama_config.hidden_size)
    with torch.no_grad():  # move every tensor away from its init so a mix-up cannot go unnoticed
        for module in (clip, llama, resampler):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return clip, llama, resampler


def _released_state(clip, llama, resampler) -> dict[str, torch.Tensor]:
    state = {f"{VISION_PREFIX}{k}": v for k, v in clip.state_dict().items()}
    # transformers 4 saved CLIP's position_ids buffer; old LLaMA checkpoints saved rotary inv_freq per layer
    state[f"{VISION_PREFIX}embeddings.position_ids"] = torch.arange(65)[None]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state.update({f"{RESAMPLER_PREFIX}{k}": v for k, v in resampler.state_dict().items()})
    state.update(llama.state_dict())  # model.embed_tokens, model.layers.*, model.norm, lm_head
    return {k: v.contiguous() for k, v in state.items()}


def _released_config(llama, clip_folder: Path | str) -> dict:
    """A LlavaLlama config.json, as LLaVA writes it: the LLaMA's fields plus mm_* fields."""
    config = llama.config.to_dict()
    config.update(
        {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava_llama",
            "torch_dtype": "float32",
            "mm_vision_tower": str(clip_folder),
            "mm_hidden_size": TINY_VISION.hidden_size,
            "mm_projector_type": "adapt_spatial_resampler",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "use_mm_proj": True,
            "image_aspect_ratio": "pad",
            "tokenizer_model_max_length": 2048,
        }
    )
    return config


def write_released(folder: Path, parts, fmt: str, tokenizer_dir: Path | None = None) -> Path:
    """Write a released-layout checkpoint: config.json, weights in ``fmt``, optionally the tokenizer."""
    from safetensors.torch import save_file

    clip, llama, resampler = parts
    folder.mkdir(parents=True)
    clip_folder = folder / "clip"
    clip.config.save_pretrained(clip_folder)
    (folder / "config.json").write_text(json.dumps(_released_config(llama, clip_folder)))
    state = _released_state(clip, llama, resampler)
    keys = sorted(state)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:  # two shards and an index, as save_pretrained writes large checkpoints
        ext = "safetensors" if fmt == "safetensors-sharded" else "bin"
        stem = "model" if ext == "safetensors" else "pytorch_model"
        halves = {f"{stem}-0000{i + 1}-of-00002.{ext}": keys[i::2] for i in range(2)}
        for name, names in halves.items():
            shard = {k: state[k] for k in names}
            save_file(shard, str(folder / name)) if ext == "safetensors" else torch.save(shard, folder / name)
        index = {"metadata": {}, "weight_map": {k: name for name, names in halves.items() for k in names}}
        index_name = (
            "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        )
        (folder / index_name).write_text(json.dumps(index))
    if tokenizer_dir is not None:
        from transformers import LlamaTokenizer

        LlamaTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def _direct_model(parts):
    """Our model built directly from the same component weights, without the converter."""
    from llava_uhd.model.configuration import LlavaUHDConfig
    from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
    from llava_uhd.model.weights import load_clip_vision

    clip, llama, resampler = parts
    preset = replace(OFFICIAL_V1, vision=TINY_VISION, slicing=TINY.slicing, text=TINY.text)
    model = LlavaUHDForConditionalGeneration(
        LlavaUHDConfig.from_preset(preset, image_token_id=IMAGE_TOKEN_ID)
    )
    load_clip_vision(model.vision_tower, clip.state_dict())
    model.resampler.load_state_dict(resampler.state_dict())
    model.language_model.load_state_dict(llama.state_dict())
    return model.eval()


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two pieces (a 6x10 slice and an 8x8 overview), each 144 placeholders, between text tokens."""
    generator = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[6, 10], [8, 8]])
    patches = int((grids[:, 0] * grids[:, 1]).sum())
    pixel_values = torch.randn(patches, 3 * 14 * 14, generator=generator)
    text = torch.randint(3, 32000, (9,), generator=generator)
    image = torch.full((2 * 144,), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:4], image[:144], text[4:5], image[144:], text[5:]])[None]
    return {"input_ids": input_ids, "pixel_values": pixel_values, "piece_grids": grids}


@pytest.fixture(scope="module")
def direct_logits(parts):
    with torch.no_grad():
        return _direct_model(parts)(**_inputs()).logits


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin-sharded", "bin"])
def test_converted_model_gives_identical_logits(tmp_path, parts, direct_logits, fmt):
    from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration

    source = write_released(tmp_path / "released", parts, fmt)
    preset, report = convert_released(source, tmp_path / "ours", image_token_id=IMAGE_TOKEN_ID)
    assert preset.resampler == OFFICIAL_V1.resampler and preset.slicing.max_slices == 7
    model = LlavaUHDForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    assert model.config.to_preset() == preset
    with torch.no_grad():
        logits = model(**_inputs()).logits
    assert torch.equal(logits, direct_logits)


def test_report_accounts_for_every_tensor(tmp_path, parts):
    source = write_released(tmp_path / "released", parts, "safetensors-sharded")
    state = read_released(source).state_dict
    _, report = convert_released(source, tmp_path / "ours", image_token_id=IMAGE_TOKEN_ID)
    assert set(report.mapped) | set(report.ignored) == set(state)
    assert report.missing == () and report.unexpected == ()
    assert sorted(report.ignored) == sorted(
        [
            f"{VISION_PREFIX}embeddings.position_ids",
            f"{VISION_PREFIX}post_layernorm.bias",
            f"{VISION_PREFIX}post_layernorm.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
        ]
    )
    assert report.mapped[f"{RESAMPLER_PREFIX}attn.in_proj_weight"] == "resampler.attn.in_proj_weight"
    assert (
        report.mapped[f"{VISION_PREFIX}encoder.layers.1.mlp.fc2.bias"] == "vision_tower.blocks.1.mlp.fc2.bias"
    )
    assert report.mapped["lm_head.weight"] == "language_model.lm_head.weight"
    assert (
        report.mapped["model.layers.1.mlp.up_proj.weight"]
        == "language_model.model.layers.1.mlp.up_proj.weight"
    )


def test_round_trip_save_load_is_exact(tmp_path, parts):
    """released -> ours -> from_pretrained -> save_pretrained -> from_pretrained keeps every tensor."""
    from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration

    source = write_released(tmp_path / "released", parts, "bin")
    convert_released(source, tmp_path / "a", image_token_id=IMAGE_TOKEN_ID)
    first = LlavaUHDForConditionalGeneration.from_pretrained(str(tmp_path / "a"))
    first.save_pretrained(str(tmp_path / "b"))
    second = LlavaUHDForConditionalGeneration.from_pretrained(str(tmp_path / "b"))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    released = read_released(source).state_dict
    assert torch.equal(
        a["resampler.pos_embed"], released[f"{RESAMPLER_PREFIX}pos_embed"]
    )  # loaded, not recomputed
    assert torch.equal(a["language_model.lm_head.weight"], released["lm_head.weight"])


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: no such checkpoint folder"):
        read_released(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: no config.json"):
        read_released(tmp_path / "empty")


def test_missing_and_unexpected_keys_are_errors(tmp_path, parts):
    from safetensors.torch import load_file, save_file

    source = write_released(tmp_path / "released", parts, "bin")
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    del state[f"{RESAMPLER_PREFIX}proj"]
    state["model.mm_projector.extra_gate"] = torch.zeros(3)
    (source / "pytorch_model.bin").unlink()
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"missing \['resampler.proj'\]; unexpected \['model.mm_projector.extra_gate'\]"
    ):
        convert_released(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure

    restored = load_file(str(source / "model.safetensors"))
    restored[f"{RESAMPLER_PREFIX}proj"] = parts[2].proj.detach().clone()
    save_file(restored, str(source / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"unexpected \['model.mm_projector.extra_gate'\].*--allow-unexpected"
    ):
        convert_released(source, tmp_path / "out")
    _, report = convert_released(source, tmp_path / "out", allow_unexpected=True)
    assert report.unexpected == ("model.mm_projector.extra_gate",)


def test_wrong_shape_is_an_error(tmp_path, parts):
    from safetensors.torch import save_file

    source = write_released(tmp_path / "released", parts, "bin")
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    state[f"{RESAMPLER_PREFIX}query"] = torch.zeros(64, 64)  # the paper's 64 queries, not 144
    (source / "pytorch_model.bin").unlink()
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"model.mm_projector.query \(64, 64\) -> resampler.query \(144, 64\)"
    ):
        convert_released(source, tmp_path / "out")


def test_preset_and_configs(tmp_path, parts):
    clip, llama, resampler = parts
    source = write_released(tmp_path / "released", parts, "bin")
    checkpoint = read_released(source)
    preset = official_preset(checkpoint)
    assert isinstance(preset, Preset) and preset.name == "official-v1" and preset.template == "vicuna_v1"
    assert preset.vision == replace(TINY_VISION, feature_layer=-2)
    assert preset.slicing == replace(OFFICIAL_V1.slicing, scale_resolution=112)
    text = preset.text.config
    assert text["model_type"] == "llama" and preset.text.name_or_path is None
    assert {k: text[k] for k in TINY_LLAMA} == TINY_LLAMA  # every LLaMA field of config.json, as written
    assert not any(k.startswith(("mm_", "tokenizer_", "architectures", "image_")) for k in text)

    # Without a local CLIP folder the shapes come from the weights (64 channels a head, as CLIP-L's 1024/16).
    released = dict(checkpoint.config, mm_vision_tower="openai/clip-vit-large-patch14-336")
    inferred = vision_config(released, checkpoint.state_dict)
    assert inferred == VisionConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=1, image_size=112, patch_size=14
    )

    # An explicit --vision-tower folder wins over the weights' guess (heads cannot be read off weights).
    assert vision_config(released, checkpoint.state_dict, source / "clip") == preset.vision
    with pytest.raises(CheckpointError, match="no config.json; --vision-tower wants a CLIP vision folder"):
        vision_config(released, checkpoint.state_dict, tmp_path)

    bad = replace(checkpoint, config=dict(checkpoint.config, mm_projector_type="mlp2x_gelu"))
    with pytest.raises(ConfigError, match=r"mm_projector_type is 'mlp2x_gelu'"):
        official_preset(bad)
    bad = replace(checkpoint, config=dict(checkpoint.config, model_type="llava_qwen"))
    with pytest.raises(ConfigError, match=r"model_type 'llava_qwen'"):
        official_preset(bad)
