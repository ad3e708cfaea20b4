"""The paper's central claim at toy scale: LLaVA-UHD's variable slices against a single low-resolution
resize (LLaVA-1.5) and fixed tiles (LLaVA-NeXT), everything else equal. Writes benchmarks/REPRODUCTION.md
and a plot beside it.

    python benchmarks/reproduce.py --stage0 RUNS/stage0/final --runs RUNS/reproduce [--seeds 0 1]

For each encoding (``SlicingConfig.mode`` uhd, resize, anyres) the synthdoc recipe after stage 0 runs
through ``llava-uhd train`` (configs/synthdoc/stage0-resampler.yaml, stage1.yaml, stage2.yaml) with the
encoding's slicing and nothing else changed: the same frozen stage-0 tower (``--stage0``), resampler and
LM sizes, pages, steps, schedule and seeds. ``stage0_resampler`` runs once per encoding (its pieces
differ; its seed is the page seed of the recipe, so it stays 1); stages 1-2 run once per seed. Each
stage-2 model then answers every question of ``--eval-pages`` test pages (exact match, by kind and by
long-side bucket), the frozen tower's glyph probe reads the encoding's pieces, and the plans of the same
pages give visual tokens, ViT patches and forward FLOPs per image.

Every finished step is skipped on a rerun (a stopped training resumes from its checkpoint), so the
command can be restarted after a stop. ``--scale`` shrinks pages and steps for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from llava_uhd.cli import main as llava_uhd
from llava_uhd.config import Preset, SlicingMode
from llava_uhd.errors import ConfigError
from llava_uhd.eval.synthdoc import BUCKETS, bucket_name
from llava_uhd.synth.synthdoc import QUESTION_KINDS, document_seed, make_document

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "synthdoc"
ENCODINGS: dict[SlicingMode, str] = {
    "uhd": "LLaVA-UHD slices",
    "resize": "LLaVA-1.5 resize",
    "anyres": "LLaVA-NeXT tiles",
}
# the recipe's sizes (configs/synthdoc/*.yaml, scripts/train_synthdoc.sh), shrunk by --scale
PAGES = 1600  # training pages of stages 0_resampler, 1 and 2
STAGE2_STEPS = 600
PAGE_SEED = 1  # the pages of the recipe: synthdoc/train/1/...
FINAL = "final"

logger = logging.getLogger("reproduce")


def _scaled(value: int, scale: float, minimum: int = 1) -> int:
    return max(round(value * scale), minimum)


def _train(config: str, output: Path, sets: Sequence[str]) -> None:
    """One ``llava-uhd train`` run, skipped when its ``final/`` exists, else resumed."""
    if (output / FINAL).exists():
        logger.info("%s: done", output)
        return
    logger.info("%s: training (%s)", output, config)
    argv = ["train", "--config", str(CONFIGS / config), "--set", f"output_dir={output}", "--resume"]
    for item in sets:
        argv += ["--set", item]
    if llava_uhd(argv) != 0:
        raise SystemExit(f"reproduce: llava-uhd train failed for {output}")


def _cli(argv: list[str]) -> None:
    if llava_uhd(argv) != 0:
        raise SystemExit(f"reproduce: llava-uhd {' '.join(argv)} failed")


def _json(path: Path, compute: Any) -> Any:
    """The JSON at ``path``, computed and written first if absent (resumable steps)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(compute(), indent=1) + "\n")
        tmp.replace(path)
    return json.loads(path.read_text())


def prepare_data(runs: Path, pages: int) -> tuple[Path, Path]:
    """The tokenizer and the training pages of stages 1-2, shared by every encoding (as the recipe makes them)."""
    tokenizer, data = runs / "tokenizer", runs / "data" / "train"
    if not (tokenizer / "tokenizer.json").is_file():
        _cli(["synthdoc", "tokenizer", str(tokenizer)])
    for name, kinds in (("stage1.json", ["caption"]), ("stage2.json", ["qa", "qa", "qa"])):
        if not (data / name).is_file():
            _cli(
                ["synthdoc", "data", str(data), "--split", "train", "--seed", str(PAGE_SEED)]
                + ["--n", str(pages), "--kinds", *kinds, "--colour-jitter", "12", "--json-name", name]
            )
    return tokenizer, data


