"""Exact resume: a run SIGKILLed at a random step and resumed ends bitwise equal to an uninterrupted run.

Also the checkpoint mechanics: atomic folders, keep-last-K, the stored state and config, RNG round trip,
and that no file of a checkpoint can run code on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_uhd.errors import CheckpointError
from llava_uhd.train.checkpointing import (
    CheckpointIO,
    TrainerState,
    capture_rng,
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_data_file,
    restore_rng,
)
from llava_uhd.train.config import TrainConfig
from llava_uhd.train.entry import run_training

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "train" / "debug-cpu.yaml"
# 16 synthetic samples, global batch 2: 8 optimiser steps, a checkpoint after each
RUN = [
    "--set",
    "global_batch_size=2",
    "--set",
    "micro_batch_size=1",
    "--set",
    "save_every=1",
    "--set",
    "data.synthetic_eval_samples=0",
    "--set",
    "deterministic=true",
]
TOTAL_STEPS = 8
POLL_S = 0.05


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llava_uhd.cli",
        "train",
        "--config",
        str(DEBUG),
        "--set",
        f"output_dir={out}",
        *RUN,
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.strip())


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_sigkill_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    done = subprocess.run(_cmd(straight), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    kill_after = random.Random().randint(2, TOTAL_STEPS - 2)  # a random step, printed on failure
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while _logged_steps(killed) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_after}"
    assert not (killed / "final").exists()
    assert latest_checkpoint(killed) is not None

    resumed = subprocess.run(
        _cmd(killed, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trained {TOTAL_STEPS} steps" in resumed.stdout

    a, b = _final_weights(straight), _final_weights(killed)
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"killed after step {kill_after}: {different} differ"
    # the per-step losses after the resume point are the same floats too
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in resumed_losses}
    assert [by_step[s] for s in range(1, TOTAL_STEPS + 1)] == losses
    assert len(list_checkpoints(killed)) == 2  # keep_last in the debug config


def _io(tmp_path: Path, keep_last: int = 2) -> CheckpointIO:
    return CheckpointIO(tmp_path, rank=0, world_size=1, barrier=lambda: None, keep_last=keep_last)


def _state(step: int) -> TrainerState:
    return TrainerState(
        global_step=step,
        epoch=0,
        step_in_epoch=step,
        samples_seen=4 * step,
        world_size=1,
        global_batch_size=4,
        micro_batch_size=2,
        total_steps=10,
    )


def _save(
    io: CheckpointIO, step: int, write_model=lambda folder: (folder / "model.safetensors").write_text("w")
):
    return io.save(_state(step), "stage: stage1\n", write_model, lambda folder: None)


def test_checkpoints_keep_the_last_k_and_hold_state_and_config(tmp_path: Path) -> None:
    io = _io(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _save(io, step)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003"]
    latest = latest_checkpoint(tmp_path)
    assert io.load_state(latest) == _state(3)
    assert (latest / "config.yaml").read_text() == "stage: stage1\n"
    assert (latest / "rng" / "rank0.pt").is_file()


def test_a_save_killed_midway_leaves_no_checkpoint_and_is_cleaned_up(tmp_path: Path) -> None:
    io = _io(tmp_path)
    _save(io, 1)

    def crash(folder: Path) -> None:
        raise KeyboardInterrupt  # stands in for a kill while writing the weights

    with pytest.raises(KeyboardInterrupt):
        _save(io, 2, write_model=crash)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert (tmp_path / "checkpoints" / ".tmp-step-000002").is_dir()
    _save(io, 2)  # the next save replaces the leftover temp folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert not (tmp_path / "checkpoints" / ".tmp-step-000002").exists()


def test_resume_with_another_world_size_is_refused(tmp_path: Path) -> None:
    _save(_io(tmp_path), 1)
    other = CheckpointIO(tmp_path, rank=0, world_size=2, barrier=lambda: None, keep_last=2)
    with pytest.raises(CheckpointError, match="saved with 1 processes, resuming with 2"):
        other.load_state(latest_checkpoint(tmp_path))


def test_resume_with_another_batch_geometry_is_refused(tmp_path: Path) -> None:
    path = _save(_io(tmp_path), 1)
    state = _io(tmp_path).load_state(path)
    check_compatible(state, global_batch_size=4, micro_batch_size=2, path=path)
    with pytest.raises(CheckpointError, match="saved with global/micro batch 4/2, this run uses 8/2"):
        check_compatible(state, global_batch_size=8, micro_batch_size=2, path=path)


def test_trainer_state_starts_at_zero_and_rolls_the_epoch_over() -> None:
    state = TrainerState.start(world_size=2, global_batch_size=4, micro_batch_size=2, total_steps=5)
    assert (state.global_step, state.epoch, state.step_in_epoch, state.samples_seen) == (0, 0, 0, 0)
    seen = []
    for _ in range(5):
        state = state.advance(steps_per_epoch=2)
        seen.append((state.global_step, state.epoch, state.step_in_epoch, state.samples_seen))
    assert seen == [(1, 0, 1, 4), (2, 1, 0, 8), (3, 1, 1, 12), (4, 2, 0, 16), (5, 2, 1, 20)]
    assert state == TrainerState(
        5, 2, 1, 20, world_size=2, global_batch_size=4, micro_batch_size=2, total_steps=5
    )


def test_a_malformed_trainer_state_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = _save(_io(tmp_path), 1)
    (path / "trainer_state.json").write_text('{"global_step": 1}')
    with pytest.raises(CheckpointError, match="trainer_state.json: not a trainer state"):
        _io(tmp_path).load_state(path)


def test_rng_states_round_trip() -> None:
    import numpy as np

    state = capture_rng()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng(state)
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


def test_rng_states_round_trip_through_the_checkpoint_file(tmp_path: Path) -> None:
    import numpy as np

    io = _io(tmp_path)
    path = _save(io, 1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng(
        io.load_rng(path)
    )  # loaded with weights_only=True: numpy's key array is allowed, nothing else
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


@pytest.mark.parametrize(
    ("planted", "problem"),
    [
        ({"python": 1, "numpy": "x"}, r"want python, numpy and torch states, got \['numpy', 'python'\]"),
        ([1, 2, 3], r"want python, numpy and torch states, got list"),
        (
            {"python": (3, (1, 2), None), "numpy": ("MT19937",), "torch": torch.zeros(3)},
            r"ValueError|TypeError",
        ),
        ({**capture_rng(), "torch": torch.zeros(7, dtype=torch.uint8)}, r"RuntimeError: .*size"),
        ({**capture_rng(), "cuda": [torch.zeros(2)]}, r"cuda must be a list of byte tensors"),
    ],
)
def test_a_malformed_rng_file_is_a_checkpoint_error_naming_it(tmp_path: Path, planted, problem) -> None:
    io = _io(tmp_path)
    path = _save(io, 1)
    before = (random.getstate(), torch.get_rng_state())
    torch.save(planted, path / "rng" / "rank0.pt")
    with pytest.raises(CheckpointError, match=rf"rng/rank0.pt: not an RNG state \(.*{problem}"):
        io.load_rng(path)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])


class _Planted:
    """A pickle that creates ``marker`` when unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def one_step_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one_step")
    overrides = [f"output_dir={out}", "max_steps=1", "save_every=1", "data.synthetic_eval_samples=0"]
    run_training(TrainConfig.load(DEBUG, overrides))
    return latest_checkpoint(out)


