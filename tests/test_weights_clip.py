"""Loading Hugging Face CLIP vision checkpoints: key map, folders (safetensors, sharded, .bin), reports, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipConfig

from llava_uhd.config import TINY
from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.vision import VisionTransformer
from llava_uhd.model.weights import (
    clip_vision_key_map,
    find_vision_prefix,
    load_by_key_map,
    load_clip_vision,
    read_state_dict,
    vision_config_from_hf,
    vision_transformer_from_pretrained,
)

PATCH = 14
TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": PATCH,
}
PARAMS_PER_LAYER = 16  # 2 layer norms + 4 attention projections + 2 MLP linears, weight and bias each


@pytest.fixture(scope="module")
def hf_clip() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**TOWER, attn_implementation="eager")).eval()


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    grids = torch.tensor([[h // PATCH, w // PATCH]] * b)
    with torch.no_grad():
        return model(patches.reshape(-1, c * PATCH * PATCH), grids)


def _expected(hf: CLIPVisionModel, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf(images, output_hidden_states=True).hidden_states[-2]
    return hidden[:, 1:].reshape(-1, hidden.shape[-1])


def test_key_map_is_explicit_and_complete(hf_clip):
    config = vision_config_from_hf(hf_clip.config)
    key_map = clip_vision_key_map(config, source_prefix="vision_model.")
    assert len(key_map) == 5 + PARAMS_PER_LAYER * config.num_layers
    assert key_map["vision_model.embeddings.class_embedding"] == "cls_token"
    assert key_map["vision_model.pre_layrnorm.bias"] == "pre_norm.bias"
    assert (
        key_map["vision_model.encoder.layers.1.self_attn.out_proj.weight"] == "blocks.1.attn.out_proj.weight"
    )
    assert sorted(key_map.values()) == sorted(VisionTransformer(config).state_dict())
    # every tensor of the HF tower except the unused post-layernorm is a source of the map
    assert set(clip_vision_key_map(config)) == {
        k for k in hf_clip.state_dict() if not k.startswith("post_layernorm")
    }


def test_state_dict_load_reports_every_tensor(hf_clip):
    model = VisionTransformer(vision_config_from_hf(hf_clip.config)).eval()
    report = load_clip_vision(model, hf_clip.state_dict())
    assert report.complete and report.missing == () and report.unexpected == ()
    assert report.ignored == ("post_layernorm.weight", "post_layernorm.bias")
    assert len(report.mapped) == 5 + PARAMS_PER_LAYER * 2
    assert torch.equal(model.blocks[1].mlp.fc2.bias, hf_clip.encoder.layers[1].mlp.fc2.bias)
    images = torch.randn(2, 3, 56, 56)
    assert (_features(model, images) - _expected(hf_clip, images)).abs().max() <= 1e-5


def test_saved_folder_round_trips(hf_clip, tmp_path):
    hf_clip.save_pretrained(tmp_path)
    model, report = vision_transformer_from_pretrained(tmp_path)
    assert report.complete
    assert model.config == vision_config_from_hf(hf_clip.config)
    images = torch.randn(1, 3, 56, 56)
    assert (_features(model.eval(), images) - _expected(hf_clip, images)).abs().max() <= 1e-5


def test_sharded_safetensors_and_torch_bin_folders(hf_clip, tmp_path):
    hf_clip.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    expected = hf_clip.state_dict()
    sharded = read_state_dict(tmp_path / "sharded")
    assert sharded.keys() == expected.keys()
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save({f"vision_model.{k}": v for k, v in expected.items()}, bin_folder / "pytorch_model.bin")
    from_bin = read_state_dict(bin_folder)
    assert all(torch.equal(from_bin[f"vision_model.{k}"], v) for k, v in expected.items())
    model = VisionTransformer(vision_config_from_hf(hf_clip.config))
    assert load_clip_vision(model, bin_folder / "pytorch_model.bin").complete


def test_full_clip_checkpoint_ignores_the_text_tower():
    torch.manual_seed(0)
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 99,
    }
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=TOWER, projection_dim=16)).eval()
    config = vision_config_from_hf(clip.config)  # a full CLIPConfig is read through its vision_config
    assert config.num_layers == 2 and config.image_size == 56
    state = clip.state_dict()
    assert find_vision_prefix(state) == "vision_model."
    model = VisionTransformer(config).eval()
    report = load_clip_vision(model, state)
    assert report.complete
    assert "logit_scale" in report.ignored and "text_projection.weight" in report.ignored
    assert any(k.startswith("text_model.") for k in report.ignored)
    assert "vision_model.post_layernorm.weight" in report.ignored
    images = torch.randn(1, 3, 56, 56)
    assert (_features(model, images) - _expected(clip.vision_model, images)).abs().max() <= 1e-5


def test_missing_and_unexpected_keys_are_named(hf_clip):
    model = VisionTransformer(vision_config_from_hf(hf_clip.config))
    state = dict(hf_clip.state_dict())
    del state["encoder.layers.1.mlp.fc1.bias"]
    state["encoder.layers.1.mlp.fc3.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"missing \['blocks.1.mlp.fc1.bias'\]; unexpected \['encoder.layers.1.mlp.fc3.weight'\]",
    ):
        load_clip_vision(model, state)
    report = load_clip_vision(model, state, strict=False)
    assert report.missing == ("blocks.1.mlp.fc1.bias",)
    assert report.unexpected == ("encoder.layers.1.mlp.fc3.weight",)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, hf_clip.encoder.layers[0].mlp.fc1.weight)


def test_shape_mismatch_names_both_shapes(hf_clip):
    bigger = VisionTransformer(vision_config_from_hf(CLIPVisionConfig(**{**TOWER, "image_size": 112})))
    with pytest.raises(
        CheckpointError,
        match=r"position_embedding.weight has shape \(17, 32\) but pos_embed needs \(65, 32\)",
    ):
        load_clip_vision(bigger, hf_clip.state_dict())


def test_deeper_checkpoint_is_unexpected(hf_clip):
    shallow = VisionTransformer(vision_config_from_hf(CLIPVisionConfig(**{**TOWER, "num_hidden_layers": 1})))
    with pytest.raises(CheckpointError, match=r"0 missing, 16 unexpected") as info:
        load_clip_vision(shallow, hf_clip.state_dict())
    assert "'encoder.layers.1.layer_norm1.weight'" in str(info.value)


def test_generic_loader_checks_its_map():
    model = VisionTransformer(TINY.vision)
    with pytest.raises(CheckpointError, match=r"targets \['nope'\] are not parameters of VisionTransformer"):
        load_by_key_map(model, {}, {"a": "nope"})


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file or folder"):
        read_state_dict(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*files: \['notes.txt'\]"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        vision_transformer_from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.txt'"):
        read_state_dict(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="cannot find one vision tower.*none"):
        find_vision_prefix(["text_model.embeddings.token_embedding.weight"])


def test_vision_config_from_siglip_and_unknown():
    siglip = vision_config_from_hf(SiglipConfig(vision_config={**TOWER, "hidden_act": "gelu_pytorch_tanh"}))
    assert (siglip.use_cls_token, siglip.use_pre_layernorm, siglip.patch_bias) == (False, False, True)
    assert siglip.hidden_act == "gelu_pytorch_tanh" and siglip.layer_norm_eps == 1e-6
    clip = vision_config_from_hf(CLIPVisionConfig(**TOWER), feature_layer=-1)
    assert (clip.use_cls_token, clip.patch_bias, clip.hidden_act, clip.feature_layer) == (
        True,
        False,
        "quick_gelu",
        -1,
    )
    with pytest.raises(ConfigError, match="got model_type 'bert'"):
        vision_config_from_hf(type("BertLike", (), {"model_type": "bert"})())
