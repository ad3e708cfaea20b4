"""Atomic training checkpoints with everything an exact resume needs.

Layout of ``<output_dir>/checkpoints/step-000120/``::

    model.safetensors   trainable weights (gathered full tensors, rank 0)
    optimizer.pt        optimizer state (ddp; fsdp: the gathered full state, rank 0)
    scheduler.pt        LR scheduler state
    engine/             DeepSpeed's own checkpoint (ZeRO-partitioned trainable weights + optimizer)
    rng/rank{r}.pt      python, numpy, torch (and CUDA) generator states of every rank
    trainer_state.json  global step, epoch, step in epoch, samples seen, world size, batch geometry
    config.yaml         the resolved TrainConfig

Every rank writes into ``.tmp-step-000120``; after a barrier rank 0 writes ``trainer_state.json`` last and
renames the folder, so a run killed at any moment leaves either a complete checkpoint or a temp folder that
the next save or resume deletes. Only folders named ``step-N`` count, the newest ``keep_last`` are kept.

A checkpoint folder may come from anywhere, so resume reads every ``.pt`` file of it as data only
(``load_data_file``): a pickle that would run code is refused with a ``CheckpointError``.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_uhd.errors import CheckpointError
from llava_uhd.model.weights import TORCH_FILE_ERRORS

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_DIGITS = 6
# ``np.random.get_state()`` holds a uint32 key array; these are the globals such an array pickles into
# (taken from numpy itself: the module names differ between numpy 1 and 2). Allowing exactly these lets
# an RNG file load with ``weights_only=True`` without admitting any other object.
_UINT32_ARRAY = np.zeros(1, dtype=np.uint32)
_NUMPY_RNG_GLOBALS = (_UINT32_ARRAY.__reduce__()[0], np.ndarray, np.dtype, type(_UINT32_ARRAY.dtype))


@dataclass(frozen=True)
class TrainerState:
    """Where a run stands at an optimiser-step boundary."""

    global_step: int
    epoch: int
    step_in_epoch: int  # optimiser steps already done in ``epoch``
    samples_seen: int
    world_size: int
    global_batch_size: int
    micro_batch_size: int
    total_steps: int

    @classmethod
    def start(
        cls, world_size: int, global_batch_size: int, micro_batch_size: int, total_steps: int
    ) -> TrainerState:
        """The state of a fresh run, before its first step."""
        return cls(0, 0, 0, 0, world_size, global_batch_size, micro_batch_size, total_steps)

    def advance(self, steps_per_epoch: int) -> TrainerState:
        """The state after one more optimiser step; an epoch ends after ``steps_per_epoch`` of them."""
        done = self.step_in_epoch + 1
        epoch_over = done == steps_per_epoch
        return replace(
            self,
            global_step=self.global_step + 1,
            epoch=self.epoch + 1 if epoch_over else self.epoch,
            step_in_epoch=0 if epoch_over else done,
            samples_seen=self.samples_seen + self.global_batch_size,
        )


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step-{step:0{_STEP_DIGITS}d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a ``step-N`` folder holding ``trainer_state.json``), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_data_file(path: Path, allowed_globals: Sequence[Any] = (), mmap: bool = False) -> Any:
    """Read a ``torch.save`` file as data only (tensors, containers, numbers, strings, ``allowed_globals``).

    Every file of a checkpoint goes through here: ``weights_only=True`` refuses any other class or function,
    so a planted pickle cannot run code on resume. ``mmap`` maps the tensors instead of reading them (CPU),
    for a cheap check of a file that another library then loads itself.

    Raises:
        CheckpointError: the file is missing, or holds more than data, or cannot be read.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with torch.serialization.safe_globals(list(allowed_globals)):
        try:
            return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu" if mmap else None)
        except pickle.UnpicklingError:
            refused = _disallowed_globals(path)
            raise CheckpointError(f"{path}: refused to load, it holds {refused}, not only data") from None
        except TORCH_FILE_ERRORS as exc:  # not a torch.save file, or truncated
            raise CheckpointError(f"{path}: cannot be read ({exc})") from None


