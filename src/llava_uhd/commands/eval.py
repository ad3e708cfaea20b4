"""Run a benchmark over local files with a saved model (the bundled one by default) and score it.

    llava-uhd eval --benchmark NAME --data FILE [--answers GT.jsonl] [--images DIR] [--model DIR] --output DIR
    llava-uhd eval --benchmark synthdoc --documents 20 --synthdoc-seed 0 --output DIR
    llava-uhd eval ... --num-shards N --shard I        # one process / GPU each, then:
    llava-uhd eval ... --num-shards N --merge           # predictions.jsonl and scores.json of the whole run

``--data`` is a LLaVA-style question JSONL (``question_id``, ``image``, ``text``, answers inline or in
``--answers``) or a VLMEvalKit ``.tsv`` with base64 images. Writes ``predictions.jsonl`` (``question_id``,
``prompt``, ``answer`` or ``error``, in data order) and ``scores.json`` (the model, preset, slicing, prompt
convention, decoding settings, counts and the benchmark's scores) into ``--output``, and prints the scores
as one JSON object. ``--resume`` continues a killed run; the result equals an uninterrupted run's, as does
a sharded one (docs/evaluation.md). Exit code 1 if any question could not be answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llava_uhd.commands._common import (
    add_decoding_arguments,
    add_model_arguments,
    check_output_folder,
    decoding_options,
    load_model,
)
from llava_uhd.errors import ConfigError, LlavaUHDError
from llava_uhd.eval.benchmarks import (
    BENCHMARKS,
    Benchmark,
    EvalItem,
    get_benchmark,
    read_question_jsonl,
    read_tsv,
    synthdoc_items,
)

HELP = "run a benchmark (local data or generated synthdoc pages) and score it with its own metric"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, choices=tuple(BENCHMARKS), help="which benchmark")
    parser.add_argument("--data", type=Path, default=None, help="question JSONL or VLMEvalKit TSV")
    parser.add_argument("--answers", type=Path, default=None, metavar="GT.jsonl", help="ground truth JSONL")
    parser.add_argument(
        "--images", type=Path, default=None, metavar="DIR", help="folder of the JSONL's images"
    )
    add_model_arguments(parser, dtype=False)
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="folder for the results")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (8)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--resume", action="store_true", help="keep the complete batches already answered")
    parser.add_argument("--num-shards", type=int, default=1, help="split the run into N shards (1)")
    parser.add_argument("--shard", type=int, default=0, help="which shard this process answers (0)")
    parser.add_argument("--merge", action="store_true", help="merge the shards' predictions and score them")
    parser.add_argument("--ocr", action="store_true", help="textvqa: list the OCR tokens in the prompt")
    parser.add_argument("--max-slices", type=int, default=None, help="cap the slices per image (1: overview)")
    parser.add_argument("--documents", type=int, default=20, help="synthdoc: pages of the test split (20)")
    parser.add_argument("--synthdoc-seed", type=int, default=0, help="synthdoc: dataset seed (0)")
    add_decoding_arguments(parser)
    parser.set_defaults(max_new_tokens=None)


def _items(args: argparse.Namespace, bench: Benchmark) -> list[EvalItem]:
    if args.ocr and bench.name != "textvqa":
        raise ConfigError("--ocr is for --benchmark textvqa only")
    if bench.name == "synthdoc":
        if args.data is not None:
            raise ConfigError(
                "synthdoc pages are generated: give --documents and --synthdoc-seed, not --data"
            )
        if args.documents < 1:
            raise ConfigError(f"--documents must be >= 1, got {args.documents}")
        items = synthdoc_items(bench, args.documents, args.synthdoc_seed)
    elif args.data is None:
        raise ConfigError(f"--benchmark {bench.name} needs --data FILE")
    elif args.data.suffix.lower() == ".tsv":
        items = read_tsv(bench, args.data)
    else:
        items = read_question_jsonl(
            bench, args.data, images=args.images, answers=args.answers, use_ocr=args.ocr
        )
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {args.limit}")
        items = items[: args.limit]
    return items


def _description(args: argparse.Namespace, bench: Benchmark, options: dict[str, Any]) -> dict[str, Any]:
    """What identifies the run without loading the model (checked on --resume and --merge)."""
    data: Any = (
        {"split": "test", "documents": args.documents, "seed": args.synthdoc_seed}
        if bench.name == "synthdoc"
        else str(args.data)
    )
    return {
        "benchmark": bench.name,
        "metric": bench.metric,
        "data": data,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "num_shards": args.num_shards,
        "prompt": {
            "convention": bench.convention,
            "instruction": bench.instruction,
            "ocr_tokens": args.ocr if bench.name == "textvqa" else None,
        },
        "decoding": options,
        "max_slices": args.max_slices,
    }


def run(args: argparse.Namespace) -> int:
    from llava_uhd.eval.runner import (
        check_run,
        load_run,
        merge_shards,
        predictions_path,
        save_run,
        shard_batches,
        write_scores,
    )
    from llava_uhd.inference.generate import GenerationOptions

    bench = get_benchmark(args.benchmark)
    if args.max_new_tokens is None:
        args.max_new_tokens = bench.max_new_tokens
    options = decoding_options(args)
    GenerationOptions(**options)  # refuse bad decoding flags before the model loads
    check_output_folder(args.output, "--output")
    items = _items(args, bench)
    batches = shard_batches(items, args.batch_size, args.num_shards, args.shard)
    description = _description(args, bench, options)
    if args.merge:
        check_run(args.output, description, "merge")
        records = merge_shards(args.output, items, args.batch_size, args.num_shards)
        result = write_scores(args.output, bench.metric, items, records, load_run(args.output) or description)
        print(json.dumps(result["scores"]))
        return 1 if result["counts"]["errors"] else 0
    if args.resume:  # before the model loads: a mismatch in the data or decoding settings is refused at once
        check_run(args.output, description, "resume")
    model, processor = _load(args)
    slicing = processor.slicing
    description |= {
        "model": "bundled" if args.model is None else str(args.model),
        "preset": model.config.preset_name,
        "template": model.config.template,
        "slicing": asdict(slicing) | ({"max_slices": args.max_slices} if args.max_slices else {}),
    }
    if args.resume:
        check_run(args.output, description, "resume")
    save_run(args.output, description)
    path = predictions_path(args.output, args.num_shards, args.shard)
    skipped = _answer(args, model, processor, batches, path, options)
    if args.num_shards > 1:
        print(
            f"shard {args.shard} of {args.num_shards}: {path} ({skipped} batches kept from before);"
            " merge with --merge once every shard is done",
            file=sys.stderr,
        )
        return 0
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    result = write_scores(args.output, bench.metric, items, records, description)
    print(json.dumps(result["scores"]))
    return 1 if result["counts"]["errors"] else 0


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from llava_uhd.model.feature_cache import cache_frozen_tower

    model, processor = load_model(args)
    cache_frozen_tower(model)  # questions about the same image encode it once
    return model, processor


def _answer(
    args: argparse.Namespace,
    model: Any,
    processor: Any,
    batches: list[list[EvalItem]],
    path: Path,
    options: dict[str, Any],
) -> int:
    from tqdm.auto import tqdm

    from llava_uhd.eval.runner import answer_items
    from llava_uhd.inference.batch import Request, answer_batch

    def answer(batch: list[EvalItem]) -> list[tuple[str | None, str | None]]:
        results: list[tuple[str | None, str | None] | None] = [None] * len(batch)
        requests, live = [], []
        for i, item in enumerate(batch):
            try:
                requests.append(Request((item.image(),), item.prompt))
                live.append(i)
            except LlavaUHDError as exc:  # an unreadable image fails its question alone
                results[i] = (None, str(exc))
        answers = (
            answer_batch(model, processor, requests, max_slices=args.max_slices, **options)
            if requests
            else []
        )
        for i, a in zip(live, answers, strict=True):
            results[i] = (a.text, a.error)
        return [r for r in results if r is not None]

    total = sum(len(b) for b in batches)
    with tqdm(total=total, desc=args.benchmark, unit="q", file=sys.stderr, dynamic_ncols=True) as bar:
        return answer_items(answer, batches, path, resume=args.resume, progress=bar.update)
