"""Generation throughput: greedy tokens/s of a small LLaVA-UHD model at batch 1 and 8.

The model (a few M parameters: ViT 128 wide x 4 layers, a 36-query resampler, a 256-wide 4-layer Llama)
generates a fixed number of tokens (``min_new_tokens`` = ``max_new_tokens``, so EOS cannot end it early)
after a prompt holding one sliced image per sample. The peer, measured in the same run, is the bare
language model generating from a text-only prompt of the same length: the difference is what the
multimodal glue (ViT + resampler on the prefill, placeholder filling) costs. Prefill is timed on its own
(one new token) and decode tokens/s is the rest.

    .venv/bin/python benchmarks/generate.py            # prints the table, rewrites the README section
    .venv/bin/python benchmarks/generate.py --no-write # prints only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from llava_uhd.config import Preset, ResamplerConfig, SlicingConfig, TextConfig, VisionConfig
from llava_uhd.model.configuration import LlavaUHDConfig
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.slicing import plan_slices
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

SECTION = "## Generation (`benchmarks/generate.py`)"
VOCAB = 8000
IMAGE_TOKEN_ID = VOCAB  # outside the LM's vocabulary, as the processor's added <image> token is
TEXT_TOKENS = 32  # prompt text after the image
IMAGE_SIZE = (448, 336)  # 3x2 slices + overview at the 224-pixel scale below

SMALL = Preset(
    name="bench-small",
    slicing=SlicingConfig(scale_resolution=224, max_slices=6),
    vision=VisionConfig(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4, image_size=224),
    resampler=ResamplerConfig(kind="perceiver", num_queries=36, num_heads=4),
    text=TextConfig(
        config={
            "model_type": "llama",
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": VOCAB,
            "max_position_embeddings": 4096,
        }
    ),
)


def prompt(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``batch`` samples, each: BOS, one image's placeholders (with 1-token separators), then text."""
    plan = plan_slices(*IMAGE_SIZE, SMALL.slicing)
    q = SMALL.resampler.num_queries
    row: list[int] = [1]
    for _ in plan.separators:
        row += [IMAGE_TOKEN_ID] * q + [13]
    row += [IMAGE_TOKEN_ID] * q
    text = torch.randint(100, VOCAB, (batch, TEXT_TOKENS), generator=generator)
    ids = torch.cat([torch.tensor([row] * batch), text], dim=1)
    grids = torch.tensor([[g.rows, g.cols] for g in plan.piece_grids] * batch)
    pixels = torch.randn(int(grids.prod(dim=1).sum()), 3 * SMALL.vision.patch_size**2, generator=generator)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "piece_grids": grids,
    }


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/README.md")
    args = parser.parse_args(argv)

    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (prefill is timed with 1), got {args.new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    config = LlavaUHDConfig.from_preset(SMALL, image_token_id=IMAGE_TOKEN_ID)
    model = LlavaUHDForConditionalGeneration(config).to(device, dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)

    def run(inputs: dict[str, torch.Tensor], new: int, lm_only: bool) -> torch.Tensor:
        target = model.language_model if lm_only else model
        return target.generate(
            **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=2
        )

    rows = []
    with torch.inference_mode():
        for batch in (1, 8):
            multimodal = {k: v.to(device) for k, v in prompt(batch, generator).items()}
            length = multimodal["input_ids"].shape[1]
            text_only = {
                "input_ids": torch.randint(100, VOCAB, (batch, length), generator=generator).to(device),
                "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            }
            assert run(multimodal, args.new_tokens, False).shape == (batch, length + args.new_tokens)
            for name, inputs, lm_only in (
                ("LLaVA-UHD", multimodal, False),
                ("LM alone (text prompt)", text_only, True),
            ):
                prefill = timed(lambda inputs=inputs, lm_only=lm_only: run(inputs, 1, lm_only), args.repeats)
                total = timed(
                    lambda inputs=inputs, lm_only=lm_only: run(inputs, args.new_tokens, lm_only), args.repeats
                )
                decode_s = total - prefill  # may be <= 0 when timing noise exceeds the decode time
                decode_rate = batch * (args.new_tokens - 1) / decode_s if decode_s > 0 else float("nan")
                rows.append((batch, name, length, prefill, decode_rate, batch * args.new_tokens / total))

    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"
    )
    pieces = len(plan_slices(*IMAGE_SIZE, SMALL.slicing).pieces)
    lines = [
        f"{params / 1e6:.1f}M-parameter model (ViT {SMALL.vision.hidden_size}x{SMALL.vision.num_layers}, "
        f"{SMALL.resampler.num_queries}-query resampler, Llama 256x4, vocab {VOCAB}), "
        f"{str(dtype).removeprefix('torch.')}, {where}. Prompt: one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image "
        f"({pieces} pieces) + {TEXT_TOKENS} text tokens per sample; greedy, {args.new_tokens} new tokens, "
        f"KV cache; median of {args.repeats} after a warm-up.",
        "",
        "| batch | model | prompt tokens | prefill s | decode tokens/s | end-to-end tokens/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {b} | {n} | {t} | {p:.3f} | {d:.0f} | {e:.0f} |" for b, n, t, p, d, e in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        options = [f"--new-tokens {args.new_tokens}"] if args.new_tokens != 32 else []
        options += [f"--threads {args.threads}"] if args.threads else []
        command = " ".join(["python benchmarks/generate.py", *options])
        write_section(SECTION, f"Command: `{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
