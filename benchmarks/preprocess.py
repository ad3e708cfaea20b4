"""Preprocessing speed: images/s from an image to model-ready tensors, next to transformers' processors.

Measured in one run, on the same synthetic scenes (text, boxes, a chart: scripts/make_example_image.py)
at 1024x768, 1920x1080, 672x1008 and 4000x3000:

- ``ours fast``: plan + the default fast pixel path (llava_uhd.pixels, resize_mode="fast");
- ``ours exact``: plan + the bit-faithful path (PIL resizes of the full image, CLIP's numpy arithmetic);
- ``released``: the released LLaVA-UHD pipeline's equivalent: PIL slicing, then CLIPImageProcessor on
  every piece (transformers' PIL backend);
- ``floor``: the released pipeline's two full-source PIL bicubic resizes alone;
- ``LlavaNext`` / ``Qwen2-VL``: transformers' LlavaNextImageProcessorPil and Qwen2VLImageProcessorPil
  with their default configs (PIL backend; torchvision does not run with this torch).

"from PIL" starts at a decoded RGB PIL image; "from JPEG" at the encoded bytes (ours decodes at a DCT
draft scale; the others decode fully). Every method runs single-threaded (``--threads``), as in a data
loader worker; calls are interleaved across methods and each method's fastest call is kept, to damp
other jobs on the shared machine.
The pixel difference of the fast path against exact is reported in 8-bit levels.

    .venv/bin/python benchmarks/preprocess.py            # prints the table, rewrites benchmarks/README.md
    .venv/bin/python benchmarks/preprocess.py --quick    # fewer rounds, no README
    .venv/bin/python benchmarks/preprocess.py --no-write # full rounds, no README
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from llava_uhd.config import SlicingConfig
from llava_uhd.images import load_image, probe_image_size
from llava_uhd.pixels import draft_size, image_patches
from llava_uhd.slicing import apply_plan, plan_slices

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Preprocessing (`benchmarks/preprocess.py`)"
SIZES = [(1024, 768), (1920, 1080), (672, 1008), (4000, 3000)]
JPEG_QUALITY = 90
TARGET_SPEEDUP = 2.0

sys.path.insert(0, str(ROOT / "scripts"))
from make_example_image import draw_scene  # noqa: E402  (a script, not a package)

from readme_section import README, write_section  # noqa: E402  (benchmarks/ is sys.path[0] for a script)


def _hf_processors() -> dict[str, Callable[[Image.Image], object]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil, Qwen2VLImageProcessorPil

    llava_next, qwen = LlavaNextImageProcessorPil(), Qwen2VLImageProcessorPil()
    clip = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    config = SlicingConfig()

    def released(image: Image.Image) -> object:
        plan = plan_slices(image.width, image.height, config)
        slices, overview = apply_plan(image, plan)
        return [clip(piece, return_tensors="pt")["pixel_values"] for piece in (*slices, overview)]

    return {
        "released": released,
        "LlavaNext": lambda image: llava_next(image, return_tensors="pt"),
        "Qwen2-VL": lambda image: qwen(image, return_tensors="pt"),
    }


def _ours(mode: str) -> Callable[[Image.Image], torch.Tensor]:
    config = SlicingConfig()

    def run(image: Image.Image) -> torch.Tensor:
        plan = plan_slices(image.width, image.height, config)
        return image_patches([image], [plan], config, mode=mode)  # type: ignore[arg-type]

    return run


def _ours_from_jpeg(data: bytes) -> torch.Tensor:
    """The processor's path for encoded input: header probe, plan, draft decode, fast pixels."""
    config = SlicingConfig()
    width, height = probe_image_size(data)
    plan = plan_slices(width, height, config)
    image = load_image(data, draft_size=draft_size(plan))
    return image_patches([image], [plan], config, mode="fast")


def _floor(image: Image.Image) -> None:
    plan = plan_slices(image.width, image.height, SlicingConfig())
    if plan.refine_size is not None:
        image.resize(plan.refine_size, Image.Resampling.BICUBIC)
    image.resize(plan.overview, Image.Resampling.BICUBIC)