def encoding_preset(stage0: Path, mode: SlicingMode, folder: Path) -> Path:
    """The stage-0 run's preset with the encoding's slicing mode, as a YAML file for ``model.preset``."""
    base = Preset.load(stage0 / "preset.yaml")
    preset = replace(base, name=f"{base.name}-{mode}", slicing=replace(base.slicing, mode=mode))
    path = folder / "preset.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(preset.to_yaml())
    return path


def train_encoding(
    mode: SlicingMode,
    seeds: Sequence[int],
    stage0: Path,
    runs: Path,
    tokenizer: Path,
    data: Path,
    scale: float,
) -> None:
    """stage0_resampler once, then stages 1-2 per seed, all with ``mode``'s pieces."""
    folder = runs / mode
    preset = encoding_preset(stage0, mode, folder)
    pages = _scaled(PAGES, scale, minimum=2)
    cache = f"feature_cache_dir={folder / 'feature-cache'}"  # per encoding: its pieces, its features
    smoke = [] if scale >= 1 else ["eval_every=0"]
    batch = [] if pages >= 8 else ["global_batch_size=2", "micro_batch_size=2"]
    resampler = folder / "stage0-resampler"
    _train(
        "stage0-resampler.yaml",
        resampler,
        [f"model.preset={preset}", f"model.init_from={stage0}", cache, f"data.synthetic_samples={pages}"]
        + ([] if scale >= 1 else ["data.synthetic_eval_samples=0", "dense.probe_documents=0", *smoke]),
    )
    common = [f"data.image_folder={data / 'images'}", cache, *batch, *smoke]
    for seed in seeds:
        run = folder / f"seed{seed}"
        _train(
            "stage1.yaml",
            run / "stage1",
            [f"model.preset={preset}", f"model.tokenizer={tokenizer}", f"model.init_from={resampler / FINAL}"]
            + [f"data.train={data / 'stage1.json'}", f"seed={seed}", *common],
        )
        _train(
            "stage2.yaml",
            run / "stage2",
            [f"model.pretrained={run / 'stage1' / FINAL}", f"data.train={data / 'stage2.json'}"]
            + [f"seed={seed}", f"max_steps={_scaled(STAGE2_STEPS, scale)}", *common]
            + ([] if scale >= 1 else ["data.synthdoc_eval_pages=0"]),
        )


def evaluate(model_dir: Path, pages: int) -> dict[str, Any]:
    from llava_uhd.auto import load_pretrained
    from llava_uhd.eval.synthdoc import evaluate_synthdoc

    model, processor = load_pretrained(model_dir)
    start = time.perf_counter()
    result = evaluate_synthdoc(model, processor, pages)
    return {**result, "wall_s": time.perf_counter() - start}


def glyph_probe(stage0: Path, preset_path: Path, pages: int) -> dict[str, Any]:
    """The frozen stage-0 tower's glyph reading on the encoding's pieces of ``pages`` test pages."""
    from llava_uhd.model.weights import read_state_dict
    from llava_uhd.train.dense_stage import build_model, probe

    preset = Preset.load(preset_path)
    model = build_model(preset)
    model.load_state_dict(read_state_dict(stage0))
    return probe(model, preset.slicing, pages, split="test")


def costs(preset_path: Path, pages: int) -> dict[str, Any]:
    """Visual tokens, ViT patches and forward FLOPs per image (no text) over the test pages, overall and
    per long-side bucket, from the processor's plans and the FLOPs accounting."""
    from llava_uhd.layout import visual_token_count
    from llava_uhd.model.flops import llava15_flops, uhd_flops
    from llava_uhd.slicing import plan_slices

    preset = Preset.load(preset_path)
    rows: dict[str, list[tuple[int, ...]]] = {}
    for index in range(pages):
        doc = make_document(document_seed("test", index, 0))
        plan = plan_slices(doc.width, doc.height, preset.slicing)
        row = (
            visual_token_count(plan, preset.resampler.num_queries),
            plan.vit_patches,
            *(uhd_flops(preset, plan, 0)[part] for part in ("total", "vit")),
        )
        for key in ("all", bucket_name(max(doc.width, doc.height))):
            rows.setdefault(key, []).append(row)
    names = ("tokens", "vit_patches", "flops", "vit_flops")
    mean = {
        key: {name: statistics.fmean(r[i] for r in v) for i, name in enumerate(names)}
        for key, v in rows.items()
    }
    return {**mean, "llava15_flops": llava15_flops(preset, 0)["total"]}


