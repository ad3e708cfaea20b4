"""The training loop: one loop for one process, DDP, FSDP and DeepSpeed (see :mod:`.parallel`).

Each optimiser step takes a global batch of G samples (docs/design.md section 7: 256 in stage 1, 128 in stage
2) as A micro-batches on each of W ranks. The loss of a step is the mean over *every supervised token of
the global batch*: each micro-batch contributes ``sum of its token losses * W / tokens in the global
batch`` (the token count is summed over ranks before the first backward), and the engines sum
micro-batches and average ranks. So a step's gradient does not depend on how the batch is split, and a
2-process run follows a 1-process run with the same global batch up to float summation order. That holds
for stage 2's mix of image and text-only samples too: on sharded engines a text-only micro-batch carries an
idle piece (:mod:`.idle_piece`) so that every rank runs the vision path, and every engine steps a
parameter that no rank used with a zero gradient (:func:`.parallel.zero_missing_gradients`).

Dimensions: B micro-batch, T text length, V vocabulary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from llava_uhd.errors import CheckpointError, ConfigError
from llava_uhd.model.weights import read_state_dict
from llava_uhd.templates import IGNORE_INDEX
from llava_uhd.train import parallel
from llava_uhd.train.batches import BatchGeometry, StepLoader, epoch_order, rank_steps
from llava_uhd.train.checkpointing import (
    MODEL_FILE,
    CheckpointIO,
    TrainerState,
    check_compatible,
    load_data_file,
    restore_rng,
)
from llava_uhd.train.config import TrainConfig
from llava_uhd.train.idle_piece import IdlePiece
from llava_uhd.train.lora import adapter_modules
from llava_uhd.train.metrics import MetricsLogger
from llava_uhd.train.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "piece_grids")


class Objective(Protocol):
    """What a step minimises: a loss summed over a micro-batch's supervised units, and their count.

    The loop divides the sums by the count over the whole global batch (see the module docstring).
    """

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss_sum(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class TokenObjective:
    """Next-token cross-entropy over the supervised (assistant) tokens: stages 1 and 2."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return supervised_tokens(batch)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
        return token_loss_sum(logits, batch["labels"])


@dataclass
class TrainData:
    """What the loop needs from the data side (built by :mod:`llava_uhd.train.entry`)."""

    dataset: Any
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    lengths: Sequence[int] | None = None  # for length grouping (one per sample); None = plain shuffle
    usable: Sequence[int] | None = None  # the sample indices an epoch draws from; None = all
    eval_dataset: Any | None = None
    skipped: Callable[[], int] = field(default=lambda: 0)  # samples skipped so far (all workers)
    objective: Objective = field(default_factory=TokenObjective)
    # extra metrics logged with every evaluation (stage 0's glyph probe), computed on rank 0's model
    eval_metrics: Callable[[nn.Module], dict[str, Any]] | None = None


