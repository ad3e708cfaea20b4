"""AdamW parameter groups and the learning-rate schedule (docs/design.md section 7: cosine, warmup 3%).

Weight decay is a rule over parameter names and shapes, not a list: vectors (biases, norm gains) and the
learned tables that are *positions* or *queries* rather than weights (the resampler's ``query`` and
``pos_embed``, a ViT's ``class_embedding`` and position table) never decay. The paper recipe uses no weight
decay at all; the rule matters as soon as a run sets one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from llava_uhd.errors import ConfigError

# Name fragments of learned tables that must not decay (shrinking them toward 0 erases positions/queries).
NO_DECAY_NAME_PARTS: tuple[str, ...] = (
    "bias",
    "norm",
    "ln_",
    "query",
    "pos_embed",
    "position_embedding",
    "class_embedding",
)


def decays(name: str, param: torch.Tensor) -> bool:
    """True when ``param`` gets weight decay: matrices and kernels, except queries and position tables."""
    leaf = name.rsplit(".", 2)
    if param.ndim < 2:
        return False
    return not any(part in ".".join(leaf[-2:]) for part in NO_DECAY_NAME_PARTS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` and ``no_decay`` (each with its names)."""
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append((name, param))
    groups = [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; raises :class:`ConfigError` when nothing trains."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters; check the stage and its options")
    # foreach=False keeps the update order fixed across runs, which the bitwise resume test relies on.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as transformers' Trainer computes it: ceil(ratio * total)."""
    return math.ceil(total_steps * warmup_ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup then cosine decay to 0 (or constant) over ``total_steps`` optimiser steps."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if total_steps < 1:
        raise ConfigError(f"a schedule needs at least one optimiser step, got {total_steps}")
    warmup = warmup_steps(total_steps, warmup_ratio)
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ConfigError(f"unknown schedule {schedule!r}; choose cosine or constant")


def group_names(optimizer: torch.optim.Optimizer) -> Iterable[tuple[float, list[str]]]:
    """(weight_decay, parameter names) per group, for logs and tests."""
    return [(g["weight_decay"], list(g.get("names", []))) for g in optimizer.param_groups]
