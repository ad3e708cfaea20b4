"""Train LLaVA-UHD from a YAML config (stage 1, stage 2, or the debug-cpu recipe).

Examples:
    llava-uhd train --config configs/train/debug-cpu.yaml
    llava-uhd train --config configs/train/stage1.yaml --set data.train=blip_558k.json --set output_dir=runs/s1
    torchrun --nproc_per_node=8 -m llava_uhd.cli train --config configs/train/stage2.yaml --resume

``--resume`` alone continues from the latest checkpoint in the output folder (a fresh start when there is
none); ``--resume DIR`` from that checkpoint.
"""

from __future__ import annotations

import argparse
import logging

HELP = "train a stage (resampler alignment or instruction tuning) from a YAML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML, e.g. configs/train/stage1.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value), e.g. --set optim.lr=1e-4; repeatable",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir, or from CHECKPOINT",
    )
    parser.add_argument(
        "--on-bad-sample",
        choices=("error", "skip"),
        default=None,
        help="a bad record (missing/corrupt image, malformed turns) stops the run, or is skipped and "
        "written with its reason to the skip file (same as --set data.on_bad_sample=...)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from llava_uhd.train.config import TrainConfig

    overrides = list(args.overrides)
    if args.on_bad_sample is not None:
        overrides.append(f"data.on_bad_sample={args.on_bad_sample}")
    config = TrainConfig.load(args.config, overrides).resolved()
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    import os

    rank = int(os.environ.get("RANK", "0"))
    # rank 0 logs only (STYLE.md habit 7); the others report warnings and errors
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from llava_uhd.train.entry import run_training

    result = run_training(config, resume=args.resume)
    if rank == 0:
        print(
            f"trained {result.global_step} steps; last loss {result.last_loss:.4f}"
            + (f"; eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
            + f"; checkpoint {result.checkpoint}"
        )
    return 0
