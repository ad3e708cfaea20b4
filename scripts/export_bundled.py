"""Copy a trained synthdoc model folder into the package as the bundled model (what `ask` uses by default).

    python scripts/export_bundled.py RUNS/stage2/final

Writes src/llava_uhd/assets/synthdoc-model/: the weights (safetensors), config, tokenizer, processor,
chat template and preset files, a model card (README.md) and ``shipped_accuracy.json``: the copy's
exact-match accuracy on a fixed set of test pages (seed 1, pages 0-47), which tests/test_bundled_model.py
holds the package to. Checks that the copy answers like the source.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from llava_uhd.auto import load_pretrained
from llava_uhd.config import Preset
from llava_uhd.eval.synthdoc import evaluate_synthdoc
from llava_uhd.model_card import write_model_card
from llava_uhd.processing import PRESET_FILE

TARGET = Path(__file__).resolve().parents[1] / "src" / "llava_uhd" / "assets" / "synthdoc-model"
KEEP = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "llava_uhd_preset.yaml",
    "llava_uhd_processor.json",
    "chat_template.jinja",
    "processor_config.json",
)


SHIPPED_FILE = "shipped_accuracy.json"
SHIPPED_SET = {"documents": 48, "seed": 1, "split": "test"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="a trained model folder (RUNS/stage2/final)")
    args = parser.parse_args()
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for name in sorted(p.name for p in args.source.iterdir()):
        if name in KEEP:
            shutil.copy(args.source / name, TARGET / name)
    model, processor = load_pretrained(args.source)
    # the processor in this version's layout (chat template, processor_config.json), whatever version
    # of the code trained the source
    processor.save_pretrained(TARGET)
    write_model_card(TARGET, Preset.load(TARGET / PRESET_FILE))
    source = evaluate_synthdoc(model, processor, **SHIPPED_SET)
    copy = evaluate_synthdoc(*load_pretrained(TARGET), **SHIPPED_SET)
    assert source == copy, (source["by_kind"], copy["by_kind"])
    record = {
        **SHIPPED_SET,
        "by_kind": copy["by_kind"],
        "targets": copy["targets"],
        "by_bucket": copy["by_bucket"],
    }
    (TARGET / SHIPPED_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(copy["by_kind"]))
    size = sum(p.stat().st_size for p in TARGET.iterdir())
    print(f"bundled model written to {TARGET} ({size / 2**20:.1f} MiB); answers match the source")


if __name__ == "__main__":
    main()
