"""One training run from a :class:`TrainConfig`: build, train, checkpoint, save the final model.

The output folder holds ``checkpoints/`` (resumable), ``metrics.jsonl``, ``skipped.jsonl`` (bad samples
with ``on_bad_sample: skip``), ``config.yaml`` (resolved) and ``final/``: the model and processor in the
``save_pretrained`` format the inference code loads (a plain model: LoRA adapters merged, on every backend).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llava_uhd.errors import ConfigError
from llava_uhd.train import parallel
from llava_uhd.train.checkpointing import latest_checkpoint
from llava_uhd.train.config import TrainConfig
from llava_uhd.train.loop import TrainData, Trainer, TrainResult
from llava_uhd.train.lora import LoraLayout, check_plain_state, lora_layout, merge_lora_state, plain_model
from llava_uhd.train.setup import build_model, build_processor, prepare_model
from llava_uhd.train.stages import StageSpec, get_stage

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
SKIP_LOG = "skipped.jsonl"
SYNTH_DIR = "synthetic"
# stage 1 trains on captions; stage 2 on the instruction mix (captions, questions, text-only turns)
SYNTH_KINDS = {"overview": ("caption",), "all": ("caption", "qa", "text")}


def _synthetic(
    config: TrainConfig, stage: StageSpec, rank: int, split: str, n: int, seed: int
) -> tuple[Path, Path]:
    """Generate (rank 0) or wait for a synthetic LLaVA JSON; returns (json path, image folder)."""
    from llava_uhd.synth.dataset import make_dataset

    folder = Path(config.output_dir) / SYNTH_DIR / split
    if rank == 0:
        make_dataset(folder, n=n, seed=seed, kinds=SYNTH_KINDS[stage.pieces])
    parallel.barrier()
    return folder / "data.json", folder / "images"


def build_data(config: TrainConfig, stage: StageSpec, processor: Any, rank: int) -> TrainData:
    """Datasets, collate and lengths for the loop."""
    from llava_uhd.data import LlavaCollator, LlavaDataset, read_skip_log

    data = config.data
    template = data.template or stage.template or processor.preset.template
    skip_log = Path(config.output_dir) / SKIP_LOG
    common = {
        "processor": processor,
        "template": template,
        "max_length": data.max_length,
        "overview_only": (data.pieces or stage.pieces) == "overview",
        "on_bad_sample": data.on_bad_sample,
        "seed": config.seed,
        "allow_outside_image_folder": data.allow_outside_image_folder,
    }
    if data.train is not None:
        train_path, image_folder = Path(data.train), data.image_folder
    else:
        train_path, image_folder = _synthetic(
            config, stage, rank, "train", data.synthetic_samples, config.seed
        )
    train = LlavaDataset(train_path, image_folder, skip_log=skip_log, **common)
    eval_set = None
    if data.eval is not None:
        eval_set = LlavaDataset(Path(data.eval), data.image_folder, **common)
    elif data.train is None and data.synthetic_eval_samples > 0:
        eval_path, eval_images = _synthetic(
            config, stage, rank, "eval", data.synthetic_eval_samples, config.seed + 1
        )
        eval_set = LlavaDataset(eval_path, eval_images, **common)
    # skip: every record is checked once up front, the bad ones reported (by rank 0) and never drawn
    usable = train.usable_indices(report=rank == 0) if data.on_bad_sample == "skip" else None
    return TrainData(
        dataset=train,
        eval_metrics=_synthdoc_metrics(processor, data.synthdoc_eval_pages, config.seed),
        collate=LlavaCollator.for_tokenizer(processor.tokenizer),
        lengths=train.lengths() if data.group_by_length else None,
        usable=usable,
        eval_dataset=eval_set,
        skipped=lambda: len(read_skip_log(skip_log)),
    )


def _synthdoc_metrics(processor: Any, pages: int, seed: int) -> Any:
    """The synthdoc accuracy of the model on ``pages`` validation pages, flattened for metrics.jsonl."""
    if pages <= 0:
        return None

    def metrics(model: torch.nn.Module) -> dict[str, Any]:
        from llava_uhd.eval.synthdoc import evaluate_synthdoc

        report = evaluate_synthdoc(model, processor, pages, seed=seed, split="validation")
        return {f"synthdoc_{k}": v["accuracy"] for k, v in report["targets"].items()}

    return metrics


def resolve_resume(config: TrainConfig, resume: bool | str | Path) -> Path | None:
    """``True``: the latest checkpoint in the output folder (None on a fresh folder); a path: that one."""
    if resume is False or resume is None:
        return None
    if resume is True:
        found = latest_checkpoint(config.output_dir)
        if found is None:
            logger.info("no checkpoint in %s; starting fresh", config.output_dir)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {str(resume)!r}: no such checkpoint folder")
    return path


def run_training(config: TrainConfig, resume: bool | str | Path = False) -> TrainResult:
    """Train ``config`` end to end; every rank calls this (under torchrun, or alone)."""
    config = config.resolved()
    stage = get_stage(config.stage)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    rank, _, _ = parallel.init_distributed()
    output = Path(config.output_dir)
    if rank == 0:
        if output.exists() and not output.is_dir():
            raise ConfigError(f"output_dir {str(output)!r} exists and is not a folder")
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(config.to_yaml())
    parallel.barrier()
    if stage.task in ("dense_vision", "dense_resampler"):
        return _run_dense(config, stage, resume, output, rank)
    processor = build_processor(config)
    data = build_data(config, stage, processor, rank)  # bad data stops the run before a model is built
    model = build_model(config, processor)
    trainable = prepare_model(model, config, stage)
    cache = None
    if config.cache_vision_features:
        from llava_uhd.model.feature_cache import FrozenFeatureCache

        cache = FrozenFeatureCache(model.vision_tower, config.feature_cache_dir).install()
    layout = lora_layout(model)  # read before an engine wraps (and, on FSDP, renames) the modules
    logger.info(
        "stage %s: %d trainable tensors, %d parameters",
        stage.name,
        len(trainable),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    trainer = Trainer(config, model, data)
    result = trainer.fit(resume_from=resolve_resume(config, resume))
    if cache is not None:
        logger.info("feature cache: %d hits, %d misses", cache.hits, cache.misses)
        if rank == 0:
            cache.save()
    _save_final(trainer, model, processor, output / FINAL_DIR, rank, layout)
    parallel.shutdown()
    return result


def _run_dense(
    config: TrainConfig, stage: StageSpec, resume: bool | str | Path, output: Path, rank: int
) -> TrainResult:
    """Stage 0 (the preset's vision tower and dense heads) or stage0_resampler (tower, resampler and its
    dense decoder) on synthdoc pages; ``final/`` holds every module of the run."""
    from llava_uhd.config import get_preset
    from llava_uhd.train import dense_stage

    preset = get_preset(config.model.preset)
    torch.manual_seed(config.seed)
    model = dense_stage.build_model(preset, stage.task)
    trainable = prepare_model(model, config, stage)
    cache = None
    if config.cache_vision_features:  # stage0_resampler on the pages stages 1-2 read: their cached features
        from llava_uhd.model.feature_cache import FrozenFeatureCache

        cache = FrozenFeatureCache(model.vision_tower, config.feature_cache_dir).install()
    logger.info("stage %s: %d trainable tensors", stage.name, len(trainable))
    trainer = Trainer(config, model, dense_stage.build_data(config, preset.slicing))
    result = trainer.fit(resume_from=resolve_resume(config, resume))
    gathered = trainer.engine.full_state_dict()
    if cache is not None:
        logger.info("feature cache: %d hits, %d misses", cache.hits, cache.misses)
        if rank == 0:
            cache.save()
    if rank == 0:
        dense_stage.save_final(gathered, preset, output / FINAL_DIR)
    parallel.shutdown()
    return result


def _save_final(
    trainer: Trainer,
    model: torch.nn.Module,
    processor: Any,
    folder: Path,
    rank: int,
    layout: LoraLayout | None,
) -> None:
    """Model + processor in the ``save_pretrained`` format (full weights gathered on sharded backends).

    With LoRA the adapters are folded into the gathered weights on rank 0 and saved under a meta-device
    plain model (names and config only), so no process ever holds the merged model as a module.
    """
    gathered = trainer.engine.full_state_dict()  # collective on FSDP / ZeRO-3: every rank calls it
    if rank == 0:
        state = {k: v.cpu() for k, v in gathered.items()}
        target = model
        if layout is not None:
            state = merge_lora_state(state, layout)
            target = plain_model(model)
            check_plain_state(state, target)
        target.save_pretrained(str(folder), state_dict=state)
        processor.save_pretrained(str(folder))
        logger.info("final model saved to %s", folder)
    parallel.barrier()
