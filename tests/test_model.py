"""The LLaVA-UHD model glue on the tiny preset: placeholder filling, batching, loss, generation, training.

Inputs are built by hand following docs/INTERFACES.md (Q placeholders per piece, separator ids from the
tokenizer, pieces packed in batch order), so these tests do not depend on the processor.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llava_uhd.config import TINY
from llava_uhd.errors import PlaceholderMismatchError
from llava_uhd.model.configuration import LlavaUHDConfig
from llava_uhd.model.llava_uhd import LlavaUHDForConditionalGeneration
from llava_uhd.slicing import plan_slices

IMAGE_TOKEN = "<image>"
PATCH_VALUES = 3 * TINY.vision.patch_size**2
Q = TINY.resampler.num_queries
# Tiny-preset image sizes (S = 112): 6 slices (3x2) + overview, 2 slices + overview, overview only.
WIDE, PAIR, SMALL = (336, 224), (224, 112), (100, 80)


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)  # the session fixture stays without <image>
    vocab_before = len(tok)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.lm_vocab = vocab_before  # the LM's vocabulary excludes <image>: it is never looked up
    return tok


def make_model(tokenizer, seed: int = 0) -> LlavaUHDForConditionalGeneration:
    torch.manual_seed(seed)
    text = {**TINY.text.config, "vocab_size": tokenizer.lm_vocab, "pad_token_id": tokenizer.pad_token_id}
    preset = TINY.with_overrides(text={"config": text})
    config = LlavaUHDConfig.from_preset(preset, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return LlavaUHDForConditionalGeneration(config).eval()


def image_ids(tokenizer, size: tuple[int, int]) -> tuple[list[int], list[tuple[int, int]]]:
    """The layout of one image (docs/design.md section 6) and its pieces' (rows, cols) grids."""
    plan = plan_slices(*size, TINY.slicing)
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids: list[int] = []
    for sep in plan.separators:
        ids += [image] * Q + tokenizer.encode(sep, add_special_tokens=False)
    ids += [image] * Q
    return ids, [(g.rows, g.cols) for g in plan.piece_grids]


def sample(tokenizer, prompt: str, sizes: list[tuple[int, int]], answer: str = "") -> dict:
    ids, grids = [tokenizer.bos_token_id], []
    for size in sizes:
        more, g = image_ids(tokenizer, size)
        ids += more
        grids += g
    prompt_ids = ids + tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + (
        [tokenizer.eos_token_id] if answer else []
    )
    return {"ids": prompt_ids + answer_ids, "prompt_len": len(prompt_ids), "grids": grids}


def collate(tokenizer, samples: list[dict], padding_side: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Pad text, pack every piece's random pixels in batch order, labels only on the answers."""
    longest = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), longest), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, s in enumerate(samples):
        n = len(s["ids"])
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        ids[row, span] = torch.tensor(s["ids"])
        mask[row, span] = 1
        row_labels = torch.tensor(s["ids"])
        row_labels[: s["prompt_len"]] = -100
        labels[row, span] = row_labels
    grids = torch.tensor([g for s in samples for g in s["grids"]], dtype=torch.long).reshape(-1, 2)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grids.prod(dim=1).sum()), PATCH_VALUES, generator=generator)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if grids.numel():
        batch |= {"pixel_values": pixels, "piece_grids": grids}
    return batch


def mixed_samples(tokenizer) -> list[dict]:
    return [
        sample(tokenizer, " What is in the image?", [WIDE], " A red square."),
        sample(tokenizer, " Compare the two images.", [PAIR, SMALL], " A blue circle."),
        sample(tokenizer, " The quick brown fox", [], " jumps over the lazy dog."),
    ]


def test_placeholders_filled_in_order(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = collate(tokenizer, mixed_samples(tokenizer), "right")
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["piece_grids"])
        features = model.encode_pieces(batch["pixel_values"], batch["piece_grids"])  # (N, Q, D)
        text = model.get_input_embeddings()(batch["input_ids"].clamp(max=tokenizer.lm_vocab - 1))
    assert features.shape == (7 + 3 + 1, Q, TINY.text.config["hidden_size"])
    image = batch["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(embeds[image], features.reshape(-1, features.shape[-1]), rtol=0, atol=0)
    torch.testing.assert_close(embeds[~image], text[~image], rtol=0, atol=0)
    # the <image> id lies outside the LM's vocabulary: it is never looked up
    assert model.config.image_token_id >= model.get_input_embeddings().num_embeddings


def test_mixed_batch_matches_each_sample_alone(tokenizer) -> None:
    model = make_model(tokenizer)
    samples = mixed_samples(tokenizer)
    batch = collate(tokenizer, samples, "right")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, tokenizer.lm_vocab)
    assert torch.isfinite(out.loss)
    pixel_rows = 0
    for row, s in enumerate(samples):
        alone = collate(tokenizer, [s], "right")
        if "pixel_values" in alone:  # the same pixels as in the batch, taken from the packed tensor
            rows = alone["pixel_values"].shape[0]
            alone["pixel_values"] = batch["pixel_values"][pixel_rows : pixel_rows + rows]
            pixel_rows += rows
        with torch.no_grad():
            single = model(**alone).logits[0]
        n = len(s["ids"])
        torch.testing.assert_close(out.logits[row, :n], single, atol=1e-4, rtol=1e-4)


