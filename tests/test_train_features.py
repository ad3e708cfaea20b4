"""Training options end to end on the tiny model: activation checkpointing, bf16 autocast, LoRA.

* Checkpointing recomputes every ViT block and LLM layer in the backward pass and gives the gradients of the
  plain pass (float32: the recomputation repeats the same kernels on the same inputs).
* bf16 autocast on CPU trains; its first loss (before any update) differs from float32's only by bf16
  rounding of the matmuls: measured 3e-6 relative on the tiny model (random init: near-uniform logits),
  asserted at a loose ``BF16_LOSS_RTOL`` = 1e-3, and asserted to differ at all (autocast did run).
* LoRA in stage 2 trains the resampler and the adapters only; the final folder holds the merged plain model,
  which loads through the inference API and reproduces the adapter model's logits. Adapters on anything but
  a Linear layer are refused. (LoRA on FSDP and DeepSpeed: tests/test_distributed.py.)
* The idle piece that sharded backends add to text-only micro-batches runs the vision path and changes
  neither the loss nor any gradient: the resampler gets exact zeros.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llava_uhd.errors import ConfigError
from llava_uhd.train.config import TrainConfig
from llava_uhd.train.entry import FINAL_DIR, build_data, run_training
from llava_uhd.train.idle_piece import IdlePiece
from llava_uhd.train.loop import MODEL_INPUTS, token_loss_sum
from llava_uhd.train.setup import build_model, build_processor, prepare_model
from llava_uhd.train.stages import LANGUAGE, RESAMPLER, VISION, get_stage

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug-cpu.yaml"
GRAD_ATOL = 1e-6
BF16_LOSS_RTOL = 1e-3  # loose: bf16 keeps 8 mantissa bits (~4e-3 relative per value); the loss averages them
LOGITS_ATOL = 1e-5  # merged W + s*B@A versus the adapter path W x + s*B(A x): float32 reassociation only
LORA_RANK = 4
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # LoraConfig's default target_modules


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """peft's own in-place merge of the LLM's adapters: the reference the final save's state-dict fold
    (llava_uhd.train.lora.merge_lora_state) must agree with."""
    setattr(model, LANGUAGE, getattr(model, LANGUAGE).merge_and_unload())
    return model


def _config(out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(DEBUG, [f"output_dir={out}", "data.synthetic_eval_samples=0", *overrides])


def _model_and_batch(config: TrainConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The stage's prepared model and a collated batch of two samples from the run's synthetic data."""
    config = config.resolved()
    stage = get_stage(config.stage)
    processor = build_processor(config)
    model = build_model(config, processor)
    prepare_model(model, config, stage)
    data = build_data(config, stage, processor, rank=0)
    return model, data.collate([data.dataset[i] for i in range(2)])


def _initial_model(config: TrainConfig) -> torch.nn.Module:
    """The run's model as initialised (``build_model`` seeds the random init with ``config.seed``)."""
    config = config.resolved()
    return build_model(config, build_processor(config))


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _gradients(config: TrainConfig) -> tuple[dict[str, torch.Tensor | None], list[str]]:
    """Gradients of the summed token loss, and the attention modules called, in call order."""
    model, batch = _model_and_batch(config)
    model.train()
    calls: list[str] = []
    for name, module in model.named_modules():
        # a pre-hook on the attention *inside* each layer sees the recomputation too (transformers
        # checkpoints a layer's forward, not its __call__, so hooks on the layer itself fire once)
        if name.endswith((".self_attn", ".attn")) and not name.startswith(RESAMPLER):
            module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    loss, _ = token_loss_sum(model(**_inputs(batch)).logits, batch["labels"])
    loss.backward()
    grads = {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }
    return grads, calls


def test_activation_checkpointing_recomputes_layers_and_keeps_gradients(tmp_path: Path) -> None:
    # stage 2 with the ViT training: checkpointed ViT blocks and LLM layers both lie on the gradient path
    common = ("stage=stage2", "train_vit=true", "data.synthetic_samples=2")
    plain, plain_calls = _gradients(_config(tmp_path, *common))
    checkpointed, calls = _gradients(_config(tmp_path, *common, "gradient_checkpointing=true"))
    layers = sorted(set(plain_calls))
    assert any(n.startswith(f"{VISION}.") for n in layers) and any(
        n.startswith(f"{LANGUAGE}.") for n in layers
    )
    assert sorted(plain_calls) == layers  # without checkpointing each layer runs once
    assert sorted(calls) == sorted(layers * 2)  # with it, once more in the backward pass
    assert sorted(plain) == sorted(checkpointed)
    for name, grad in plain.items():
        other = checkpointed[name]
        assert (grad is None) == (other is None), name  # e.g. ViT blocks after the feature layer never run
        if grad is not None:
            torch.testing.assert_close(other, grad, atol=GRAD_ATOL, rtol=0, msg=name)


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_bf16_autocast_trains_close_to_float32(tmp_path: Path) -> None:
    common = ("max_steps=2", "save_every=0", "data.synthetic_samples=8")
    run_training(_config(tmp_path / "fp32", *common))
    run_training(_config(tmp_path / "bf16", *common, "mixed_precision=bf16"))
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(bf16) == 2 and all(math.isfinite(x) for x in bf16)
    assert bf16[0] != fp32[0]  # autocast really ran the matmuls in bf16
    assert bf16[0] == pytest.approx(fp32[0], rel=BF16_LOSS_RTOL)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, Path]:
    out = tmp_path_factory.mktemp("lora")
    config = _config(out, "stage=stage2", f"lora.r={LORA_RANK}", "max_steps=2", "save_every=0")
    run_training(config)
    return config, out


