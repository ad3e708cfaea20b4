"""Scale-out engines: one process, DDP (``torchrun``), FSDP and DeepSpeed ZeRO behind one small interface.

The loop drives every engine through :class:`Engine`: per micro-batch a forward through ``engine.model``
and ``backward(loss)`` inside ``gradient_sync(last)``, per optimiser step ``step()``, and the checkpoint
hooks; each engine decides how gradients are reduced and how its state is saved. Built on ``torch.distributed`` directly: accelerate (1.15) silently
falls back to DDP for DeepSpeed on CPU and reports one process per rank, so DeepSpeed is driven through
``deepspeed.initialize`` here. The loss handed to ``backward`` is already normalised for the whole global
batch (see :mod:`llava_uhd.train.loop`), so every engine must *sum* micro-batches and *average* ranks.

All four run on CPU under ``torchrun`` with gloo (tests/test_distributed.py): FSDP needs its ``device_id``
spelled out there, and DeepSpeed is kept from JIT-compiling its shared-memory op (see
:func:`skip_deepspeed_shm_op`). LoRA trains on all four; its adapters are folded into the gathered
weights at the end (:mod:`llava_uhd.train.lora`).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.train.checkpointing import load_data_file


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group if there is one; return (rank, world size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (identity in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shutdown() -> None:
    """Leave the process group (ranks otherwise abort at exit now and then under DeepSpeed)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def zero_missing_gradients(params: list[nn.Parameter]) -> None:
    """Give a zero gradient to the trainable parameters that no rank used in this step.

    torch's AdamW skips a parameter whose gradient is None (no momentum step, no weight decay), so its
    update would hang on whether its module happened to run, e.g. the resampler in a global batch of
    text-only samples. Sharded engines cannot skip: ZeRO steps flat buffers, and FSDP units always get a
    gradient because every rank runs every unit (:mod:`llava_uhd.train.idle_piece`). With zeros a step
    means the same on all four engines, so 2-process sharded runs follow 1-process runs.
    """
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)