@dataclass
class TrainResult:
    global_step: int
    last_loss: float
    eval_loss: float | None
    checkpoint: Path | None
    history: list[dict[str, Any]]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies and the number of supervised tokens.

    logits (B, T, V) predict position t+1 from position t, so labels are shifted by one as in every causal LM.
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = nn.functional.cross_entropy(
        shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class Trainer:
    """Runs one :class:`TrainConfig` over a model whose trainable parameters the stage already chose."""

    def __init__(self, config: TrainConfig, model: nn.Module, data: TrainData) -> None:
        self.config = config.resolved()
        self.module = model
        self.data = data
        self.rank, self.world_size, self.device = parallel.init_distributed()
        assert self.config.global_batch_size is not None
        self.geometry = BatchGeometry(
            self.config.global_batch_size, self.config.micro_batch_size, self.world_size
        )
        usable = len(data.dataset) if data.usable is None else len(data.usable)
        self.steps_per_epoch = self.geometry.steps_per_epoch(usable)
        if self.steps_per_epoch == 0:
            bad = len(data.dataset) - usable
            raise ConfigError(
                f"{usable} samples{f' ({bad} bad records skipped)' if bad else ''} cannot fill one global "
                f"batch of {self.geometry.global_batch_size}; lower global_batch_size"
            )
        total = self.steps_per_epoch * self.config.epochs
        self.total_steps = min(total, self.config.max_steps) if self.config.max_steps else total
        self.trainable_names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        self.output_dir = Path(self.config.output_dir)
        self.io = CheckpointIO(
            self.output_dir, self.rank, self.world_size, parallel.barrier, self.config.keep_last
        )
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16"
        )
        # sharded engines need every rank to run the vision path in every forward (see .idle_piece)
        self.sharded = self.config.backend != "ddp" and self.world_size > 1
        self.idle_piece = IdlePiece.for_model(model) if self.sharded else None

    # -- setup -----------------------------------------------------------------------------------

    def _build_engine(self) -> parallel.Engine:
        cfg, optim = self.config, self.config.optim
        assert optim.lr is not None

        def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
            return build_optimizer(module, optim.lr, optim.weight_decay, optim.betas, optim.eps)

        self.module.to(self.device)
        if cfg.backend == "fsdp":
            if self.world_size < 2:
                raise ConfigError("backend fsdp needs torchrun with 2 or more processes")
            return parallel.FSDPEngine(
                self.module,
                make_optimizer,
                optim.max_grad_norm,
                self.device,
                own_units=adapter_modules(self.module),
            )
        if cfg.backend == "deepspeed":
            assert cfg.deepspeed_config is not None
            ds = parallel.deepspeed_config(
                cfg.deepspeed_config,
                cfg.micro_batch_size,
                self.geometry.accumulation,
                self.world_size,
                optim.max_grad_norm,
                cfg.mixed_precision,
            )
            return parallel.DeepSpeedEngine(self.module, make_optimizer(self.module), ds)
        return parallel.DDPEngine(
            self.module,
            make_optimizer(self.module),
            optim.max_grad_norm,
            self.world_size,
            cfg.find_unused_parameters,
        )

    def _write_model(self, engine: parallel.Engine) -> Callable[[Path], None]:
        def write(folder: Path) -> None:
            weights = engine.full_state_dict(self.trainable_names)  # collective on sharded backends
            if self.rank == 0:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / MODEL_FILE)
                )

        return write

    def _write_optimizer(self, engine: parallel.Engine, scheduler: Any) -> Callable[[Path], None]:
        def write(folder: Path) -> None:
            engine.save_optimizer(folder, self.rank)
            if self.rank == 0:
                torch.save(scheduler.state_dict(), folder / "scheduler.pt")

        return write

    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated micro-batch on the device, with an idle piece when a sharded engine needs one."""
        if self.idle_piece is not None:
            batch = self.idle_piece.fill(batch)
        return _to_device(batch, self.device)

    def load_trainable(self, folder: Path) -> None:
        """Load a checkpoint's trainable weights into the (unwrapped) model."""
        weights = read_state_dict(folder / MODEL_FILE)  # a damaged file is a CheckpointError
        missing = sorted(set(self.trainable_names) - set(weights))
        if missing:
            raise CheckpointError(
                f"{folder}: checkpoint lacks trainable weights {missing[:5]} (of {len(missing)})"
            )
        self.module.load_state_dict(weights, strict=False)

    # -- the loop --------------------------------------------------------------------------------

    def fit(self, resume_from: Path | None = None) -> TrainResult:
        """Train to the end of the schedule (or ``max_steps``), checkpointing as configured."""
        cfg = self.config
        state = TrainerState.start(
            self.world_size, self.geometry.global_batch_size, cfg.micro_batch_size, self.total_steps
        )
        rng_state = None
        if resume_from is not None:
            state = self.io.load_state(resume_from)
            check_compatible(state, self.geometry.global_batch_size, cfg.micro_batch_size, resume_from)
            self.load_trainable(resume_from)
            rng_state = self.io.load_rng(resume_from)
        engine = self.engine = self._build_engine()
        scheduler = build_scheduler(
            engine.base_optimizer, cfg.optim.schedule, self.total_steps, cfg.optim.warmup_ratio
        )
        if resume_from is not None:
            engine.load_optimizer(resume_from, self.rank)
            scheduler.load_state_dict(load_data_file(resume_from / "scheduler.pt"))
            restore_rng(rng_state)
            logger.info("resumed from %s at step %d", resume_from, state.global_step)
        metrics = MetricsLogger(
            self.output_dir, self.total_steps, state.global_step, self.rank == 0, cfg.tensorboard
        )
        metrics.reset_clock(state.samples_seen)
        config_yaml = cfg.to_yaml()
        history: list[dict[str, Any]] = []
        last_loss, eval_loss, checkpoint = math.nan, None, None
        engine.model.train()
        try:
            while state.global_step < self.total_steps:
                loader = self._epoch_loader(state.epoch, state.step_in_epoch)
                for _, micro_batches in loader:  # the loader starts at state.step_in_epoch
                    last_loss, grad_norm = self._step(engine, micro_batches)
                    scheduler.step()
                    state = state.advance(self.steps_per_epoch)
                    step = state.global_step
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        record = metrics.log(
                            step,
                            state.samples_seen,
                            loss=last_loss,
                            lr=scheduler.get_last_lr()[0],
                            grad_norm=grad_norm,
                            epoch=state.epoch,
                            skipped=self.data.skipped(),
                        )
                        history.append(record)
                    metrics.advance()
                    periodic_eval = cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps
                    if periodic_eval and self._has_eval:
                        eval_loss = self._eval_and_log(engine, metrics, state)
                    if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                        checkpoint = self._save(engine, scheduler, state, config_yaml)
                    if step >= self.total_steps:
                        break
            eval_loss = self._eval_and_log(engine, metrics, state) if self._has_eval else eval_loss
            checkpoint = self._save(engine, scheduler, state, config_yaml)
        finally:
            metrics.close()
        return TrainResult(state.global_step, last_loss, eval_loss, checkpoint, history)

    def _epoch_loader(self, epoch: int, start_step: int) -> StepLoader:
        if hasattr(self.data.dataset, "set_epoch"):
            self.data.dataset.set_epoch(epoch)
        order = epoch_order(
            len(self.data.dataset),
            self.config.seed,
            epoch,
            self.data.lengths,
            self.geometry.global_batch_size,
            self.data.usable,
        )
        steps = rank_steps(order, self.geometry, self.rank)
        return StepLoader(
            self.data.dataset,
            self.data.collate,
            steps,
            start_step,
            self.config.data.num_workers,
            self.config.seed + epoch,
        )

    def _step(
        self, engine: parallel.Engine, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[float, float | None]:
        """One optimiser step over this rank's micro-batches; returns (global mean token loss, grad norm)."""
        objective = self.data.objective
        local_tokens = torch.tensor(float(sum(objective.count(b) for b in micro_batches)))
        global_tokens = max(float(parallel.all_reduce_sum(local_tokens)), 1.0)
        loss_sum = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            batch = self._prepare(batch)
            with engine.gradient_sync(i == len(micro_batches) - 1), self.autocast:
                summed, _ = objective.loss_sum(engine.model, batch)
            engine.backward(summed * self.world_size / global_tokens)
            loss_sum += summed.detach().float().cpu()
        grad_norm = engine.step()
        return float(parallel.all_reduce_sum(loss_sum)) / global_tokens, grad_norm

    @torch.no_grad()
    def evaluate(self, engine: parallel.Engine) -> float:
        """Mean token loss over the eval set (micro-batches split round-robin over ranks)."""
        dataset = self.data.eval_dataset
        m = self.config.micro_batch_size
        batches = [list(range(s, min(s + m, len(dataset)))) for s in range(0, len(dataset), m)]
        mine = batches[self.rank :: self.world_size]
        counted = len(mine)
        if self.sharded:
            # FSDP and ZeRO-3 gather weights inside every forward, so every rank must run as many forwards
            # as the others: a rank short of a batch runs one again and leaves it out of the totals.
            mine += batches[:1] * (-(-len(batches) // self.world_size) - counted)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=mine,
            collate_fn=self.data.collate,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        engine.model.eval()
        totals = torch.zeros(2)
        for index, batch in enumerate(loader):
            batch = self._prepare(batch)
            with self.autocast:
                summed, count = self.data.objective.loss_sum(engine.model, batch)
            if index < counted:
                totals += torch.stack([summed.float().cpu(), count.float().cpu()])
        engine.model.train()
        totals = parallel.all_reduce_sum(totals)
        return float(totals[0] / totals[1].clamp_min(1.0))

    @property
    def _has_eval(self) -> bool:
        return self.data.eval_dataset is not None or self.data.eval_metrics is not None

    def _eval_and_log(
        self, engine: parallel.Engine, metrics: MetricsLogger, state: TrainerState
    ) -> float | None:
        loss = self.evaluate(engine) if self.data.eval_dataset is not None else None
        extra = {}
        if self.data.eval_metrics is not None and self.rank == 0:
            engine.model.eval()
            extra = self.data.eval_metrics(self.module)
            engine.model.train()
        values = {"eval_loss": loss} if loss is not None else {}
        metrics.log(state.global_step, state.samples_seen, **values, **extra)
        metrics.reset_clock(state.samples_seen)
        return loss

    def _save(self, engine: parallel.Engine, scheduler: Any, state: TrainerState, config_yaml: str) -> Path:
        return self.io.save(
            state, config_yaml, self._write_model(engine), self._write_optimizer(engine, scheduler)
        )