def collect(
    modes: Sequence[SlicingMode],
    seeds: Sequence[int],
    stage0: Path,
    runs: Path,
    eval_pages: int,
    probe_pages: int,
) -> dict[str, Any]:
    """Every measurement of every encoding (each cached as JSON in its run folder)."""
    results: dict[str, Any] = {}
    for mode in modes:
        folder = runs / mode
        preset = folder / "preset.yaml"
        results[mode] = {
            "costs": _json(folder / f"costs-{eval_pages}.json", lambda p=preset: costs(p, eval_pages)),
            "probe": _json(
                folder / f"probe-{probe_pages}.json", lambda p=preset: glyph_probe(stage0, p, probe_pages)
            ),
            "seeds": {
                seed: _json(
                    folder / f"seed{seed}" / f"eval-{eval_pages}.json",
                    lambda run=folder / f"seed{seed}": evaluate(run / "stage2" / FINAL, eval_pages),
                )
                for seed in seeds
            },
        }
    return results


# ---- the report -------------------------------------------------------------------------------------


def _rates(result: dict[str, Any], kind: str, bucket: str | None = None) -> dict[str, Any]:
    if bucket is None:
        return result["by_kind"][kind]
    return result["by_bucket"][kind].get(bucket, {"correct": 0, "total": 0, "accuracy": None})


def _cell(rates: Sequence[dict[str, Any]]) -> str:
    """Mean accuracy over seeds, the seeds' range, and the count behind each seed's rate."""
    values = [r["accuracy"] for r in rates if r["accuracy"] is not None]
    if not values:
        return "-"
    spread = f" ({100 * min(values):.1f}-{100 * max(values):.1f})" if len(values) > 1 else ""
    return f"{100 * statistics.fmean(values):.1f}%{spread} n={rates[0]['total']}"


def _mean_accuracy(rates: Sequence[dict[str, Any]]) -> float | None:
    values = [r["accuracy"] for r in rates if r["accuracy"] is not None]
    return statistics.fmean(values) if values else None


def _buckets() -> list[str]:
    return [f"{low}-{high - 1}" for low, high in BUCKETS]


_KINDS_AND_COSTS = (
    " | ".join(QUESTION_KINDS) + " | visual tokens / image | ViT patches / image | GFLOPs / image |"
)


def _kinds_and_costs(
    runs: Sequence[dict[str, Any]], costs: dict[str, float], bucket: str | None = None
) -> str:
    """The cells of one row under :data:`_KINDS_AND_COSTS`: each kind's accuracy, then the costs per image."""
    return (
        " | ".join(_cell([_rates(x, k, bucket) for x in runs]) for k in QUESTION_KINDS)
        + f" | {costs['tokens']:.0f} | {costs['vit_patches']:.0f} | {costs['flops'] / 1e9:.2f} |"
    )


