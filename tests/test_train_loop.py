"""The loop end to end on the tiny model: stage 1 -> stage 2 (from stage 1's resampler) -> load for inference;
metrics and eval loss in the log; gradient accumulation equals a bigger micro-batch; the token-normalised loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_uhd.train import parallel
from llava_uhd.train.config import TrainConfig
from llava_uhd.train.entry import run_training
from llava_uhd.train.loop import IGNORE_INDEX, token_loss_sum

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug-cpu.yaml"


def _config(out: Path, *overrides: str) -> TrainConfig:
    return TrainConfig.load(DEBUG, [f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    run_training(_config(out))
    return out


def test_stage1_logs_metrics_and_eval_and_checkpoints(stage1: Path) -> None:
    records = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # 16 samples / global batch 4
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and r["skipped"] == 0 for r in train)
    assert train[-1]["lr"] == 0.0  # cosine ends at zero
    assert any("eval_loss" in r for r in records)
    saved = load_file(str(stage1 / "checkpoints" / "step-000004" / "model.safetensors"))
    assert saved and all(name.startswith("resampler.") for name in saved)


def test_stage2_starts_from_stage1_resampler_and_loads_for_inference(stage1: Path, tmp_path: Path) -> None:
    from llava_uhd.auto import load_pretrained
    from llava_uhd.inference.generate import answer
    from llava_uhd.synth.scenes import make_scene, render_scene

    stage1_resampler = load_file(str(stage1 / "checkpoints" / "step-000004" / "model.safetensors"))
    config = _config(
        tmp_path, "stage=stage2", f"model.init_from={stage1}", "max_steps=2", "data.synthetic_eval_samples=0"
    )
    result = run_training(config)
    assert result.global_step == 2
    model, processor = load_pretrained(tmp_path / "final")
    # stage 2 (warmup step at lr 0, then one update) moved the resampler a little away from stage 1
    for name, before in stage1_resampler.items():
        after = model.state_dict()[name]
        assert not torch.equal(after, before), name
        torch.testing.assert_close(after, before, atol=1e-2, rtol=0)
    # the saved model is the trained one: every trained tensor equals the last checkpoint's
    final_ckpt = load_file(str(tmp_path / "checkpoints" / "step-000002" / "model.safetensors"))
    assert any(n.startswith("language_model.") for n in final_ckpt)
    for name, tensor in final_ckpt.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    import random

    image = render_scene(make_scene(random.Random(0), (224, 160)))
    text = answer(model, processor, image, "What is in the image?", max_new_tokens=3)
    assert isinstance(text, str)


def test_accumulation_matches_a_bigger_micro_batch(stage1: Path, tmp_path: Path) -> None:
    common = ["max_steps=2", "data.synthetic_eval_samples=0", "save_every=0"]
    run_training(_config(tmp_path / "m1", "micro_batch_size=1", *common))
    run_training(_config(tmp_path / "m4", "micro_batch_size=4", *common))
    a = load_file(str(tmp_path / "m1" / "checkpoints" / "step-000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "m4" / "checkpoints" / "step-000002" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_token_loss_sum_matches_the_mean_loss_times_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, 1, 2, IGNORE_INDEX, 3], [4, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    )
    total, count = token_loss_sum(logits, labels)
    assert int(count) == 4  # shifted labels: 1, 2, 3 and 5
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(total / count, mean)


@pytest.mark.parametrize("engine", [parallel.DDPEngine, parallel.FSDPEngine, parallel.DeepSpeedEngine])
def test_every_engine_implements_the_whole_interface(engine: type[parallel.Engine]) -> None:
    assert issubclass(engine, parallel.Engine) and not engine.__abstractmethods__
