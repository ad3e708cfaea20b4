"""Training stages as data (paper section 4.1 "Implementation details"; docs/design.md section 7).

A stage names the submodules of ``LlavaUHDForConditionalGeneration`` that train, which pieces of an
image the data pipeline feeds (stage 1 sees only the overview), and its recipe defaults (learning rate,
global batch). :func:`apply_stage` turns a stage plus the run's options into ``requires_grad`` flags; the
exact trainable parameter set of each stage is asserted by tests/test_stages.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from llava_uhd.errors import ConfigError

PieceSelection = Literal["overview", "all"]
Task = Literal["language", "dense_vision", "dense_resampler"]

# Submodule names of the composed model (INTERFACES.md, "Model").
VISION = "vision_tower"
RESAMPLER = "resampler"
LANGUAGE = "language_model"
DENSE_HEADS = "dense_heads"  # stage 0's per-patch heads (llava_uhd.model.dense_heads)
DENSE_DECODER = "dense_decoder"  # the resampler's dense decoder of stage 0_resampler (same module)


@dataclass(frozen=True)
class StageSpec:
    """What one stage trains and sees, and the paper's hyperparameters for it."""

    name: str
    train_modules: tuple[str, ...]
    pieces: PieceSelection
    lr: float
    global_batch_size: int
    template: str | None  # conversation template; None = the preset's (vicuna_v1 for the paper)
    # "dense_vision": the tower alone, on per-patch targets (stage 0); "dense_resampler": the same targets
    # read back through the resampler's tokens (stage0_resampler)
    task: Task = "language"


STAGES: dict[str, StageSpec] = {
    # Stage 0 stands in for CLIP's pretraining where no CLIP weights exist: the tower and its dense heads
    # learn to read synthdoc pages patch by patch, then stay frozen (llava_uhd.train.dense_stage).
    "stage0": StageSpec(
        "stage0",
        (VISION, DENSE_HEADS),
        "all",
        lr=1.5e-3,
        global_batch_size=1,
        template=None,
        task="dense_vision",
    ),
    # Between stage 0 and stage 1: the fresh resampler learns to keep what the frozen tower reads (which
    # character where, inside which colour) in its tokens, by redrawing the dense targets from them.
    "stage0_resampler": StageSpec(
        "stage0_resampler",
        (RESAMPLER, DENSE_DECODER),
        "all",
        lr=1e-3,
        global_batch_size=1,
        template=None,
        task="dense_resampler",
    ),
    # Stage 1 aligns the fresh resampler to a frozen ViT and LLM on captions, overview only, lr 1e-3, batch 256.
    "stage1": StageSpec("stage1", (RESAMPLER,), "overview", lr=1e-3, global_batch_size=256, template="plain"),
    # Stage 2 instruction-tunes the resampler and the LLM on slices + overview, lr 2e-5, batch 128.
    "stage2": StageSpec(
        "stage2", (RESAMPLER, LANGUAGE), "all", lr=2e-5, global_batch_size=128, template=None
    ),
}


def get_stage(name: str) -> StageSpec:
    """The stage called ``name``; a :class:`ConfigError` lists the known ones otherwise."""
    if name not in STAGES:
        raise ConfigError(f"unknown training stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name]


def trainable_modules(
    stage: StageSpec, train_vit: bool = False, lora: bool = False, train_llm: bool = False
) -> tuple[str, ...]:
    """Submodules whose parameters train fully. With LoRA the LLM trains only through its adapters."""
    modules = list(stage.train_modules)
    if train_vit and VISION not in modules:
        modules.append(VISION)
    if train_llm and LANGUAGE not in modules:
        modules.append(LANGUAGE)
    if lora and LANGUAGE in modules:
        modules.remove(LANGUAGE)
    return tuple(modules)


def apply_stage(
    model: nn.Module, stage: StageSpec, train_vit: bool = False, lora: bool = False, train_llm: bool = False
) -> list[str]:
    """Freeze everything, then unfreeze the stage's submodules; return the trainable names, sorted.

    With ``lora`` the language model is expected to carry peft adapters already: only parameters whose
    name contains ``lora_`` train inside it (and only when the stage trains the LLM at all).
    """
    modules = trainable_modules(stage, train_vit=train_vit, lora=lora, train_llm=train_llm)
    for name in modules:
        if not isinstance(getattr(model, name, None), nn.Module):
            raise ConfigError(f"stage {stage.name!r} trains {name!r}, but the model has no such submodule")
    train_adapters = lora and (LANGUAGE in stage.train_modules or train_llm)
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        param.requires_grad_(top in modules or (train_adapters and top == LANGUAGE and "lora_" in name))
    names = trainable_parameter_names(model)
    if not names:
        raise ConfigError(f"stage {stage.name!r} leaves no trainable parameters (modules {modules})")
    return names


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Sorted names of the parameters with ``requires_grad``."""
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)
