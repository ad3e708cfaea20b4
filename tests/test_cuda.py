"""The code paths only a GPU runs: varlen flash attention, the full CLIP-L tower in bf16, the model on CUDA.

Skipped without CUDA (CI is CPU-only). On a lent GPU: ``HF_HUB_OFFLINE=1 pytest -q tests/test_cuda.py``.
bf16 results are compared by norm-relative error (||a - b|| / ||b||): bf16 keeps 8 mantissa bits, so a
single rounding is ~4e-3 relative and a deep tower accumulates a few of them.
"""

from __future__ import annotations

import pytest
import torch

from llava_uhd.config import PAPER, TINY, ResamplerConfig, VisionConfig
from llava_uhd.model.attention import PackedAttention
from llava_uhd.model.vision import VisionTransformer
from llava_uhd.slicing import plan_slices
from test_model import GREEDY, _generation_batch, collate, make_model, mixed_samples, tokenizer  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float().cpu(), expected.float().cpu()
    return float((actual - expected).norm() / expected.norm())


def paper_grids(sizes: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([list(g) for w, h in sizes for g in plan_slices(w, h, PAPER.slicing).piece_grids])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attention_matches_grouped_in_float32(dtype):
    lengths = [577, 561, 561, 9, 1, 609]  # CLS + patches of real pieces, a strip, a single patch
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, sum(lengths), 16, 64, generator=generator).to(CUDA).unbind(0)
    varlen = PackedAttention.build(lengths, CUDA, dtype)  # "auto" must pick the varlen kernel on CUDA
    assert varlen.strategy == "varlen"
    expected = PackedAttention.build(lengths, CUDA, torch.float32, "grouped")(q, k, v)
    actual = varlen(q.to(dtype), k.to(dtype), v.to(dtype))
    assert actual.dtype == dtype and actual.shape == q.shape
    assert relative_error(actual, expected) < 1e-2


def test_full_clip_l_tower_in_bf16_packed_equals_each_piece_alone():
    """24 layers at CLIP-L/14-336 size, bf16, varlen: the batch packed equals each piece encoded alone,
    and both stay near the float32 tower."""
    torch.manual_seed(0)
    model = VisionTransformer(VisionConfig()).to(CUDA).eval()
    grids = paper_grids([(1024, 768), (4000, 100), (336, 336)]).to(CUDA)
    counts = grids.prod(dim=1).tolist()
    pixels = torch.randn(sum(counts), 3 * 14 * 14, device=CUDA)
    with torch.inference_mode():
        reference = model(pixels, grids)  # float32: grouped SDPA
        model = model.to(torch.bfloat16)
        assert model.layout(grids).attend.strategy == "varlen"
        packed = model(pixels.bfloat16(), grids)
        alone = torch.cat([model(p, grids[i : i + 1]) for i, p in enumerate(pixels.bfloat16().split(counts))])
    assert packed.shape == (sum(counts), 1024) and packed.dtype == torch.bfloat16
    assert relative_error(packed, alone) < 1e-2
    assert relative_error(packed, reference) < 5e-2


@pytest.mark.parametrize(
    "resampler",
    [TINY.resampler, ResamplerConfig(kind="windowed", num_queries=16, num_heads=4)],
    ids=["perceiver", "windowed"],
)
def test_model_on_cuda_matches_cpu(tokenizer, resampler, monkeypatch):  # noqa: F811
    import test_model

    monkeypatch.setattr(test_model, "TINY", TINY.with_overrides(resampler=vars(resampler)))
    model = make_model(tokenizer)
    batch = collate(tokenizer, mixed_samples(tokenizer), "right")
    with torch.no_grad():
        expected = model(**batch)
        gpu = model.to(CUDA)
        actual = gpu(**{k: v.to(CUDA) for k, v in batch.items()})
    assert torch.allclose(actual.logits.cpu(), expected.logits, atol=1e-4, rtol=1e-4)
    assert abs(actual.loss.item() - expected.loss.item()) < 1e-4

    generation = _generation_batch(tokenizer)
    on_cpu = model.to("cpu").generate(**generation, **GREEDY)
    on_gpu = model.to(CUDA).generate(**{k: v.to(CUDA) for k, v in generation.items()}, **GREEDY)
    assert torch.equal(on_gpu.cpu(), on_cpu)

    with torch.no_grad():
        half = model.to(torch.bfloat16)(**{k: v.to(CUDA) for k, v in batch.items()})
    assert torch.isfinite(half.loss) and relative_error(half.logits, expected.logits) < 5e-2


@pytest.mark.parametrize("method", ["bnb-8bit", "bnb-4bit"])
def test_bitsandbytes_quantizes_the_lm_and_keeps_the_vision_side(tmp_path, method):
    """bitsandbytes 8/4-bit on the language model: logits near bf16, the vision tower untouched."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from llava_uhd.auto import load_pretrained
    from llava_uhd.bundled import bundled_model_dir
    from llava_uhd.model.quantization import module_bytes, quantization_config

    folder = bundled_model_dir()
    full, processor = load_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    quantized, _ = load_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=quantization_config(method)
    )
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": plan_image()}, {"type": "text", "text": "Hi"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    inputs = {k: v.to(CUDA) for k, v in inputs.items()}
    with torch.no_grad():
        expected, got = full(**inputs).logits, quantized(**inputs).logits
    assert relative_error(got, expected) < (0.05 if method == "bnb-8bit" else 0.2)
    assert module_bytes(quantized.language_model) < module_bytes(full.language_model)
    assert module_bytes(quantized.vision_tower) == module_bytes(full.vision_tower)


def plan_image():
    from PIL import Image

    return Image.new("RGB", (640, 480), (200, 30, 30))