def _disallowed_globals(path: Path) -> str:
    """The classes and functions a refused file names (a static scan of its pickle; runs nothing)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):  # a legacy (non-zip) file: torch scans only the zip format
        names = []
    return ", ".join(sorted(names)) if names else "objects other than tensors and plain data"


def capture_rng() -> dict[str, Any]:
    """Every generator a training step may draw from on this rank."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng(state: Any, source: Path) -> None:
    """Refuse, naming ``source``, RNG states that :func:`restore_rng` could not set: each is set on a
    throwaway generator of its kind, so the process's own generators are untouched."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{source}: not an RNG state (want python, numpy and torch states, got {found})"
        )
    try:
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
        torch.Generator().set_state(state["torch"])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not an RNG state ({type(exc).__name__}: {exc})") from None
    cuda = state.get("cuda", [])  # one byte tensor per device (set only where CUDA is present)
    if not isinstance(cuda, list | tuple) or not all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda
    ):
        raise CheckpointError(f"{source}: not an RNG state (cuda must be a list of byte tensors)")


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class CheckpointIO:
    """Saves and loads checkpoints for one run; the distributed hooks come from the loop.

    Attributes:
        output_dir: the run folder (checkpoints go under ``checkpoints/``).
        rank, world_size: this process and the number of processes.
        barrier: waits for every rank (a no-op in one process).
        keep_last: how many complete checkpoints to keep.
    """

    output_dir: Path
    rank: int
    world_size: int
    barrier: Callable[[], None]
    keep_last: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def save(
        self,
        state: TrainerState,
        config_yaml: str,
        write_model: Callable[[Path], None],
        write_optimizer: Callable[[Path], None],
    ) -> Path:
        """Write a checkpoint for ``state`` atomically and prune old ones; return its final path.

        ``write_model`` and ``write_optimizer`` are called on every rank with the temp folder; they decide
        what each rank writes (rank 0 the gathered weights; every rank its shard on sharded backends).
        """
        root = checkpoint_root(self.output_dir)
        final = root / step_dir_name(state.global_step)
        tmp = root / f".tmp-{final.name}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed mid-save
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        self.barrier()
        torch.save(capture_rng(), tmp / "rng" / f"rank{self.rank}.pt")
        write_model(tmp)
        write_optimizer(tmp)
        self.barrier()
        if self.is_main:
            (tmp / "config.yaml").write_text(config_yaml)
            # the state file goes last: a folder without it is never taken for a checkpoint
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
            if final.exists():  # the same step saved again (e.g. end of run right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(self.output_dir)[: -self.keep_last]:
                shutil.rmtree(old)
        self.barrier()
        return final

    def load_state(self, path: Path) -> TrainerState:
        """Read and check a checkpoint's trainer state and this rank's RNG file (restored by the caller)."""
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
        try:
            state = TrainerState(**json.loads(state_file.read_text()))
        except (ValueError, TypeError) as exc:  # not JSON, or not the fields of a TrainerState
            raise CheckpointError(f"{state_file}: not a trainer state ({exc})") from None
        if state.world_size != self.world_size:
            raise CheckpointError(
                f"{path}: saved with {state.world_size} processes, resuming with {self.world_size}; "
                "an exact resume needs the same world size"
            )
        return state

    def load_rng(self, path: Path) -> dict[str, Any]:
        """This rank's RNG states, checked to be ones :func:`restore_rng` can set (nothing is set here)."""
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"{path}: no RNG state for rank {self.rank}")
        state = load_data_file(rng_file, _NUMPY_RNG_GLOBALS)
        check_rng(state, rng_file)
        return state


def check_compatible(state: TrainerState, global_batch_size: int, micro_batch_size: int, path: Path) -> None:
    """An exact resume needs the batch geometry it was saved with."""
    if (state.global_batch_size, state.micro_batch_size) != (global_batch_size, micro_batch_size):
        raise CheckpointError(
            f"{path}: saved with global/micro batch {state.global_batch_size}/{state.micro_batch_size}, "
            f"this run uses {global_batch_size}/{micro_batch_size}"
        )