def tables(results: dict[str, Any]) -> str:
    lines = [
        f"| encoding | {_KINDS_AND_COSTS}",
        "| --- |" + " --- |" * (len(QUESTION_KINDS) + 3),
    ]
    for mode, r in results.items():
        runs = list(r["seeds"].values())
        lines.append(f"| {ENCODINGS[mode]} (`{mode}`) | " + _kinds_and_costs(runs, r["costs"]["all"]))
    lines += ["", "Code questions by the page's long side (px); tokens per image in that bucket:", ""]
    lines += ["| encoding | " + " | ".join(_buckets()) + " |", "| --- |" + " --- |" * len(BUCKETS)]
    for mode, r in results.items():
        runs = list(r["seeds"].values())
        cells = []
        for b in _buckets():
            tokens = r["costs"].get(b, {}).get("tokens")
            cells.append(
                _cell([_rates(x, "code", b) for x in runs])
                + ("" if tokens is None else f", {tokens:.0f} tok")
            )
        lines.append(f"| {ENCODINGS[mode]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every question kind by the page's long side, with the bucket's costs per image:",
        "",
        f"| encoding | long side (px) | {_KINDS_AND_COSTS}",
        "| --- | --- |" + " --- |" * (len(QUESTION_KINDS) + 3),
    ]
    for mode, r in results.items():
        runs = list(r["seeds"].values())
        for b in _buckets():
            if b in r["costs"]:
                lines.append(f"| {ENCODINGS[mode]} | {b} | " + _kinds_and_costs(runs, r["costs"][b], b))
    lines += [
        "",
        "Stage-0 glyph probe: the frozen tower's glyph head read at each drawn character's true place, on the "
        "encoding's pieces of the test pages (per character; per whole code when one piece shows all of it):",
        "",
        "| encoding | slice chars | slice codes | overview / base chars | overview / base codes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, r in results.items():
        p = r["probe"]
        slices = "-" if not p["slice_chars"] else f"{100 * p['slice_char_acc']:.1f}% of {p['slice_chars']}"
        slice_codes = "-" if not p["slice_chars"] else f"{100 * p['slice_code_acc']:.1f}%"
        lines.append(
            f"| {ENCODINGS[mode]} | {slices} | {slice_codes} | "
            f"{100 * p['overview_char_acc']:.1f}% of {p['overview_chars']} | {100 * p['overview_code_acc']:.1f}% |"
        )
    return "\n".join(lines)


def discussion(results: dict[str, Any]) -> str:
    """What the numbers say about the claim, computed from them (no wording decided in advance)."""
    if not {"uhd", "resize", "anyres"} <= set(results):
        return "The discussion needs all three encodings."
    code = {m: _mean_accuracy([_rates(x, "code") for x in r["seeds"].values()]) for m, r in results.items()}
    cost = {m: r["costs"]["all"] for m, r in results.items()}
    if None in code.values():
        return "No code questions were scored."
    fine = [
        f"On code questions (the fine detail) UHD scores {100 * code['uhd']:.1f}% against "
        f"{100 * code['resize']:.1f}% for the low-resolution resize: "
        + ("UHD reads more." if code["uhd"] > code["resize"] else "UHD does not read more.")
    ]
    ratio = cost["uhd"]["flops"] / cost["resize"]["flops"]
    fine.append(
        f"UHD costs {ratio:.2f}x the resize's forward FLOPs per image here ({cost['uhd']['flops'] / 1e9:.2f} vs "
        f"{cost['resize']['flops'] / 1e9:.2f} GFLOPs). The paper's 94% is against LLaVA-1.5 as published, whose "
        f"576 patch tokens go uncompressed into a 13B LLM; with this toy LM and both encodings compressed to "
        f"{results['resize']['costs']['all']['tokens']:.0f} tokens per piece, the ViT is "
        f"{100 * cost['uhd']['vit_flops'] / cost['uhd']['flops']:.0f}% of UHD's FLOPs, so its extra pieces are "
        f"not free (LLaVA-1.5's own layout on this preset: "
        f"{results['resize']['costs']['llava15_flops'] / 1e9:.2f} GFLOPs)."
    )
    fewer = cost["uhd"]["tokens"] < cost["anyres"]["tokens"]
    fine.append(
        f"Against fixed tiles UHD uses {cost['uhd']['tokens']:.0f} visual tokens per image to their "
        f"{cost['anyres']['tokens']:.0f} ({'fewer' if fewer else 'not fewer'}) and scores "
        f"{100 * code['uhd']:.1f}% to {100 * code['anyres']:.1f}% on codes "
        f"({'equal or better' if code['uhd'] >= code['anyres'] else 'worse'}). Both go through the same "
        f"resampler here; LLaVA-NeXT as published feeds every patch of its tiles and base image, "
        f"{cost['anyres']['vit_patches']:.0f} tokens per image on these pages before its unpadding."
    )
    probe = {m: r["probe"] for m, r in results.items()}
    fine.append(
        f"The perception side is where the encodings part clearly: the frozen tower reads "
        f"{100 * probe['uhd']['slice_char_acc']:.1f}% of the characters on UHD's slices, "
        f"{100 * probe['anyres']['slice_char_acc']:.1f}% on the fixed tiles and "
        f"{100 * probe['resize']['overview_char_acc']:.1f}% on the resize (its one view). The answers gain far "
        f"less, because the resampler's {results['resize']['costs']['all']['tokens']:.0f} queries per piece "
        f"pass little of a piece's glyphs on to the LM at this scale, so small gaps here are a few answers: "
        + "; ".join(
            f"{ENCODINGS[m]} answered "
            + " and ".join(f"{x['by_kind']['code']['correct']}" for x in r["seeds"].values())
            + f" of {next(iter(r['seeds'].values()))['by_kind']['code']['total']} code questions"
            for m, r in results.items()
        )
        + " (per seed)."
    )
    seeds = max(len(r["seeds"]) for r in results.values())
    fine.append(
        "Ranges in brackets are the spread over seeds (stages 1-2 reseeded; the tower and the stage0_resampler "
        "pages fixed)."
        if seeds > 1
        else "One seed per encoding: the spread between seeds is not measured, so small gaps may be noise."
    )
    return " ".join(fine)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    centres = [(low + high - 1) / 2 for low, high in BUCKETS]
    for mode, r in results.items():
        accs = [_mean_accuracy([_rates(x, "code", b) for x in r["seeds"].values()]) for b in _buckets()]
        points = [(x, 100 * a) for x, a in zip(centres, accs, strict=True) if a is not None]
        label = f"{ENCODINGS[mode]} ({r['costs']['all']['tokens']:.0f} tokens/image)"
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.set_xticks(centres, [f"{b} px" for b in _buckets()])
    ax.set_xlabel("page long side")
    ax.set_ylabel("code questions, exact match (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    results: dict[str, Any],
    out: Path,
    command: str,
    pages: dict[str, int],
    took: float,
    note: str | None = None,
) -> None:
    picture = out.with_suffix(".png")
    plot(results, picture)
    seeds = sorted({s for r in results.values() for s in r["seeds"]})
    text = f"""# Reproduction at toy scale: UHD slices, a low-resolution resize and fixed tiles

Regenerated by `{command}` (this run: {took / 60:.0f} min, steps finished before it skipped).

Three encodings of the same synthdoc pages (`SlicingConfig.mode`): `uhd` (the paper's slices and overview),
`resize` (LLaVA-1.5: one bicubic resize of the whole page to the ViT's side, aspect not kept) and `anyres`
(LLaVA-NeXT: the best of the 1x2, 2x1, 2x2, 3x1, 1x3 tile canvases, page letterboxed on black, cut into
tiles, plus the page squashed to one tile as the base image). The same frozen stage-0 tower, resampler
and LM sizes, {pages["train"]} training pages, steps, schedule and seeds {seeds}; `stage0_resampler`,
stage 1 and stage 2 of the synthdoc recipe per encoding. Exact match on every question of {pages["eval"]}
test pages; the probe on {pages["probe"]}. Accuracy is the mean over seeds (range over seeds), `n` the
questions behind each seed's rate; tokens, patches and FLOPs are means per test page (the image alone,
no text).

{tables(results)}

![code accuracy against the page's long side]({picture.name})

{discussion(results)}
"""
    if note:
        text += f"\nHow this run was made: {note}\n"
    out.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stage0", type=Path, required=True, help="the frozen stage-0 tower (a stage-0 final/)"
    )
    parser.add_argument("--runs", type=Path, required=True, help="where data, runs and results go")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of stages 1-2 (0 1)")
    parser.add_argument(
        "--eval-pages", type=int, default=100, help="test pages, every question of each (100)"
    )
    parser.add_argument("--probe-pages", type=int, default=60, help="test pages of the glyph probe (60)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink pages and steps (a smoke run: 0.005)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "REPRODUCTION.md", help="the report"
    )
    parser.add_argument(
        "--note", default=None, help="a sentence for the report on how the runs were made (reuse, scheduling)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not (args.stage0 / "preset.yaml").is_file():
        raise ConfigError(f"--stage0 {args.stage0}: no preset.yaml; give a stage-0 run's final/ folder")
    if not 0 < args.scale <= 1:
        raise ConfigError(f"--scale must be in (0, 1], got {args.scale}")
    if args.eval_pages < 1 or args.probe_pages < 1:
        raise ConfigError("--eval-pages and --probe-pages must be >= 1")
    start = time.perf_counter()
    stage0, runs = args.stage0.resolve(), args.runs.resolve()
    pages = _scaled(PAGES, args.scale, minimum=2)
    tokenizer, data = prepare_data(runs, pages)
    for mode in args.encodings:
        train_encoding(mode, args.seeds, stage0, runs, tokenizer, data, args.scale)
    results = collect(args.encodings, args.seeds, stage0, runs, args.eval_pages, args.probe_pages)
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:  # the report prints the note itself
        del given[given.index("--note") : given.index("--note") + 2]
    given = [a for a in given if not a.startswith("--note=")]
    command = "python benchmarks/reproduce.py " + " ".join(given)
    pages_used = {"train": pages, "eval": args.eval_pages, "probe": args.probe_pages}
    write_report(results, args.out, command, pages_used, time.perf_counter() - start, args.note)
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