def test_loss_ignores_prompt_and_padding(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = collate(tokenizer, mixed_samples(tokenizer), "right")
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


def test_placeholder_mismatch_names_both_counts(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = collate(tokenizer, [sample(tokenizer, " hi", [PAIR])], "right")
    batch["input_ids"][0, 1] = tokenizer.pad_token_id  # one placeholder fewer than 3 pieces x Q
    with pytest.raises(PlaceholderMismatchError, match=rf"{3 * Q - 1} image placeholder.*{3 * Q} features"):
        model(**batch)
    del batch["pixel_values"], batch["piece_grids"]
    with pytest.raises(PlaceholderMismatchError, match=rf"{3 * Q - 1} image placeholder.*0 features"):
        model(**batch)


def test_gradient_reaches_resampler_queries_and_vit(tokenizer) -> None:
    model = make_model(tokenizer).train()
    model(**collate(tokenizer, mixed_samples(tokenizer)[:2], "right")).loss.backward()
    assert model.resampler.query.grad.abs().sum() > 0
    assert model.vision_tower.patch_embed.weight.grad.abs().sum() > 0


def test_bfloat16_forward(tokenizer) -> None:
    model = make_model(tokenizer).to(torch.bfloat16)
    batch = collate(tokenizer, mixed_samples(tokenizer), "right")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def _generation_batch(tokenizer) -> dict[str, torch.Tensor]:
    samples = [
        sample(tokenizer, " What is in the image?", [WIDE]),
        sample(tokenizer, " Two images:", [PAIR, SMALL]),
        sample(tokenizer, " The quick brown", []),
    ]
    batch = collate(tokenizer, samples, "left")
    del batch["labels"]
    return batch


GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 3}


def test_greedy_with_cache_equals_without(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    cached = model.generate(**batch, **GREEDY)
    uncached = model.generate(**batch, **GREEDY, use_cache=False)
    assert cached.shape == (3, batch["input_ids"].shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_left_padded_batch_generates_like_each_sample_alone(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    together = model.generate(**batch, **GREEDY)[:, -6:]
    pixel_rows, piece_rows = 0, 0
    for row in range(3):
        keep = batch["attention_mask"][row].bool()
        alone = {"input_ids": batch["input_ids"][row, keep][None]}
        pieces = int((alone["input_ids"] == model.config.image_token_id).sum()) // Q
        if pieces:
            grids = batch["piece_grids"][piece_rows : piece_rows + pieces]
            rows = int(grids.prod(dim=1).sum())
            alone |= {
                "pixel_values": batch["pixel_values"][pixel_rows : pixel_rows + rows],
                "piece_grids": grids,
            }
            piece_rows, pixel_rows = piece_rows + pieces, pixel_rows + rows
        assert torch.equal(model.generate(**alone, **GREEDY)[0, -6:], together[row]), row


def test_beam_search_expands_pieces_per_row(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    ids, kwargs = model._expand_inputs_for_generation(
        expand_size=3,
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        piece_grids=batch["piece_grids"],
        attention_mask=batch["attention_mask"],
    )
    grids, pixels = batch["piece_grids"], batch["pixel_values"]
    first, second = grids[:7], grids[7:]  # row 0 has 7 pieces, row 1 has 3 + 1, row 2 none
    assert torch.equal(kwargs["piece_grids"], torch.cat([first] * 3 + [second] * 3))
    split = int(first.prod(dim=1).sum())
    assert torch.equal(kwargs["pixel_values"], torch.cat([pixels[:split]] * 3 + [pixels[split:]] * 3))
    assert torch.equal(ids, batch["input_ids"].repeat_interleave(3, dim=0))


@pytest.mark.parametrize("beams", [3, 5])
def test_beam_search_runs_and_one_beam_is_greedy(tokenizer, beams: int) -> None:
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    out = model.generate(**batch, max_new_tokens=4, num_beams=beams, num_return_sequences=2, pad_token_id=3)
    assert out.shape == (6, batch["input_ids"].shape[1] + 4)
    one_beam = model.generate(**batch, max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=3)
    assert torch.equal(one_beam, model.generate(**batch, **{**GREEDY, "max_new_tokens": 4}))


def test_sampling_is_seeded(tokenizer) -> None:
    model = make_model(tokenizer)
    batch = _generation_batch(tokenizer)
    options = {"max_new_tokens": 5, "do_sample": True, "top_k": 20, "temperature": 1.5, "pad_token_id": 3}
    torch.manual_seed(7)
    first = model.generate(**batch, **options)
    torch.manual_seed(7)
    assert torch.equal(first, model.generate(**batch, **options))


def test_overfits_one_batch_with_different_slice_counts(tokenizer) -> None:
    model = make_model(tokenizer).train()
    samples = [
        sample(tokenizer, " What is in the image?", [WIDE], " A red square on a white page."),
        sample(tokenizer, " What is in the image?", [PAIR], " A blue circle next to it."),
    ]
    batch = collate(tokenizer, samples, "right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    # 50 steps: at 30, whether the loss is under 0.3 yet depends on the init's seed (over 8 seeds it is for
    # some; by 50 steps every one is under 0.1)
    for _ in range(50):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.0
    assert min(losses[-3:]) < 0.3, losses[::5]