def _best_rate(funcs: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Images/s per method from its fastest call: calls are interleaved across methods, and the minimum
    is the estimate least disturbed by other jobs on a shared machine (as ``timeit`` recommends)."""
    best = dict.fromkeys(funcs, float("inf"))
    for func in funcs.values():
        func()  # warm-up: imports, allocator, kernels
    for _ in range(calls):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1.0 / seconds for name, seconds in best.items()}


def _levels(a: torch.Tensor, b: torch.Tensor, config: SlicingConfig) -> tuple[float, float]:
    """Max and mean |a - b| in 8-bit pixel levels (undoing the per-channel std)."""
    std = torch.tensor(config.image_std).repeat_interleave(config.patch_size**2)
    diff = ((a - b) * std * 255).abs()
    return float(diff.max()), float(diff.mean())


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def measure(calls: int) -> list[dict[str, object]]:
    hf = _hf_processors()
    config = SlicingConfig()
    rows = []
    for width, height in SIZES:
        image = draw_scene(width, height)
        data = _jpeg(image)
        pil_funcs: dict[str, Callable[[], object]] = {
            "ours fast": lambda image=image: _ours("fast")(image),
            "ours exact": lambda image=image: _ours("exact")(image),
            "floor": lambda image=image: _floor(image),
            **{name: (lambda image=image, f=f: f(image)) for name, f in hf.items()},
        }
        decode = lambda data=data: Image.open(io.BytesIO(data)).convert("RGB")  # noqa: E731
        jpeg_funcs: dict[str, Callable[[], object]] = {
            "ours fast": lambda data=data: _ours_from_jpeg(data),
            **{name: (lambda f=f, decode=decode: f(decode())) for name, f in hf.items()},
        }
        pil_rates = _best_rate(pil_funcs, calls)
        jpeg_rates = _best_rate(jpeg_funcs, calls)
        exact = _ours("exact")(image)
        max_pil, mean_pil = _levels(_ours("fast")(image), exact, config)
        decoded_exact = _ours("exact")(Image.open(io.BytesIO(data)).convert("RGB"))
        max_jpeg, mean_jpeg = _levels(_ours_from_jpeg(data), decoded_exact, config)
        rows.append(
            {
                "size": f"{width}x{height}",
                "pil": pil_rates,
                "jpeg": jpeg_rates,
                "diff_pil": (max_pil, mean_pil),
                "diff_jpeg": (max_jpeg, mean_jpeg),
            }
        )
        print(f"{width}x{height}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in pil_rates.items()), flush=True)
    return rows


def _rate_table(
    rows: list[dict[str, object]], source: str, columns: list[str], diff_header: str
) -> list[str]:
    """One markdown table: images/s per method, the speed-up over the faster HF processor, the diff."""
    lines = [
        "| size | " + " | ".join(columns) + f" | speed-up | {diff_header} |",
        "| --- " * (len(columns) + 3) + "|",
    ]
    for row in rows:
        rates = row[source]
        speedup = rates["ours fast"] / max(rates["LlavaNext"], rates["Qwen2-VL"])
        max_d, mean_d = row[f"diff_{source}"]
        lines.append(
            f"| {row['size']} | " + " | ".join(f"{rates[c]:.1f}" for c in columns) + f" | {speedup:.1f}x | "
            f"{max_d:.0f} / {mean_d:.3f} |"
        )
    return lines


def table(rows: list[dict[str, object]], threads: int) -> str:
    pil_cols = ["ours fast", "ours exact", "released", "floor", "LlavaNext", "Qwen2-VL"]
    jpeg_cols = ["ours fast", "released", "LlavaNext", "Qwen2-VL"]
    lines = [
        f"Images/s from the fastest of interleaved calls, torch threads = {threads} (PIL is single-threaded). "
        f"Speed-up = ours fast / the faster of LlavaNext and Qwen2-VL (target >= {TARGET_SPEEDUP:g}x).",
        "",
        "From a decoded PIL image:",
        "",
        *_rate_table(rows, "pil", pil_cols, "fast vs exact, max / mean abs diff (levels)"),
        "",
        "From JPEG bytes (quality 90; ours decodes at a DCT draft scale, the others decode fully):",
        "",
        *_rate_table(rows, "jpeg", jpeg_cols, "draft+fast vs exact on the full decode, max / mean (levels)"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="preprocessing speed (see the module docstring)")
    parser.add_argument("--calls", type=int, default=15, help="timed calls per method and size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 calls per method, print only")
    parser.add_argument("--no-write", action="store_true", help="print only, leave the README as it is")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()[0]
    rows = measure(3 if args.quick else args.calls)
    body = table(rows, args.threads)
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/preprocess.py", *sys.argv[1:]])
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Pillow {Image.__version__}"
    )
    load = f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    full = f"Command: `{command}` ({machine}; {load}).\n\n{body}\n\n{NOTES}"
    print(full)
    if not (args.quick or args.no_write):
        write_section(SECTION, full)
        print(f"\nwrote the section into {README}")


NOTES = """How the fast path gets there (llava_uhd/pixels.py): a large source is first shrunk by an integer
box `reduce()` while the remaining downscale stays >= 2x; the resizes use torch's uint8 antialiased
bicubic kernel; the overview is resized from the refine image when that is >= 2x larger per side (the
full source is read once, not twice); scale and normalise are one multiply-add per value, in place in
the preallocated patch buffer. For JPEG input the decoder works at the DCT scale (1/2, 1/4, 1/8)
that still leaves a >= 2x downscale to the refine size. The `exact` mode keeps the released pipeline's
pixels bit for bit (tests/test_processing.py checks it against transformers' CLIPImageProcessor).
Differences of the fast path are in 8-bit levels over all patch values, on scenes with text and hard
edges; on a noisy, hard-edged test scene the mean stays under 1 level from PIL input and about 1.4 from a
JPEG drafted at 1/2 (tests/test_processing.py bounds both).
From JPEG bytes every method pays the full decode at 1024x768 and 1920x1080 (no DCT reduction leaves
the 2x margin above the refine size there), which is what narrows those two ratios. `load_image` hands
back Pillow's decoded image itself when it is already upright RGB (no copy: about 1 ms at 1024x768).
Decoding with simplejpeg instead was measured and dropped: it runs the same libjpeg-turbo code, its
decode alone is ~10% faster, and the copy into a PIL image then makes it no faster end to end."""


if __name__ == "__main__":
    main()
