"""Scale-out: 2-process runs (DDP on gloo, FSDP, DeepSpeed ZeRO-2 and ZeRO-3) follow a 1-process run.

The loop normalises each step's loss by the supervised tokens of the whole global batch (train/loop.py),
so the split over ranks changes only float summation order: losses agree to 1e-5 relative, and the
trained weights (the checkpoint's trainable set and the whole final model) to 1e-5 absolute after 4 steps.
Sharded backends also resume: a 2-process run resumed from its step-2 checkpoint ends bitwise equal to the
uninterrupted one (same world size, same reduction order). One torchrun launch per backend and purpose.

LoRA runs stage 2 (peft adapters on the LLM, the resampler trains fully) on FSDP, ZeRO-2 and ZeRO-3 and
follows the 1-process LoRA run the same way. Stage 2's data mixes in text-only samples: in steps 3-4 some
ranks have no image (they run an idle piece, train/idle_piece.py) and step 3 has none on any rank. Each
final folder is the plain model with the run's own adapters folded in, bit for bit what peft's merge gives,
and optimizer state exists for the adapters and the resampler only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_uhd.train.config import TrainConfig
from llava_uhd.train.entry import build_data
from llava_uhd.train.loop import MODEL_INPUTS
from llava_uhd.train.setup import build_model, build_processor, prepare_model
from llava_uhd.train.stages import get_stage
from test_train_features import merge_lora

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug-cpu.yaml"
COMMON = ["--set", "micro_batch_size=1", "--set", "data.synthetic_eval_samples=0"]
STEPS = 4  # 16 synthetic samples / global batch 4
RESUME_STEP = 2
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
RUN_TIMEOUT_S = 240
# printed by DeepSpeed when it JIT-compiles its shared-memory CPU op (train/parallel.py skips it)
DEEPSPEED_BUILD_LINE = "built successfully"

pytestmark = pytest.mark.distributed
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


@dataclass
class Run:
    out: Path
    losses: dict[int, float]  # step -> loss, as logged by rank 0
    trained: dict[str, torch.Tensor]  # the last checkpoint's trainable weights
    final: dict[str, torch.Tensor]  # the whole saved model
    log: str


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """``llava-uhd train`` on the debug config (under torchrun when ``nproc`` > 1) run to success; on a hang
    stop it, its workers included, and fail. ``extra`` overrides come last, so they win over COMMON."""
    args = ["-m", "llava_uhd.cli", "train", "--config", str(DEBUG), "--set", f"output_dir={out}", *COMMON]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), *args, *extra]
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun passes SIGTERM on to its workers (each in a session of its own)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
            pytest.fail(f"{' '.join(cmd[-8:])} ran past {RUN_TIMEOUT_S} s (a collective hung?)")
    assert process.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, nproc: int, *extra: str) -> Run:
    done = _launch(out, nproc, *extra)
    records = _metrics(out)
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    return Run(
        out,
        {r["step"]: r["loss"] for r in records if "loss" in r},
        load_file(str(checkpoint / "model.safetensors")),
        load_file(str(out / "final" / "model.safetensors")),
        done.stdout + done.stderr,
    )


def _deepspeed_args(tmp_path: Path, stage: int) -> list[str]:
    shipped = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    ds_config = tmp_path / f"zero{stage}.json"
    # DeepSpeedCPUAdam would compile for ~40 s; the loop passes torch's AdamW, and this keeps DS from building its own
    ds_config.write_text(json.dumps({**shipped, "torch_adam": True}))
    return ["--set", "backend=deepspeed", "--set", f"deepspeed_config={ds_config}"]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _train(tmp_path_factory.mktemp("single"), 1)


def _assert_close_weights(
    weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], atol: float
) -> None:
    assert sorted(weights) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, atol=atol, rtol=0, msg=name)


def _assert_follows(run: Run, single: Run) -> None:
    assert sorted(single.losses) == list(range(1, STEPS + 1))
    assert sorted(run.losses) == sorted(single.losses)
    assert [run.losses[s] for s in sorted(run.losses)] == pytest.approx(
        [single.losses[s] for s in sorted(single.losses)], rel=LOSS_RTOL
    )
    _assert_close_weights(run.trained, single.trained, WEIGHT_ATOL)
    # the final save gathers every parameter (sharded on FSDP / ZeRO-3) into one plain model folder
    _assert_close_weights(run.final, single.final, WEIGHT_ATOL)


def _assert_resume_is_exact(sharded: Run, tmp_path: Path, *extra: str) -> None:
    """Resume ``sharded`` from its step-2 checkpoint into a new folder; steps 3-4 and the model are bitwise equal."""
    checkpoint = sharded.out / "checkpoints" / f"step-{RESUME_STEP:06d}"
    resumed = _train(tmp_path / "resumed", 2, *extra, "--resume", str(checkpoint))
    assert "resumed from" in resumed.log
    assert sorted(resumed.losses) == list(range(RESUME_STEP + 1, STEPS + 1))
    assert resumed.losses == {s: sharded.losses[s] for s in resumed.losses}
    _assert_close_weights(resumed.final, sharded.final, atol=0)


def test_ddp_two_processes_match_one(tmp_path: Path, single: Run) -> None:
    _assert_follows(_train(tmp_path / "ddp", 2), single)


# activation checkpointing rides along: recomputation inside FSDP units must not change a single gradient
FSDP = ["--set", "backend=fsdp", "--set", f"save_every={RESUME_STEP}", "--set", "gradient_checkpointing=true"]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _train(tmp_path_factory.mktemp("fsdp"), 2, *FSDP)


def test_fsdp_two_processes_match_one(fsdp: Run, single: Run) -> None:
    _assert_follows(fsdp, single)


def test_fsdp_resume_ends_equal_to_the_uninterrupted_run(fsdp: Run, tmp_path: Path) -> None:
    _assert_resume_is_exact(fsdp, tmp_path, *FSDP)


@needs_deepspeed
def test_deepspeed_zero2_two_processes_match_one(tmp_path: Path, single: Run) -> None:
    run = _train(tmp_path / "ds", 2, *_deepspeed_args(tmp_path, 2))
    assert DEEPSPEED_BUILD_LINE not in run.log  # no JIT-compiled op on CPU (it made the first run flaky)
    _assert_follows(run, single)


@needs_deepspeed
def test_deepspeed_zero3_two_processes_match_one_and_resume(tmp_path: Path, single: Run) -> None:
    args = [*_deepspeed_args(tmp_path, 3), "--set", f"save_every={RESUME_STEP}"]
    run = _train(tmp_path / "ds", 2, *args)
    assert DEEPSPEED_BUILD_LINE not in run.log
    _assert_follows(run, single)
    _assert_resume_is_exact(run, tmp_path, *args)


# -- LoRA -------------------------------------------------------------------------------------------------

LORA_RANK = 4
LORA = ["--set", "stage=stage2", "--set", f"lora.r={LORA_RANK}", "--set", f"save_every={RESUME_STEP}"]
# the merged models' logits, 2-process vs 1-process (|logit| < 1 on the tiny model): measured 4e-7
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _train(tmp_path_factory.mktemp("single_lora"), 1, *LORA)


def _lora_config(run: Run) -> TrainConfig:
    overrides = [*COMMON[1::2], *LORA[1::2]]  # the values of the --set pairs
    return TrainConfig.load(DEBUG, [f"output_dir={run.out}", *overrides]).resolved()


def _peft_merged(run: Run) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The run's adapters folded by peft into a fresh base model (same seed), and a batch of its data."""
    config = _lora_config(run)
    stage = get_stage(config.stage)
    processor = build_processor(config)
    model = build_model(config, processor)
    prepare_model(model, config, stage)
    result = model.load_state_dict(run.trained, strict=False)
    assert not result.unexpected_keys
    data = build_data(config, stage, processor, rank=0)
    batch = data.collate([data.dataset[i] for i in range(2)])
    return merge_lora(model).eval(), {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _optimizer_numel(checkpoint: Path) -> int:
    """Values per optimizer moment in a checkpoint: FSDP's gathered state, or DeepSpeed's fp32 partitions."""
    if (checkpoint / "optimizer.pt").is_file():
        state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
        return sum(entry["exp_avg"].numel() for entry in state.values())
    total = 0
    for path in (checkpoint / "engine" / "state").glob("zero_pp_rank_*_optim_states.pt"):
        state = torch.load(path, weights_only=False)["optimizer_state_dict"]
        key = "fp32_flat_groups" if "fp32_flat_groups" in state else "single_partition_of_fp32_groups"
        total += sum(t.numel() for t in state[key])
    return total


def _assert_lora_follows(run: Run, single_lora: Run) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Follows the 1-process run; adapters and resampler alone have optimizer state; the final folder is
    peft's merge of the run's adapters. Returns that merged model and a batch."""
    _assert_follows(run, single_lora)
    trained = sum(t.numel() for t in run.trained.values())
    assert all(n.startswith("resampler.") or ".lora_" in n for n in run.trained)
    # frozen base weights get no optimizer state (ZeRO may pad its partitions a little)
    checkpoint = run.out / "checkpoints" / f"step-{STEPS:06d}"
    assert trained <= _optimizer_numel(checkpoint) <= trained * 1.01
    for path in (checkpoint / "engine" / "state").glob("*model_states.pt"):  # DeepSpeed saves no base weights
        assert sorted(torch.load(path, weights_only=False)["module"]) == sorted(run.trained)
    merged, inputs = _peft_merged(run)
    _assert_close_weights(run.final, {k: v.detach() for k, v in merged.state_dict().items()}, atol=0)
    return merged, inputs


@pytest.fixture(scope="module")
def fsdp_lora(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _train(tmp_path_factory.mktemp("fsdp_lora"), 2, *LORA, *FSDP)


def test_lora_on_fsdp_matches_one_process_and_resumes(
    fsdp_lora: Run, single_lora: Run, tmp_path: Path
) -> None:
    _assert_lora_follows(fsdp_lora, single_lora)
    _assert_resume_is_exact(fsdp_lora, tmp_path, *LORA, *FSDP)


@needs_deepspeed
def test_lora_on_deepspeed_zero2_matches_one_process(tmp_path: Path, single_lora: Run) -> None:
    _assert_lora_follows(_train(tmp_path / "ds", 2, *LORA, *_deepspeed_args(tmp_path, 2)), single_lora)


@needs_deepspeed
def test_lora_on_deepspeed_zero3_matches_one_process_loads_and_resumes(
    tmp_path: Path, single_lora: Run
) -> None:
    from llava_uhd.model import LlavaUHDForConditionalGeneration

    args = [*LORA, *_deepspeed_args(tmp_path, 3)]
    run = _train(tmp_path / "ds", 2, *args)
    merged, inputs = _assert_lora_follows(run, single_lora)
    # the saved folder loads as a plain model with the logits of the merged adapters
    with torch.no_grad():
        loaded = LlavaUHDForConditionalGeneration.from_pretrained(str(run.out / "final")).eval()
        logits = loaded(**inputs).logits
        reference = LlavaUHDForConditionalGeneration.from_pretrained(str(single_lora.out / "final")).eval()
        torch.testing.assert_close(logits, merged(**inputs).logits, atol=0, rtol=0)
        torch.testing.assert_close(logits, reference(**inputs).logits, atol=LOGITS_ATOL, rtol=0)
    _assert_resume_is_exact(run, tmp_path, *args)


def _eval_losses(out: Path, nproc: int, *extra: str) -> list[float]:
    """Run one step with an eval after it; the eval losses rank 0 logged."""
    _launch(
        out,
        nproc,
        *extra,
        "--set",
        "max_steps=1",
        "--set",
        "eval_every=1",
        "--set",
        "data.synthetic_eval_samples=3",
    )
    return [r["eval_loss"] for r in _metrics(out) if "eval_loss" in r]


def test_fsdp_eval_with_batches_that_do_not_divide_over_ranks(tmp_path: Path) -> None:
    """3 eval batches on 2 ranks: the rank with one batch runs it again uncounted (FSDP gathers weights
    inside every forward, so uneven counts would hang), and the loss is the 1-process one."""
    fsdp = _eval_losses(tmp_path / "fsdp", 2, "--set", "backend=fsdp")
    single = _eval_losses(tmp_path / "single", 1)
    assert len(single) >= 1 and fsdp == pytest.approx(single, rel=LOSS_RTOL)
