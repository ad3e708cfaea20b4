"""Stages as data: the exact trainable parameter set of each stage on the tiny model, optimiser groups by
rule, the schedule's values, and the training config (YAML, overrides, every shipped file)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llava_uhd.config import TINY
from llava_uhd.errors import ConfigError
from llava_uhd.train.config import TrainConfig, apply_overrides
from llava_uhd.train.optim import build_optimizer, build_scheduler, decays, parameter_groups, warmup_steps
from llava_uhd.train.stages import STAGES, apply_stage, get_stage
from test_resampler_windowed import RESAMPLER_PARAMETERS

ROOT = Path(__file__).resolve().parents[1]

# The resampler's parameters (docs/design.md section 5; names follow the released checkpoint).
RESAMPLER = {f"resampler.{n}" for n in RESAMPLER_PARAMETERS}
_LAYER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
# The tiny preset's 2-layer Llama, untied head.
LANGUAGE = {f"language_model.model.layers.{i}.{n}" for i in range(2) for n in _LAYER} | {
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
}


@pytest.fixture()
def model():
    from llava_uhd.model import LlavaUHDConfig, LlavaUHDForConditionalGeneration

    torch.manual_seed(0)
    return LlavaUHDForConditionalGeneration(LlavaUHDConfig.from_preset(TINY, image_token_id=5))


def test_stage1_trains_exactly_the_resampler(model) -> None:
    assert set(apply_stage(model, get_stage("stage1"))) == RESAMPLER


def test_stage2_trains_exactly_resampler_and_llm(model) -> None:
    names = set(apply_stage(model, get_stage("stage2")))
    assert names == RESAMPLER | LANGUAGE
    assert len(LANGUAGE) == 21


def test_train_vit_adds_exactly_the_vision_tower(model) -> None:
    names = set(apply_stage(model, get_stage("stage2"), train_vit=True))
    vision = {n for n in names if n.startswith("vision_tower.")}
    assert names - vision == RESAMPLER | LANGUAGE
    assert vision == {n for n, _ in model.vision_tower.named_parameters(prefix="vision_tower")}
    assert len(vision) > 0


def test_lora_trains_only_adapters_inside_the_llm(model) -> None:
    from peft import LoraConfig, get_peft_model

    model.language_model = get_peft_model(
        model.language_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    names = set(apply_stage(model, get_stage("stage2"), lora=True))
    llm = {n for n in names if n.startswith("language_model.")}
    assert names - llm == RESAMPLER
    # 2 layers x (q, v) x (A, B)
    assert len(llm) == 8 and all(".lora_A." in n or ".lora_B." in n for n in llm)


def test_stage_recipes_match_the_paper() -> None:
    s1, s2 = STAGES["stage1"], STAGES["stage2"]
    assert (s1.lr, s1.global_batch_size, s1.pieces, s1.template) == (1e-3, 256, "overview", "plain")
    assert (s2.lr, s2.global_batch_size, s2.pieces) == (2e-5, 128, "all")
    with pytest.raises(ConfigError, match="unknown training stage 'stage3'"):
        get_stage("stage3")


def test_no_weight_decay_on_norms_biases_queries_and_position_tables(model) -> None:
    apply_stage(model, get_stage("stage2"), train_vit=True)
    groups = {g["weight_decay"]: set(g["names"]) for g in parameter_groups(model, weight_decay=0.1)}
    no_decay = groups[0.0]
    assert {
        "resampler.query",
        "resampler.pos_embed",
        "resampler.attn.in_proj_bias",
        "resampler.ln_q.weight",
        "language_model.model.norm.weight",
    } <= no_decay
    assert {
        "resampler.kv_proj.weight",
        "resampler.proj",
        "resampler.attn.in_proj_weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
    } <= groups[0.1]
    assert not any("position" in n or "pos_embed" in n or "class_embedding" in n for n in groups[0.1])
    assert no_decay.isdisjoint(groups[0.1])
    assert no_decay | groups[0.1] == {n for n, p in model.named_parameters() if p.requires_grad}


def test_decay_rule_on_single_names() -> None:
    matrix, vector = torch.zeros(2, 2), torch.zeros(2)
    assert decays("a.fc.weight", matrix)
    assert not decays("a.fc.bias", vector)
    assert not decays("vision_tower.embeddings.position_embedding.weight", matrix)
    assert not decays("resampler.query", matrix)


def test_cosine_schedule_with_three_percent_warmup() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    module = torch.nn.Module()
    module.w = param
    optimizer = build_optimizer(module, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    total = 100
    assert warmup_steps(total, 0.03) == 3
    scheduler = build_scheduler(optimizer, "cosine", total, 0.03)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    step = 50
    assert lrs[step] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 3) / (total - 3))))


def test_config_resolves_stage_defaults_and_overrides() -> None:
    config = TrainConfig(stage="stage2", output_dir="out").resolved()
    assert (config.optim.lr, config.global_batch_size) == (2e-5, 128)
    data = apply_overrides(
        {"stage": "stage1", "output_dir": "o"},
        ["optim.lr=1e-4", "data.synthetic_samples=8", "micro_batch_size=4"],
    )
    config = TrainConfig.from_dict(data).resolved()
    assert (config.optim.lr, config.data.synthetic_samples, config.micro_batch_size) == (1e-4, 8, 4)
    assert config.accumulation_steps(world_size=2) == 256 // (4 * 2)
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"stage": "stage1", "output_dir": "o", "epochs": 0}, "epochs must be >= 1, got 0"),
        (
            {"stage": "stage1", "output_dir": "o", "optim": {"lr": "fast"}},
            "optim.lr must be a number, got 'fast'",
        ),
        ({"stage": "stage1", "output_dir": "o", "lr": 1}, r"unknown field\(s\) \['lr'\]"),
        ({"stage": "stage1", "output_dir": "o", "backend": "deepspeed"}, "needs deepspeed_config"),
    ],
)
def test_bad_configs_name_the_value(bad, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(bad)


def test_override_syntax_error() -> None:
    with pytest.raises(ConfigError, match="--set expects key=value, got 'optim.lr'"):
        apply_overrides({}, ["optim.lr"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = TrainConfig.load(path).resolved()
    stage = get_stage(config.stage)
    assert config.optim.lr == stage.lr and config.global_batch_size is not None
    if config.deepspeed_config is not None:
        assert (ROOT / config.deepspeed_config).is_file()
