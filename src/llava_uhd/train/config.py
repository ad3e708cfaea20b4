"""The typed training configuration: YAML in, ``--set key=value`` overrides, resolved YAML out.

One :class:`TrainConfig` describes a whole run: which stage (docs/design.md section 7), where the model and
data come from, the optimiser, the batch geometry, scale-out and checkpointing. Values left ``None``
fall back to the stage's recipe (:mod:`llava_uhd.train.stages`); :meth:`TrainConfig.resolved` fills them
in, and the resolved config is what every checkpoint stores. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from llava_uhd.errors import ConfigError
from llava_uhd.serialize import dump_yaml, from_plain, load_yaml_file, to_plain

MixedPrecision = Literal["no", "bf16"]
Backend = Literal["ddp", "fsdp", "deepspeed"]
BadSamplePolicy = Literal["error", "skip"]
Schedule = Literal["cosine", "constant"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from; exactly one of three sources (checked in ``__post_init__``).

    * ``preset`` alone: random init from the preset (tiny, for tests and the debug recipe);
    * ``vision_path`` + ``text_path``: a CLIP folder and a causal-LM folder, the resampler fresh;
    * ``pretrained``: a saved LlavaUHD folder (``save_pretrained`` format).

    ``tokenizer`` is a tokenizer folder; ``None`` means the LLM folder's (or the built-in test tokenizer
    for a preset). ``init_from`` is a stage-1 checkpoint or saved model whose resampler weights start
    this run (stage 2 of the paper starts from stage 1's resampler); ``init_modules`` names the top-level
    modules it copies (e.g. ``[vision_tower]`` to start from a stage-0 tower).
    """

    preset: str = "tiny"
    pretrained: str | None = None
    vision_path: str | None = None
    text_path: str | None = None
    tokenizer: str | None = None
    init_from: str | None = None
    init_modules: tuple[str, ...] = ("resampler",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_modules", tuple(self.init_modules))
        _check(bool(self.init_modules), "model.init_modules must name at least one module")
        _check(
            (self.vision_path is None) == (self.text_path is None),
            f"model.vision_path and model.text_path go together, got {self.vision_path!r} and {self.text_path!r}",
        )
        _check(
            self.pretrained is None or self.vision_path is None,
            f"model.pretrained ({self.pretrained!r}) excludes model.vision_path/text_path",
        )


@dataclass(frozen=True)
class DataConfig:
    """Training and evaluation data (LLaVA JSON/JSONL), or synthetic data when ``train`` is unset."""

    train: str | None = None
    image_folder: str | None = None
    eval: str | None = None
    synthetic_samples: int = 0  # > 0 with train unset: generate this many synthetic samples (llava_uhd.synth)
    synthetic_eval_samples: int = 0
    max_length: int = 2048  # the paper recipe (docs/design.md section 7)
    template: str | None = None  # None: the stage's (plain in stage 1, the preset's in stage 2)
    group_by_length: bool = True
    num_workers: int = 0
    on_bad_sample: BadSamplePolicy = "error"
    # image paths that are absolute or resolve outside image_folder (symlinks followed) are bad samples
    # unless this is true
    allow_outside_image_folder: bool = False
    # with every evaluation, score the model on this many synthdoc validation pages (llava_uhd.eval.synthdoc)
    synthdoc_eval_pages: int = 0
    # which pieces of each image to feed; None: the stage's (stage 1 of the paper feeds the overview alone)
    pieces: Literal["overview", "all"] | None = None

    def __post_init__(self) -> None:
        _check(
            self.pieces in (None, "overview", "all"),
            f"data.pieces must be overview, all or null, got {self.pieces!r}",
        )
        _check(
            self.train is not None or self.synthetic_samples > 0,
            "data.train (a LLaVA JSON/JSONL file) or data.synthetic_samples > 0 is required",
        )
        _check(self.max_length >= 1, f"data.max_length must be >= 1, got {self.max_length!r}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers!r}")
        _check(
            self.synthetic_samples >= 0 and self.synthetic_eval_samples >= 0,
            f"synthetic sample counts must be >= 0, got {self.synthetic_samples!r}, {self.synthetic_eval_samples!r}",
        )
        _check(
            self.on_bad_sample in get_args(BadSamplePolicy),
            f"data.on_bad_sample must be one of {get_args(BadSamplePolicy)}, got {self.on_bad_sample!r}",
        )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine schedule and linear warmup; ``lr`` ``None`` takes the stage's rate."""

    lr: float | None = None
    weight_decay: float = 0.0  # the paper recipe trains without weight decay (docs/design.md section 7)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: Schedule = "cosine"
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.lr is None or self.lr > 0, f"optim.lr must be > 0, got {self.lr!r}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(
            0.0 <= self.warmup_ratio < 1.0, f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}"
        )
        _check(
            self.schedule in get_args(Schedule),
            f"optim.schedule must be cosine or constant, got {self.schedule!r}",
        )
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}",
        )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(len(self.betas) == 2, f"optim.betas needs two values, got {self.betas!r}")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the language model (peft); ``r == 0`` means off (the LLM trains fully in stage 2)."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        _check(self.r >= 0, f"lora.r must be >= 0, got {self.r!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class DenseConfig:
    """Stage 0 (vision pretraining on synthdoc pages, :mod:`llava_uhd.train.dense_stage`)."""

    windows: int = 24  # windows around characters per page
    window_patches: int = 8  # window side in patches
    full_page_every: int = 8  # every n-th page also trains on all of its pieces whole (0: never)
    no_glyph_weight: float = 0.03  # weight of the "no character here" class: most sub-cells hold none
    colour_weight: float = 0.5
    colour_jitter: int = 12  # border colour jitter of training pages, in levels per channel
    probe_documents: int = 40  # held-out pages the probe reads at every evaluation

    def __post_init__(self) -> None:
        for name in ("windows", "full_page_every", "colour_jitter", "probe_documents"):
            _check(getattr(self, name) >= 0, f"dense.{name} must be >= 0, got {getattr(self, name)!r}")
        _check(self.window_patches >= 1, f"dense.window_patches must be >= 1, got {self.window_patches!r}")
        _check(
            self.no_glyph_weight > 0 and self.colour_weight >= 0,
            f"dense weights must be positive, got {self.no_glyph_weight!r}, {self.colour_weight!r}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. See the module docstring; ``None`` fields come from the stage recipe."""

    stage: str
    output_dir: str
    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic_samples=16))
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    global_batch_size: int | None = None  # samples per optimiser step over all ranks
    micro_batch_size: int = 1  # samples per forward on one rank
    epochs: int = 1
    max_steps: int | None = None  # stop early (debugging); the schedule still spans max_steps
    train_vit: bool = (
        False  # the paper's text says the ViT is updated in stage 2; the released code freezes it
    )
    # train the LLM in stage 1 too: a language model trained from scratch learns its words on the captions
    train_llm: bool = False
    # keep the frozen tower's features of every piece in memory: later epochs skip the tower (exact)
    cache_vision_features: bool = False
    feature_cache_dir: str | None = None  # keep the cached features there for later runs (stage 2)
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = "no"
    backend: Backend = "ddp"  # ddp also covers one process
    deepspeed_config: str | None = None
    find_unused_parameters: bool = True  # text-only batches leave the resampler without gradients
    save_every: int = 0  # optimiser steps between checkpoints; 0 means only at the end
    keep_last: int = 2
    log_every: int = 1
    eval_every: int = 0
    seed: int = 0
    deterministic: bool = False
    tensorboard: bool = True  # used when installed

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir is required")
        _check(
            self.global_batch_size is None or self.global_batch_size >= 1,
            f"global_batch_size must be >= 1, got {self.global_batch_size!r}",
        )
        _check(self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs!r}")
        _check(
            self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps!r}"
        )
        _check(
            self.mixed_precision in get_args(MixedPrecision),
            f"mixed_precision must be one of {get_args(MixedPrecision)}, got {self.mixed_precision!r}",
        )
        _check(
            self.backend in get_args(Backend),
            f"backend must be one of {get_args(Backend)}, got {self.backend!r}",
        )
        _check(
            self.backend != "deepspeed" or self.deepspeed_config is not None,
            "backend deepspeed needs deepspeed_config (e.g. configs/deepspeed/zero2.json)",
        )
        for name in ("save_every", "eval_every"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        _check(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last!r}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every!r}")

    # -- stage defaults ------------------------------------------------------------------------------

    def resolved(self) -> TrainConfig:
        """A copy with every stage default filled in (the stage must exist)."""
        from llava_uhd.train.stages import get_stage

        stage = get_stage(self.stage)
        optim = self.optim if self.optim.lr is not None else replace(self.optim, lr=stage.lr)
        batch = self.global_batch_size if self.global_batch_size is not None else stage.global_batch_size
        return replace(self, optim=optim, global_batch_size=batch)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimiser step on each rank: global = micro * world * accumulation."""
        batch = self.resolved().global_batch_size
        assert batch is not None
        per_step = self.micro_batch_size * world_size
        _check(
            batch % per_step == 0,
            f"global_batch_size {batch} is not a multiple of micro_batch_size {self.micro_batch_size} "
            f"x world size {world_size}",
        )
        return batch // per_step

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return from_plain(cls, data, "train config")

    def to_yaml(self) -> str:
        return dump_yaml(self)

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides (dotted keys, YAML values)."""
        data = load_yaml_file(Path(path), "training config")
        return cls.from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML (``1e-4``, ``true``, ``[1,2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key.strip()), f"--set expects key=value, got {item!r}")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            _check(isinstance(child, dict), f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data
