"""Rescore predictions from any system with a benchmark's own metric; no model is loaded.

    llava-uhd score --metric vqa|anls|relaxed|exact|gqa|pope|mme|mc PRED.jsonl GT.jsonl [--per-item OUT.jsonl]

PRED lines are ``{"question_id", "answer"}``; GT lines ``{"question_id", "answers": [...]}`` plus
``category`` (MME subtask, POPE split), ``image`` (MME pairs) or ``choices`` (mc) where the metric needs
them. The aggregate is printed as one JSON object: ``metric``, ``score``, ``count``, ``missing`` (GT ids
without a prediction, each scored 0), ``extra`` (predictions for ids not in GT) and the metric's own
breakdown. ``--per-item`` writes ``{"question_id", "score"}`` lines in GT order. docs/evaluation.md has
each metric's rules.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_uhd.commands._common import check_output_file
from llava_uhd.eval.scoring import METRICS, score_files

HELP = "score a predictions JSONL against a ground-truth JSONL with a benchmark's metric"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metric", required=True, choices=METRICS, help="the benchmark's metric")
    parser.add_argument("predictions", type=Path, metavar="PRED.jsonl", help="{question_id, answer} lines")
    parser.add_argument(
        "ground_truth", type=Path, metavar="GT.jsonl", help="{question_id, answers, ...} lines"
    )
    parser.add_argument(
        "--per-item", type=Path, default=None, metavar="OUT.jsonl", help="write each question's score"
    )


def run(args: argparse.Namespace) -> int:
    if args.per_item is not None:
        check_output_file(args.per_item, "--per-item")
    aggregate, per_item = score_files(args.metric, args.predictions, args.ground_truth)
    if args.per_item is not None:
        args.per_item.parent.mkdir(parents=True, exist_ok=True)
        args.per_item.write_text("".join(json.dumps(line) + "\n" for line in per_item), encoding="utf-8")
    print(json.dumps(aggregate))
    return 0
