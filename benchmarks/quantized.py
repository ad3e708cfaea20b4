"""Quantized language model on CPU: weight memory and greedy tokens/s, torchao int8 weight-only vs float32.

One randomly initialised LLaVA-UHD (the small ViT and resampler of benchmarks/generate.py, a 1024-wide
4-layer Llama) is saved once and loaded twice through ``AutoModelForImageTextToText.from_pretrained``:
in float32, and with ``quantization_config=quantization_config("int8")`` (the LM's linear layers in int8,
the vision tower, resampler and LM head in float32). Both generate the same fixed number of tokens after
the same one-image prompt in the same run. Memory is the bytes of the weights as stored (torchao's int8
data and scales counted at their size, :func:`llava_uhd.model.quantization.module_bytes`).

    .venv/bin/python benchmarks/quantized.py            # prints the table, rewrites the README section
    .venv/bin/python benchmarks/quantized.py --no-write # prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile

import torch
from transformers import AutoModelForImageTextToText

from generate import IMAGE_SIZE, IMAGE_TOKEN_ID, SMALL, TEXT_TOKENS, prompt, timed
from llava_uhd.model.configuration import LlavaUHDConfig
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.model.quantization import module_bytes, quantization_config
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

SECTION = "## Quantized language model (`benchmarks/quantized.py`)"
LLM = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16}
PRESET = dataclasses.replace(
    SMALL,
    name="bench-quant",
    text=dataclasses.replace(SMALL.text, config={**SMALL.text.config, **LLM}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = prompt(1, torch.Generator().manual_seed(0))
    length = inputs["input_ids"].shape[1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="llava-uhd-quant-") as folder:
        config = LlavaUHDConfig.from_preset(PRESET, image_token_id=IMAGE_TOKEN_ID)
        LlavaUHDForConditionalGeneration(config).save_pretrained(folder)
        outputs = {}
        for name, quantization in (
            ("float32", None),
            ("int8 weight-only (torchao)", quantization_config("int8")),
        ):
            model = AutoModelForImageTextToText.from_pretrained(
                folder, quantization_config=quantization
            ).eval()

            def run(model=model) -> torch.Tensor:
                return model.generate(
                    **inputs,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=2,
                )

            with torch.inference_mode():
                seconds = timed(run, args.repeats)
                outputs[name] = run()[0, length:]
            lm = module_bytes(model.language_model)
            rows.append((name, lm / 2**20, module_bytes(model) / 2**20, args.new_tokens / seconds))
            del model
    same = sum(int(a == b) for a, b in zip(*outputs.values(), strict=True))
    where = f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"
    lines = [
        f"LLaVA-UHD with a Llama {LLM['hidden_size']}x{PRESET.text.config['num_hidden_layers']} "
        f"(vocab {PRESET.text.config['vocab_size']}), random weights, {where}. Prompt: one "
        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image + {TEXT_TOKENS} text tokens ({length} tokens), batch 1; greedy, "
        f"{args.new_tokens} new tokens, KV cache; median of {args.repeats} after a warm-up. The int8 model "
        f"picked the float32 model's token at {same} of {args.new_tokens} steps.",
        "",
        "| weights | LM MiB | whole model MiB | end-to-end tokens/s |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {n} | {lm:.1f} | {total:.1f} | {rate:.1f} |" for n, lm, total, rate in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        options = [f"--new-tokens {args.new_tokens}"] if args.new_tokens != 16 else []
        options += [f"--threads {args.threads}"] if args.threads else []
        command = " ".join(["python benchmarks/quantized.py", *options])
        write_section(SECTION, f"Command: `{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
