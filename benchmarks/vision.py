"""Vision encoder throughput: packed pieces vs padded-to-the-native-grid vs a per-piece loop.

A batch of 8 images of mixed sizes is planned with the ``paper`` preset, giving
pieces of many patch grids. The same :class:`~llava_uhd.model.vision.VisionTransformer` weights encode
them three ways, all through the same blocks:

- packed: the model's own forward, all pieces in one sequence (strategy "auto": one dense attention call
  per distinct length on CPU, a varlen kernel on CUDA);
- padded: the baseline defined here, every piece padded to the 24x24 grid (or the longest piece) with a
  key-padding mask, the whole tower running on the pads too;
- loop: one forward per piece.

On CPU the packed forward also runs with every block through its module calls (the path of autograd, GPUs
and ZeRO-3), against the fused blocks that CPU inference takes.

The peer runs in the same batch: transformers' ``CLIPVisionModel`` (SDPA attention) called once per piece
with ``interpolate_pos_encoding=True``, the way the released LLaVA-UHD code drives its tower, loaded with
the same weights (outputs are checked equal).

Also compared: the packed attention strategies on one image (the block mask is O(L^2), so the full
batch would need a ~700 MB mask), and attention alone on many tiny sequences, where "auto" may pick the
block mask. On CPU the tower has CLIP-L width (1024, 16 heads, 4096 MLP) and a reduced depth; with CUDA
it is the full 24-layer tower in bf16.

    .venv/bin/python benchmarks/vision.py            # prints the table, rewrites the README section
    .venv/bin/python benchmarks/vision.py --no-write # prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_uhd.config import PAPER
from llava_uhd.model.attention import PackedAttention
from llava_uhd.model.packing import padding_mask, segment_slots
from llava_uhd.model.vision import CPU_CHUNK_ROWS, PackedLayout, VisionTransformer
from llava_uhd.model.weights import load_clip_vision, vision_config_from_hf
from llava_uhd.slicing import plan_slices
from readme_section import write_section  # benchmarks/ is on sys.path when run as a script

IMAGE_SIZES = [
    (640, 480),
    (1024, 768),
    (1920, 1080),
    (672, 1008),
    (4000, 100),
    (336, 336),
    (800, 1200),
    (1280, 720),
]
TARGET_SPEEDUP = 1.3  # the packed encoder's goal: this much faster than both the loop and the padded batch
PADDED = "padded to 24x24 + key mask"
LOOP = "per-piece loop"
MODULE_CALLS = "packed, the blocks' module calls (the path with autograd, on GPUs, under ZeRO-3)"
PEER = "peer: transformers CLIPVisionModel, per piece"
MATMULS = "floor: the blocks' matmuls alone"
MATMULS_ATTENTION = "floor: matmuls + attention kernels"
SECTION = "## Vision encoder (`benchmarks/vision.py`)"
# Many tiny sequences of distinct lengths: where one block-masked call would save the most call overhead.
TINY_LENGTHS = list(range(2, 18))


def batch_grids(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """(N, 2) (rows, cols) of every piece of every image, in batch order."""
    return torch.tensor([list(g) for w, h in sizes for g in plan_slices(w, h, PAPER.slicing).piece_grids])


@dataclass
class Timing:
    """Best wall-clock and best process CPU seconds (user + system, all threads) over the runs."""

    wall: float = float("inf")
    cpu: float = float("inf")
    slowest: float = 0.0  # the slowest run's wall-clock: slowest / wall is the run-to-run spread
    output: torch.Tensor | None = None


def timed(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, Timing]:
    """Time each function ``repeats`` times, interleaved and rotated (a, b, c, b, c, a, ...), keeping the minima.

    Interleaving and minima keep a burst of other work on the shared cores from penalising one method,
    rotating the order keeps any one method from always running first (or right after another's big
    allocations); CPU time is reported beside wall time because on a loaded machine it is the steadier.
    """
    timings = {name: Timing() for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start, cpu_start = time.perf_counter(), os.times()
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            cpu_end = os.times()
            t = timings[name]
            elapsed = time.perf_counter() - start
            t.wall, t.slowest = min(t.wall, elapsed), max(t.slowest, elapsed)
            t.cpu = min(t.cpu, cpu_end.user - cpu_start.user + cpu_end.system - cpu_start.system)
            t.output = out
    return timings


@dataclass(frozen=True)
class PaddedAttention:
    """Attention for N sequences each padded to ``pad_to`` tokens, pads masked out as keys (the baseline).

    The packed tensor is (N * pad_to, H, Dh): sequence i occupies rows [i * pad_to, (i + 1) * pad_to), its
    real tokens first. Pad rows produce finite values that callers discard.
    """

    lengths: tuple[int, ...]
    pad_to: int
    key_mask: torch.Tensor  # (N, 1, 1, pad_to) bool, True on real keys

    @classmethod
    def build(
        cls, lengths: torch.Tensor | list[int], pad_to: int, device: torch.device | str = "cpu"
    ) -> PaddedAttention:
        sizes = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if not sizes or min(sizes) < 1 or max(sizes) > pad_to:
            raise ValueError(f"padded attention needs 1 <= length <= pad_to={pad_to}, got lengths {sizes}")
        real = ~padding_mask(torch.tensor(sizes, device=device), pad_to)  # (N, pad_to)
        return cls(tuple(sizes), pad_to, real[:, None, None, :])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(N * pad_to, H, Dh) queries, keys, values -> (N * pad_to, H, Dh)."""
        count = len(self.lengths)

        def batch(t: torch.Tensor) -> torch.Tensor:
            return t.view(count, self.pad_to, *t.shape[1:]).transpose(1, 2)  # (N, H, pad_to, Dh)

        out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), attn_mask=self.key_mask)
        return out.transpose(1, 2).reshape(q.shape)

    def split(self, max_rows: int) -> list[tuple[slice, PaddedAttention]]:
        """Chunks of whole padded sequences of at most ``max_rows`` rows (at least one sequence) each, as
        :meth:`PackedAttention.split` gives the blocks' fused CPU path."""
        per = max(1, max_rows // self.pad_to)
        return [
            (
                slice(i * self.pad_to, (i + len(part)) * self.pad_to),
                PaddedAttention(part, self.pad_to, self.key_mask[i : i + len(part)]),
            )
            for i in range(0, len(self.lengths), per)
            for part in [self.lengths[i : i + per]]
        ]


def padded_layout(model: VisionTransformer, grids: torch.Tensor) -> PackedLayout:
    """Every piece (CLS, then its patches) at the start of its own slot of the pre-training grid's length
    (or the longest piece's), in input order; the rest of each slot is padding."""
    counts = grids.to(torch.int64).prod(dim=1)  # (N,)
    lengths = counts + model.num_prefix
    pad_to = max(model.config.grid_side**2 + model.num_prefix, int(lengths.max()))
    starts = torch.arange(counts.numel(), device=grids.device) * pad_to
    attend = PaddedAttention.build(lengths, pad_to, grids.device)
    cls_slots = starts if model.num_prefix else starts[:0]
    return PackedLayout(
        pad_to * counts.numel(), segment_slots(counts, starts + model.num_prefix), cls_slots, attend
    )


def padded_encode(model: VisionTransformer, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """The padded baseline: the model's embedding and blocks run on the padded batch, pads included."""
    layout = padded_layout(model, grids)
    x = model.embed(pixel_values, grids, layout)
    for block in model.blocks[: model.feature_index]:
        x = block(x, layout.attend)
    return x[layout.patch_slots]


def module_calls(model: VisionTransformer, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """The model's forward with every block through its module calls, not the fused CPU path."""
    with model.unfused():
        return model(pixel_values, grids)


def per_piece_loop(model: VisionTransformer, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """One model call per piece."""
    counts = grids.prod(dim=1).tolist()
    pieces = pixel_values.split(counts)
    return torch.cat([model(p, grids[i : i + 1]) for i, p in enumerate(pieces)])


def piece_images(pixel_values: torch.Tensor, grids: torch.Tensor, patch: int) -> list[torch.Tensor]:
    """Undo the processor's patch flattening: every piece as a (1, C, rows * P, cols * P) image."""
    images = []
    for (rows, cols), flat in zip(
        grids.tolist(), pixel_values.split(grids.prod(dim=1).tolist()), strict=True
    ):
        x = flat.reshape(rows, cols, -1, patch, patch).permute(2, 0, 3, 1, 4)  # (C, rows, P, cols, P)
        images.append(x.reshape(1, -1, rows * patch, cols * patch))
    return images


def transformers_loop(peer: CLIPVisionModel, images: list[torch.Tensor]) -> torch.Tensor:
    """The peer: one CLIPVisionModel call per piece, position table interpolated to the piece's grid."""
    return torch.cat([peer(x, interpolate_pos_encoding=True).last_hidden_state[0, 1:] for x in images])


def unavoidable_work(model: VisionTransformer, grids: torch.Tensor, attention: bool) -> Callable[[], None]:
    """The floor of the packed encoding: every block's six matmuls (q, k, v, out, fc1, fc2) over the real
    tokens of the packed batch, plus, with ``attention``, its attention within each piece; on preallocated
    buffers, without norms, activations, position tables, gathers or copies."""
    layout = model.layout(grids)
    tokens = layout.num_tokens
    blocks = model.blocks[: model.feature_index]
    x = torch.randn(tokens, model.config.hidden_size, dtype=model.pos_embed.dtype, device=grids.device)
    qkv, hidden = x.new_empty(3, tokens, x.shape[1]), x.new_empty(tokens, model.config.intermediate_size)
    heads = model.config.num_heads

    def run() -> None:
        for block in blocks:
            attn, mlp = block.attn, block.mlp
            for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                torch.addmm(proj.bias, x, proj.weight.t(), out=qkv[i])
            if attention:
                layout.attend(*(qkv[i].view(tokens, heads, -1) for i in range(3)))
            torch.addmm(attn.out_proj.bias, qkv[0], attn.out_proj.weight.t(), out=x)
            torch.addmm(mlp.fc1.bias, x, mlp.fc1.weight.t(), out=hidden)
            torch.addmm(mlp.fc2.bias, hidden, mlp.fc2.weight.t(), out=x)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="ViT depth (default: 2 on CPU, 24 on CUDA)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/README.md")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = args.layers or (24 if cuda else 2)
    # CLIP ViT-L/14-336 with `layers` layers, random weights shared by ours and the peer; feature_layer -1
    # so that every configured layer runs in both.
    torch.manual_seed(0)
    peer_config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        attn_implementation="sdpa",
    )
    peer = CLIPVisionModel(peer_config).eval()
    config = vision_config_from_hf(peer_config, feature_layer=-1)
    model = VisionTransformer(config).eval()
    load_clip_vision(model, peer.state_dict())
    model, peer = model.to(device, dtype), peer.to(device, dtype)

    grids = batch_grids(IMAGE_SIZES).to(device)
    patches = int(grids.prod(dim=1).sum())
    pixel_values = torch.randn(patches, 3 * config.patch_size**2, device=device, dtype=dtype)
    pieces = grids.shape[0]
    images = piece_images(pixel_values, grids, config.patch_size)

    one = batch_grids(IMAGE_SIZES[1:2]).to(device)  # 1024x768: 7 pieces of two distinct lengths
    one_pixels = pixel_values[: int(one.prod(dim=1).sum())]
    methods = {
        f"packed ({model.layout(grids).attend.strategy})": lambda: model(pixel_values, grids),
        **({} if cuda else {MODULE_CALLS: lambda: module_calls(model, pixel_values, grids)}),
        PADDED: lambda: padded_encode(model, pixel_values, grids),
        LOOP: lambda: per_piece_loop(model, pixel_values, grids),
        PEER: lambda: transformers_loop(peer, images),
    }
    floors = {
        MATMULS: unavoidable_work(model, grids, attention=False),
        MATMULS_ATTENTION: unavoidable_work(model, grids, attention=True),
    }
    strategies = ["grouped", "block_mask"] + (
        ["varlen"] if model.layout(one).attend.strategy == "varlen" else []
    )
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        model(one_pixels, one)  # warm-up: one-time allocations and kernel setup, outside every timing
        results = timed(methods | floors, args.repeats)
        outputs = [results[name].output.float() for name in methods]
        for out in outputs[1:]:  # every encoding and the peer compute the same features
            assert (out - outputs[0]).abs().max() <= 1e-3 * outputs[0].abs().max()
        strategy_fns = {
            name: (lambda name=name: model(one_pixels, one, strategy=name)) for name in strategies
        }
        strategy_results = timed(strategy_fns, args.repeats)
        heads, head_dim = config.num_heads, config.hidden_size // config.num_heads
        tiny_qkv = torch.randn(3, sum(TINY_LENGTHS), heads, head_dim, device=device, dtype=dtype).unbind(0)
        tiny_fns = {
            name: (lambda attend=PackedAttention.build(TINY_LENGTHS, device, dtype, name): attend(*tiny_qkv))
            for name in ("grouped", "block_mask")
        }
        tiny_results = timed(tiny_fns, max(args.repeats, 20))

    load_after = os.getloadavg()[0]
    packed = next(iter(results.values()))
    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"
    )
    lines = [
        f"{len(IMAGE_SIZES)} images ({', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)}), paper preset: "
        f"{pieces} pieces, {patches} patches. ViT width {config.hidden_size}, {config.num_heads} heads, "
        f"MLP {config.intermediate_size}, {layers} layers, {str(dtype).removeprefix('torch.')}, {where}; "
        f"best of {args.repeats} interleaved runs; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after (other work shares the cores).",
        "",
        "| encoding | wall s / batch | pieces/s (wall) | CPU s / batch | packed speed-up (wall, CPU) "
        "| slowest / best run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {t.wall:.2f} | {pieces / t.wall:.2f} | {t.cpu:.2f} | "
        f"{t.wall / packed.wall:.2f}x, {t.cpu / packed.cpu:.2f}x | {t.slowest / t.wall:.2f} |"
        for name, t in results.items()
    ]
    lines += [
        "",
        f"Packed attention strategies on one 1024x768 image ({one.shape[0]} pieces):",
        "",
        "| strategy | wall s / image | CPU s / image |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {t.wall:.3f} | {t.cpu:.3f} |" for name, t in strategy_results.items()]
    lines += [
        "",
        f"Attention alone on {len(TINY_LENGTHS)} tiny sequences of {TINY_LENGTHS[0]}-{TINY_LENGTHS[-1]} "
        f"tokens ({heads} heads of {head_dim}):",
        "",
        "| strategy | wall ms | CPU ms |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {1e3 * t.wall:.2f} | {1e3 * t.cpu:.2f} |" for name, t in tiny_results.items()]
    one_grouped, one_block = strategy_results["grouped"], strategy_results["block_mask"]
    tiny_ratio = tiny_results["block_mask"].wall / tiny_results["grouped"].wall
    padded_tokens = padded_layout(model, grids).num_tokens
    packed_tokens = patches + pieces * model.num_prefix
    loop, padded = results[LOOP], results[PADDED]
    vs_loop, vs_padded = loop.wall / packed.wall, padded.wall / packed.wall
    vs_peer = results[PEER].wall / packed.wall
    met = min(vs_loop, vs_padded) >= TARGET_SPEEDUP
    d, inner = config.hidden_size, config.intermediate_size
    linear = 2 * (4 * d * d + 2 * d * inner)  # FLOPs per token per layer: q, k, v, out, fc1, fc2
    attention = 4 * d * packed_tokens / pieces  # QK^T and AV per token per layer, at the mean piece length
    floor = results[MATMULS_ATTENTION]
    lines += [
        "",
        f"Target (packed >= {TARGET_SPEEDUP}x both the loop and the padded batch, wall): "
        f"{'met' if met else 'not met'} in this run ({vs_loop:.2f}x the loop, {vs_padded:.2f}x padded; "
        f"CPU time {loop.cpu / packed.cpu:.2f}x and {padded.cpu / packed.cpu:.2f}x); {vs_peer:.2f}x the "
        "peer's per-piece loop. Our three encodings run the model's blocks the same way (on CPU without "
        "autograd, the fused path below); only the layout of the tokens and the attention differ. "
        f"The token-wise matmuls are {100 * linear / (linear + attention):.0f}% of the FLOPs and cost the "
        "same per real token in every encoding; the floor rows time just them (plus the attention kernels) "
        f"over the packed batch in preallocated buffers: {floor.wall:.2f} s, "
        f"{100 * floor.wall / packed.wall:.0f}% of packed. An encoding that runs these matmuls cannot go "
        f"below that floor, so at best one beats the loop {loop.wall / floor.wall:.2f}x and the padded "
        f"batch {padded.wall / floor.wall:.2f}x on this machine (CPU time: {loop.cpu / floor.cpu:.2f}x and "
        f"{padded.cpu / floor.cpu:.2f}x; below 1x where the run-to-run spread is wider than the gap). "
        f"Packing saves only the rest: padding to the 24x24 grid adds "
        f"{100 * (padded_tokens / packed_tokens - 1):.1f}% tokens (the paper preset plans every piece near "
        "576 patches), and the loop pays per piece, not per distinct grid, for resizing the position table "
        "plus per-call overheads. The last column is the spread of each method over its interleaved runs: on "
        "this shared machine a difference between encodings smaller than it is noise.",
        "",
        "Special paths the encoder keeps: 'auto' attention is 'grouped' on CPU (varlen on CUDA), never one "
        f"block-masked call (O(L^2)), which takes {one_block.wall / one_grouped.wall:.1f}x the grouped time "
        f"on the 1024x768 image and {tiny_ratio:.2f}x on the tiny sequences, where one call saves the most "
        + (
            "per-call overhead: it pays only at such sizes, which no real piece has (the paper preset plans "
            "every piece near 576 patches), so 'auto' does not special-case them. "
            if tiny_ratio < 1
            else "per-call overhead: it does not pay even there. "
        )
        + (
            ""
            if cuda
            else "On CPU, where autograd records nothing (inference, a frozen tower), each block runs fused: on "
            f"chunks of whole pieces of at most {CPU_CHUNK_ROWS} rows, so that its intermediates stay "
            "cache-sized, with q/k/v and the MLP's hidden rows in buffers reused across chunks and the "
            "output projection and fc2 accumulating straight into the residual. The module-calls row is the "
            "same blocks through their plain module calls, the path of autograd, GPUs and ZeRO-3: "
            f"{results[MODULE_CALLS].wall / packed.wall:.2f}x the fused wall time and "
            f"{results[MODULE_CALLS].cpu / packed.cpu:.2f}x its CPU time in this run. "
        )
        + "Everything else runs one path on CPU and GPU.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = "python benchmarks/vision.py" + (f" --layers {args.layers}" if args.layers else "")
        command += f" --repeats {args.repeats}" if args.repeats != parser.get_default("repeats") else ""
        write_section(SECTION, f"Command: `{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
