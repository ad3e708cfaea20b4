"""Scale-out: a 2-process run (DDP on gloo, DeepSpeed ZeRO-2) follows a 1-process run with the same global batch.

The loop normalises each step's loss by the supervised tokens of the whole global batch (train/loop.py),
so the split over ranks changes only float summation order: losses agree to 1e-5 relative and the
trained resampler to 1e-5 absolute after 4 steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug-cpu.yaml"
COMMON = ["--set", "micro_batch_size=1", "--set", "data.synthetic_eval_samples=0", "--set", "save_every=0"]
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5

pytestmark = pytest.mark.distributed


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train(out: Path, nproc: int, extra: list[str] = ()) -> tuple[list[float], dict[str, torch.Tensor]]:
    args = [
        "-m",
        "llava_uhd.cli",
        "train",
        "--config",
        str(DEBUG),
        "--set",
        f"output_dir={out}",
        *COMMON,
        *extra,
    ]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1]
    return losses, load_file(str(checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict[str, torch.Tensor]]:
    return _train(tmp_path_factory.mktemp("single"), 1)


def _assert_follows(run: tuple[list[float], dict], single: tuple[list[float], dict]) -> None:
    losses, weights = run
    ref_losses, ref_weights = single
    assert len(losses) == len(ref_losses) == 4
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert sorted(weights) == sorted(ref_weights)
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, atol=WEIGHT_ATOL, rtol=0, msg=name)


def test_ddp_two_processes_match_one(tmp_path: Path, single) -> None:
    _assert_follows(_train(tmp_path / "ddp", 2), single)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_two_processes_match_one(tmp_path: Path, single) -> None:
    ds_config = tmp_path / "zero2.json"
    shipped = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    # DeepSpeedCPUAdam would compile for ~40 s; the loop passes torch's AdamW, and this keeps DS from building its own
    ds_config.write_text(json.dumps({**shipped, "torch_adam": True}))
    run = _train(tmp_path / "ds", 2, ["--set", "backend=deepspeed", "--set", f"deepspeed_config={ds_config}"])
    _assert_follows(run, single)