def _adapter_model(config: TrainConfig, checkpoint: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh model with LoRA and the checkpoint's trained weights loaded in (adapters not merged)."""
    model, batch = _model_and_batch(config)
    trained = load_file(str(checkpoint / "model.safetensors"))
    result = model.load_state_dict(trained, strict=False)
    assert not result.unexpected_keys
    return model.eval(), batch


def test_lora_trains_only_the_resampler_and_adapters(lora_run) -> None:
    config, out = lora_run
    trained = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
    adapters = sorted(n for n in trained if not n.startswith(f"{RESAMPLER}."))
    base = _initial_model(config)
    layers = base.config.text_config.num_hidden_layers
    assert len(adapters) == layers * len(LORA_TARGETS) * 2  # lora_A and lora_B per target per layer
    assert all(n.startswith(f"{LANGUAGE}.") and ".lora_" in n and n.endswith(".weight") for n in adapters)
    # the adapters moved: B starts at zero (peft) and is non-zero after the update
    assert all(trained[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)

    final = load_file(str(out / FINAL_DIR / "model.safetensors"))
    base_state = base.state_dict()
    assert sorted(final) == sorted(base_state)  # a plain LlavaUHD folder: no peft names left
    targets = {n for n in final if n.startswith(f"{LANGUAGE}.") and n.rsplit(".", 2)[-2] in LORA_TARGETS}
    assert len(targets) == layers * len(LORA_TARGETS)
    for name, tensor in final.items():
        if name.startswith(f"{RESAMPLER}.") or name in targets:
            assert not torch.equal(tensor, base_state[name]), f"{name} did not train"
        else:  # ViT and every LLM weight outside the adapters: untouched
            assert torch.equal(tensor, base_state[name]), f"{name} changed"


def test_lora_final_model_loads_for_inference_with_merged_logits(lora_run) -> None:
    from llava_uhd.auto import load_pretrained

    config, out = lora_run
    adapter_model, batch = _adapter_model(config, out / "checkpoints" / "step-000002")
    with torch.no_grad():
        adapter_logits = adapter_model(**_inputs(batch)).logits
        merged = merge_lora(adapter_model)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        merged_logits = merged(**_inputs(batch)).logits
        loaded, processor = load_pretrained(out / FINAL_DIR)
        loaded_logits = loaded(**_inputs(batch)).logits
    assert processor.image_token_id == loaded.config.image_token_id
    torch.testing.assert_close(merged_logits, adapter_logits, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(loaded_logits, merged_logits, atol=0, rtol=0)


def test_lora_on_a_non_linear_layer_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "stage=stage2", "lora.r=2", "lora.target_modules=[embed_tokens]").resolved()
    model = _initial_model(config)
    with pytest.raises(ConfigError, match="only Linear layers"):
        prepare_model(model, config, get_stage(config.stage))


def _text_only_loss_and_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss, _ = token_loss_sum(model(**_inputs(batch)).logits, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_idle_piece_runs_the_vision_path_and_changes_no_gradient(tmp_path: Path) -> None:
    config = _config(tmp_path, "stage=stage2", "data.synthetic_samples=3").resolved()
    stage = get_stage(config.stage)
    processor = build_processor(config)
    model = build_model(config, processor)
    prepare_model(model, config, stage)
    data = build_data(config, stage, processor, rank=0)
    batch = next(b for b in (data.collate([s]) for s in data.dataset) if "pixel_values" not in b)
    calls: list[int] = []
    model.resampler.register_forward_hook(lambda *_: calls.append(1))

    plain_loss, plain = _text_only_loss_and_grads(model, batch)
    assert not calls
    idle_loss, idle = _text_only_loss_and_grads(model, IdlePiece.for_model(model).fill(batch))
    assert calls == [1]  # the vision tower and the resampler ran
    torch.testing.assert_close(idle_loss, plain_loss, atol=GRAD_ATOL, rtol=0)
    for name, grad in idle.items():
        if name.startswith(f"{RESAMPLER}."):
            assert plain[name] is None and grad is not None and not grad.any(), name
        else:
            torch.testing.assert_close(grad, plain[name], atol=GRAD_ATOL, rtol=0, msg=name)
