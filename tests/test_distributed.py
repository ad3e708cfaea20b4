"""Scale-out: 2-process runs (DDP on gloo, FSDP, DeepSpeed ZeRO-2 and ZeRO-3) follow a 1-process run.

The loop normalises each step's loss by the supervised tokens of the whole global batch (train/loop.py),
so the split over ranks changes only float summation order: losses agree to 1e-5 relative, and the
trained weights (the checkpoint's trainable set and the whole final model) to 1e-5 absolute after 4 steps.
Sharded backends also resume: a 2-process run resumed from its step-2 checkpoint ends bitwise equal to the
uninterrupted one (same world size, same reduction order). One torchrun launch per backend and purpose.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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


def _train(out: Path, nproc: int, *extra: str) -> Run:
    args = ["-m", "llava_uhd.cli", "train", "--config", str(DEBUG), "--set", f"output_dir={out}", *COMMON]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), *args, *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
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
