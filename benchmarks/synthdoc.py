"""How well the bundled synthdoc model reads: exact match per question kind and page size on the test split,
the same questions with the slices withheld (the overview alone, what a single low-resolution view gives),
the stage-0 probe of the frozen tower, and the training curves of the run that made the model.

    python benchmarks/synthdoc.py [--model DIR] [--pages 200] [--runs RUNS] [--write-readme]

``--runs`` is the folder scripts/train_synthdoc.sh trained in (for the probe and the curves).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llava_uhd.auto import load_pretrained
from llava_uhd.bundled import model_dir
from llava_uhd.eval.synthdoc import evaluate_synthdoc
from readme_section import write_section

HEADING = "## synthdoc demo model (`benchmarks/synthdoc.py`)"


def _pct(rate: dict) -> str:
    return (
        "-"
        if rate["accuracy"] is None
        else f"{100 * rate['accuracy']:.1f}% ({rate['correct']}/{rate['total']})"
    )


def accuracy_table(full: dict, blind: dict) -> str:
    rows = [
        "| question | pages | slices + overview | overview alone |",
        "| --- | --- | --- | --- |",
    ]
    for name, label in (
        ("code_long_ge_900", "code, long side >= 900 px"),
        ("code_long_lt_900", "code, long side < 900 px"),
        ("count", "count"),
        ("colour", "colour"),
    ):
        rows.append(
            f"| {label} | {full['documents']} | {_pct(full['targets'][name])} | {_pct(blind['targets'][name])} |"
        )
    rows.append("")
    rows.append("| code questions by long side | slices + overview | overview alone |")
    rows.append("| --- | --- | --- |")
    for bucket, rate in full["by_bucket"]["code"].items():
        other = blind["by_bucket"]["code"].get(bucket, {"accuracy": None, "correct": 0, "total": 0})
        rows.append(f"| {bucket} px | {_pct(rate)} | {_pct(other)} |")
    return "\n".join(rows)


def _records(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        return []
    return [
        r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if key in r
    ]


def _probe_table(run: Path, title: str) -> list[str]:
    """The probe records of one stage-0 run as a markdown table under ``title`` (nothing without them)."""
    probe = _records(run / "metrics.jsonl", "slice_char_acc")
    if not probe:
        return []
    return [
        "",
        title,
        "",
        "| step | wall min | slice chars | slice codes | overview chars |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r['step']} | {r['wall_s'] / 60:.0f} | {r['slice_char_acc']:.3f} | {r['slice_code_acc']:.3f} "
            f"| {r['overview_char_acc']:.3f} |"
            for r in probe
        ),
    ]


def curves(runs: Path) -> str:
    lines = []
    lines += _probe_table(runs / "stage0", "Stage 0 (probe on 60 validation pages at each evaluation):")
    lines += _probe_table(
        runs / "stage0-resampler",
        "Stage 0 of the resampler (the probe read through its 36 tokens by the dense decoder):",
    )
    qa = _records(runs / "stage2" / "metrics.jsonl", "synthdoc_count")
    if qa:
        lines += ["", "Stage 2 (all questions of 16 validation pages at each evaluation):", ""]
        lines += [
            "| step | wall min | code >= 900 | code < 900 | count | colour |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines += [
            f"| {r['step']} | {r['wall_s'] / 60:.0f} | {fmt(r['synthdoc_code_long_ge_900'])} | "
            f"{fmt(r['synthdoc_code_long_lt_900'])} | {fmt(r['synthdoc_count'])} | {fmt(r['synthdoc_colour'])} |"
            for r in qa
        ]
    for stage in ("stage0-warmup", "stage0", "stage0-resampler", "stage1", "stage2"):
        losses = _records(runs / stage / "metrics.jsonl", "loss")
        if losses:
            lines.append(
                f"\n{stage}: {losses[-1]['step']} steps, {losses[-1]['wall_s'] / 60:.0f} wall minutes, "
                f"loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}"
            )
    return "\n".join(lines)


def stage0_probe(runs: Path, pages: int) -> str:
    from llava_uhd.config import Preset
    from llava_uhd.model.weights import read_state_dict
    from llava_uhd.train.dense_stage import build_model, probe

    folder = runs / "stage0" / "final"
    if not folder.is_dir():
        return ""
    preset = Preset.load(folder / "preset.yaml")
    model = build_model(preset)
    model.load_state_dict(read_state_dict(folder))
    result = probe(model, preset.slicing, pages, split="test")
    return (
        f"Stage-0 probe of the frozen tower on {pages} test pages (each drawn character read off the glyph head "
        f"at its true place): slices {result['slice_char_acc']:.3f} per character over {result['slice_chars']} "
        f"characters, {result['slice_code_acc']:.3f} per whole code; overview {result['overview_char_acc']:.3f} "
        f"per character, {result['overview_code_acc']:.3f} per code."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="a saved model (default: the bundled one)")
    parser.add_argument("--pages", type=int, default=200, help="test pages (every question of each)")
    parser.add_argument("--probe-pages", type=int, default=170, help="test pages for the stage-0 probe")
    parser.add_argument(
        "--runs", type=Path, default=None, help="the training folder, for the probe and curves"
    )
    parser.add_argument(
        "--write-readme", action="store_true", help="rewrite this section of benchmarks/README.md"
    )
    args = parser.parse_args()
    folder = model_dir(args.model)
    model, processor = load_pretrained(folder)
    start = time.perf_counter()
    full = evaluate_synthdoc(model, processor, args.pages)
    blind = evaluate_synthdoc(model, processor, args.pages, max_slices=1)
    took = time.perf_counter() - start
    body = [
        f"`python benchmarks/synthdoc.py --pages {args.pages}` on {'the bundled model' if args.model is None else folder}: "
        f"{full['questions']} questions about {args.pages} test pages (a split no training run saw), exact match, "
        f"greedy; the same questions with the slices withheld (the overview alone) in the same run "
        f"({took:.0f} s for both on this machine).",
        "",
        accuracy_table(full, blind),
    ]
    if args.runs is not None:
        body += ["", stage0_probe(args.runs, args.probe_pages), "", curves(args.runs)]
    text = "\n".join(body)
    print(text)
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
