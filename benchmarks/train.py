"""Training throughput and peak memory: tiny and small models, with and without length grouping.

Each case runs stage 2 (resampler + LLM, slices + overview) of ``llava-uhd train`` in its own process on
synthetic scenes (:mod:`llava_uhd.synth`), so the peak resident memory (``ru_maxrss``) belongs to that case
alone. Samples/s is measured over the optimiser steps after the first (warm-up). The padded-token share is
computed from the exact micro-batches the loop forms (text + visual tokens per sample, padded to the
longest of its micro-batch).

    .venv/bin/python benchmarks/train.py             # prints the table, rewrites the README section
    .venv/bin/python benchmarks/train.py --no-write  # prints only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training (`benchmarks/train.py`)"
SAMPLES, GLOBAL_BATCH, MICRO_BATCH = 32, 8, 4

# "small": a ViT 128 x 4 and a Llama 256 x 4 on the tiny preset's slicing (112 px pieces, 16 queries).
SMALL_PRESET = """\
name: small
slicing: {scale_resolution: 112, max_slices: 6}
vision: {hidden_size: 128, intermediate_size: 512, num_layers: 4, num_heads: 4, image_size: 112}
resampler: {kind: perceiver, num_queries: 16, num_heads: 4}
text:
  config: {model_type: llama, hidden_size: 256, intermediate_size: 1024, num_hidden_layers: 4,
           num_attention_heads: 4, num_key_value_heads: 4, vocab_size: 32000, max_position_embeddings: 4096}
template: vicuna_v1
"""


def run_case(preset: str, grouped: bool, out: Path) -> dict:
    """One training run in this process; returns samples/s, padded share and peak RSS."""
    import time

    from llava_uhd.data.sampler import padding_fraction
    from llava_uhd.train.batches import BatchGeometry, epoch_order, rank_steps
    from llava_uhd.train.config import TrainConfig
    from llava_uhd.train.entry import run_training

    config = TrainConfig.load(
        ROOT / "configs" / "train" / "debug-cpu.yaml",
        [
            f"output_dir={out}",
            "stage=stage2",
            f"model.preset={preset}",
            f"data.synthetic_samples={SAMPLES}",
            "data.synthetic_eval_samples=0",
            f"data.group_by_length={str(grouped).lower()}",
            f"global_batch_size={GLOBAL_BATCH}",
            f"micro_batch_size={MICRO_BATCH}",
            "save_every=0",
            "log_every=1",
        ],
    )
    start = time.perf_counter()
    result = run_training(config)
    wall = time.perf_counter() - start
    steady = [r["samples_per_s"] for r in result.history[1:]]
    # the padding the loop met: lengths from the dataset, micro-batches exactly as the loop cut them
    from llava_uhd.data import LlavaDataset
    from llava_uhd.train.setup import build_processor

    processor = build_processor(config.resolved())
    dataset = LlavaDataset(
        out / "synthetic" / "train" / "data.json",
        out / "synthetic" / "train" / "images",
        processor,
        template="vicuna_v1",
        max_length=config.data.max_length,
    )
    lengths = dataset.lengths()
    order = epoch_order(len(lengths), config.seed, 0, lengths if grouped else None, GLOBAL_BATCH)
    micro = [
        batch for step in rank_steps(order, BatchGeometry(GLOBAL_BATCH, MICRO_BATCH, 1), 0) for batch in step
    ]
    return {
        "preset": preset if not preset.endswith(".yaml") else "small",
        "grouped": grouped,
        "samples_per_s": sum(steady) / len(steady),
        "padded_share": padding_fraction(lengths, micro),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": result.global_step,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave benchmarks/README.md alone"
    )
    parser.add_argument("--case", nargs=2, metavar=("PRESET", "GROUPED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on the last line
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_case(args.case[0], args.case[1] == "1", Path(tmp))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.yaml"
        small.write_text(SMALL_PRESET)
        for preset in ("tiny", str(small)):
            for grouped in (False, True):
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                done = subprocess.run(
                    [sys.executable, __file__, "--case", preset, str(int(grouped))],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = [
        f"Stage 2 (resampler + LLM, slices + overview) on {SAMPLES} synthetic scenes, global batch {GLOBAL_BATCH}, "
        f"micro-batch {MICRO_BATCH}, fp32, one process; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. Peak memory is the process's max RSS (model, data, Python and torch).",
        "",
        "| model | length grouping | samples/s | padded tokens | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        table.append(
            f"| {r['preset']} | {'on' if r['grouped'] else 'off'} | {r['samples_per_s']:.2f} | "
            f"{100 * r['padded_share']:.1f}% | {r['peak_rss_mib']:.0f} |"
        )
    table += ["", "Command: `.venv/bin/python benchmarks/train.py` (rewrites this section)."]
    text = "\n".join(table)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