class Engine(abc.ABC):
    """What the training loop needs from a scale-out backend.

    Attributes:
        model: the module to run forwards through (DDP, FSDP or DeepSpeed's wrapper; the model itself alone).
        module: the unwrapped model, whose parameter names the checkpoints use.
        base_optimizer: the torch optimizer whose parameter groups the LR schedule drives.
    """

    model: nn.Module
    module: nn.Module
    base_optimizer: torch.optim.Optimizer

    @abc.abstractmethod
    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward: unless ``enabled`` (the last micro-batch of a step), the
        backward that follows accumulates its gradients locally instead of reducing them over ranks."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Add the gradient of one micro-batch's loss (already normalised for the global batch)."""

    @abc.abstractmethod
    def step(self) -> float | None:
        """After a step's last backward: clip, update, clear gradients; the pre-clip gradient norm or None."""

    @abc.abstractmethod
    def full_state_dict(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Full tensors (on rank 0 at least) of the named parameters, or of the whole state dict.

        A collective on sharded backends: every rank must call it. ``None`` gives every parameter and
        buffer under the unwrapped model's names (what ``save_pretrained`` writes).
        """

    @abc.abstractmethod
    def save_optimizer(self, folder: Path, rank: int) -> None:
        """Write the optimizer state into a checkpoint folder; called on every rank."""

    @abc.abstractmethod
    def load_optimizer(self, folder: Path, rank: int) -> None:
        """Read the optimizer state back from a checkpoint folder; called on every rank."""


class DDPEngine(Engine):
    """One process or DDP: gradients of non-final micro-batches stay local (DDP's ``no_sync``)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None,
        world_size: int,
        find_unused_parameters: bool,
    ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.base_optimizer = optimizer  # the torch optimizer the LR schedule drives
        self.max_grad_norm = max_grad_norm
        self.model: nn.Module = model
        if world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=find_unused_parameters
            )

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Clip, update, clear gradients; return the pre-clip gradient norm (None when not clipping)."""
        norm = None
        params = [p for p in self.module.parameters() if p.requires_grad]
        zero_missing_gradients(params)
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=False))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dict(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        state = self.module.state_dict()
        wanted = set(state) if names is None else set(names)
        return {k: v.detach() for k, v in state.items() if k in wanted}

    def save_optimizer(self, folder: Path, rank: int) -> None:
        if rank == 0:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_optimizer(self, folder: Path, rank: int) -> None:
        self.optimizer.load_state_dict(load_data_file(folder / "optimizer.pt"))


def fsdp_wrap_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Module classes that become their own FSDP unit: the repeated blocks named by ``_no_split_modules``.

    The composed model names its ViT blocks and the resampler; the language model names its decoder layer.
    One unit per block is what lets FSDP gather one layer at a time instead of the whole model.
    """
    wanted: set[str] = set()
    for module in model.modules():
        wanted.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not classes:
        raise ConfigError(f"backend fsdp: none of the blocks {sorted(wanted)} occurs in the model")
    return classes


class FSDPEngine(Engine):
    """FSDP with one unit per block; full (unsharded) model and optimizer states on save.

    ``use_orig_params`` lets frozen and trainable parameters share a unit's flat buffer (stage 1 freezes
    most of every block). ``device_id`` is given explicitly because FSDP otherwise refuses CPU-only
    machines; on CPU the collectives run on gloo. ``own_units`` become units of their own inside their
    block: LoRA adapters, so that a frozen decoder layer holds no gradient (a unit's gradient spans its
    whole flat buffer, frozen weights included, which would cost LoRA a full model's worth of gradients).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: Any,
        max_grad_norm: float | None,
        device: torch.device,
        own_units: Sequence[nn.Module] = (),
    ) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import CustomPolicy

        self.max_grad_norm = max_grad_norm
        self.module = model
        # Offloading full states to CPU is for GPU runs; with CPU parameters FSDP's "offload" frees the
        # unsharded buffer that the returned tensors still view, and reading them segfaults (torch 2.13).
        self.offload = device.type != "cpu"
        blocks = tuple(fsdp_wrap_classes(model))
        singled_out = {id(m) for m in own_units}
        self.model = FSDP(
            model,
            auto_wrap_policy=CustomPolicy(lambda m: isinstance(m, blocks) or id(m) in singled_out),
            use_orig_params=True,
            device_id=device,
        )
        # the optimizer must see the FSDP-managed parameters, so it is built after wrapping
        self.optimizer = optimizer_factory(self.model)
        self.base_optimizer = self.optimizer

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if enabled else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        norm = None
        if self.max_grad_norm is not None:
            norm = float(self.model.clip_grad_norm_(self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dict(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        # Through the FSDP root on every rank: the inner units' state-dict hooks all-gather, so calling
        # ``self.module.state_dict()`` on one rank alone would deadlock.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=self.offload)
        )
        if names is None:
            return full
        return {name: full[name] for name in names if name in full}

    def save_optimizer(self, folder: Path, rank: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(
            self.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=self.offload),
        )
        if rank == 0:
            torch.save(state, folder / "optimizer.pt")

    def load_optimizer(self, folder: Path, rank: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = load_data_file(folder / "optimizer.pt")
        set_optimizer_state_dict(
            self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True)
        )


# DeepSpeed's op name for its shared-memory CPU collectives (deepspeed/ops/op_builder/cpu/comm.py).
DEEPSPEED_SHM_OP = "deepspeed_shm_comm"


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed on plain gloo collectives on CPU instead of JIT-compiling its shared-memory op.

    On a CPU accelerator ``deepspeed.initialize`` builds ``deepspeed_shm_comm`` with ninja on first use:
    about 40 s on 2 cores, done by every rank at once in the shared ``~/.cache/torch_extensions`` (rebuilt
    whenever another install's flags differ, and left locked if a rank dies mid-build). It only speeds up
    all-reduce between processes on one host, so CPU runs lose nothing by skipping it. DeepSpeed builds an
    op only when its ``deepspeed.ops.__compatible_ops__`` entry is true; this sets that entry to false.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DEEPSPEED_SHM_OP] = False


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO via ``deepspeed.initialize``; it accumulates, clips and reduces by its JSON config."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]) -> None:
        import deepspeed

        if next(model.parameters()).device.type == "cpu":
            skip_deepspeed_shm_op()
        self.module = model
        self.max_grad_norm = ds_config.get("gradient_clipping")
        self.accumulation = int(ds_config["gradient_accumulation_steps"])
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = engine
        self.optimizer = ds_optimizer
        self.base_optimizer = optimizer  # ZeRO steps it with the lr our scheduler writes into its groups

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps; our loss is already normalised per global batch.
        self.model.backward(loss * self.accumulation)
        if not self.model.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-batches in its step(), which updates nothing before the boundary
            self.model.step()

    def step(self) -> float | None:
        if not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"DeepSpeed step before the accumulation boundary: each step needs {self.accumulation} backwards"
            )
        self.model.step()  # at the boundary: clip, update, clear gradients
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def full_state_dict(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Full CPU tensors on rank 0 ({} elsewhere), gathered one parameter at a time.

        ZeRO-3 partitions every parameter; gathering one at a time and copying it to rank 0's memory
        never holds more than one full parameter on a device, where gathering the whole module at once
        would briefly hold the whole model on every rank. ZeRO-2 parameters are whole already (no-op).
        """
        import deepspeed

        state = self.module.state_dict(keep_vars=True)  # ZeRO-3: parameters as empty placeholders
        wanted = list(state) if names is None else [n for n in names if n in state]
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        full: dict[str, torch.Tensor] = {}
        for name in wanted:
            tensor = state[name]  # a parameter, or a buffer (never partitioned)
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if is_main:
                    full[name] = tensor.detach().cpu().clone()
        return full

    def save_optimizer(self, folder: Path, rank: int) -> None:
        # ZeRO keeps the trainable weights' master copies with the optimizer state, so both go into engine/.
        # Frozen weights are rebuilt from the model source on resume, like on the other backends; saving
        # them would write the whole base model (twice on ZeRO-2: module and "frozen fragments") per save.
        self.model.save_checkpoint(
            str(folder / "engine"), tag="state", save_latest=False, exclude_frozen_parameters=True
        )

    def load_optimizer(self, folder: Path, rank: int) -> None:
        check_deepspeed_checkpoint(folder / "engine")
        path, _ = self.model.load_checkpoint(str(folder / "engine"), tag="state", load_module_strict=False)
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not load its engine state")


def check_deepspeed_checkpoint(folder: Path) -> None:
    """Refuse a DeepSpeed checkpoint folder unless every ``.pt`` file in it is data only.

    DeepSpeed's ``load_checkpoint`` reads its files with ``torch.load(weights_only=False)``, which runs any
    code a planted pickle carries. Each file is first loaded here with ``weights_only=True`` (tensors
    memory-mapped, so the check reads little more than the pickles), allowing only the three DeepSpeed
    classes its ZeRO checkpoints hold; DeepSpeed's own load then only ever sees files that passed.

    Raises:
        CheckpointError: the folder is missing, or a file in it holds more than data.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no DeepSpeed engine state")
    for path in sorted(folder.rglob("*.pt")):
        load_data_file(path, (LossScaler, ZeroStageEnum, fragment_address), mmap=True)


def deepspeed_config(
    path: str,
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    max_grad_norm: float | None,
    mixed_precision: str,
) -> dict[str, Any]:
    """Read a shipped ZeRO JSON and fill its ``"auto"`` fields from the training config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such DeepSpeed config file")
    config = json.loads(p.read_text())
    filled = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(f"{p}: {key} is {config[key]!r} but the training config implies {value!r}")
    config.setdefault("bf16", {})["enabled"] = mixed_precision == "bf16"
    return config