@pytest.mark.parametrize("planted", ["rng/rank0.pt", "scheduler.pt", "optimizer.pt"])
def test_resume_refuses_a_checkpoint_file_that_would_run_code(
    one_step_checkpoint: Path, tmp_path: Path, planted: str
) -> None:
    checkpoint = tmp_path / "checkpoints" / one_step_checkpoint.name
    shutil.copytree(one_step_checkpoint, checkpoint)
    marker = tmp_path / "code-ran"
    torch.save(_Planted(marker), checkpoint / planted)
    overrides = [f"output_dir={tmp_path / 'resumed'}", "max_steps=1", "data.synthetic_eval_samples=0"]
    with pytest.raises(
        CheckpointError,
        match=f"{re.escape(str(checkpoint / planted))}: refused to load, it holds posix.system,",
    ):
        run_training(TrainConfig.load(DEBUG, overrides), resume=checkpoint)
    assert not marker.exists()
    torch.load(checkpoint / planted, weights_only=False)  # the plant is live: an unsafe load runs it
    assert marker.exists()


def test_a_missing_or_truncated_checkpoint_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="scheduler.pt: no such checkpoint file"):
        load_data_file(tmp_path / "scheduler.pt")
    torch.save({"step": torch.zeros(4)}, tmp_path / "optimizer.pt")
    data = (tmp_path / "optimizer.pt").read_bytes()
    (tmp_path / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="optimizer.pt: cannot be read"):
        load_data_file(tmp_path / "optimizer.pt")


def test_a_deepspeed_engine_file_that_would_run_code_is_refused_before_deepspeed_reads_it(
    tmp_path: Path,
) -> None:
    pytest.importorskip("deepspeed")
    from llava_uhd.train.parallel import check_deepspeed_checkpoint

    engine = tmp_path / "engine"
    (engine / "state").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, engine / "state" / "mp_rank_00_model_states.pt")
    check_deepspeed_checkpoint(engine)
    marker = tmp_path / "code-ran"
    planted = engine / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Planted(marker)}, planted)
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(planted))}: refused to load, it holds posix.system,"
    ):
        check_deepspeed_checkpoint(engine)
    assert not marker.exists()
