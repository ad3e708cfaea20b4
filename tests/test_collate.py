"""Collate (mixed slice counts, text-only samples, padding sides) and the length-grouped sampler."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from PIL import Image

from llava_uhd.config import TINY
from llava_uhd.data import LengthGroupedSampler, LlavaCollator, LlavaDataset, padding_fraction, rank_batches
from llava_uhd.errors import ConfigError
from llava_uhd.processing import LlavaUHDProcessor
from llava_uhd.templates import IGNORE_INDEX

Q = TINY.resampler.num_queries


@pytest.fixture(scope="module")
def processor(llama_tokenizer):
    # exact resizing, so pixels can be checked against apply_plan; a copy: the processor adds <image>
    return LlavaUHDProcessor(copy.deepcopy(llama_tokenizer), TINY, resize_mode="exact")


@pytest.fixture(scope="module")
def samples(processor, tmp_path_factory):
    root = tmp_path_factory.mktemp("collate")
    Image.new("RGB", (400, 150), (200, 30, 30)).save(root / "wide.png")
    Image.new("RGB", (100, 100), (30, 200, 30)).save(root / "square.png")  # 1 piece
    records = [
        {
            "id": "wide",
            "image": "wide.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "What is two plus two, written as a word?"},
                {"from": "gpt", "value": "Four."},
            ],
        },
        {
            "id": "square",
            "image": "square.png",
            "conversations": [
                {"from": "human", "value": "<image>\nAnd this one?"},
                {"from": "gpt", "value": "Green, quite bright."},
            ],
        },
    ]
    ds = LlavaDataset(records, root, processor)
    return [ds[i] for i in range(len(ds))]


def test_collate_right_padding_mixed_slices_and_text_only(processor, samples):
    batch = LlavaCollator.for_tokenizer(processor.tokenizer)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "piece_grids"}
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    pad = processor.tokenizer.unk_token_id  # the Llama fixture has no pad token: LLaVA pads with unk
    for b, s in enumerate(samples):
        n = lengths[b]
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"])
        assert torch.equal(batch["labels"][b, :n], s["labels"])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][b, n:] == pad).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
    # pieces in sample order, the text-only sample contributing none; slice counts differ per image
    wide, square = samples[0]["piece_grids"], samples[2]["piece_grids"]
    assert len(wide) != len(square) and len(samples[1]["piece_grids"]) == 0
    assert torch.equal(batch["piece_grids"], torch.cat([wide, square]))
    assert torch.equal(
        batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]])
    )
    # the model's contract: placeholders == pieces * Q, and patches == sum(rows * cols)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == len(batch["piece_grids"]) * Q
    assert batch["pixel_values"].shape[0] == int(batch["piece_grids"].prod(dim=1).sum())


def test_collate_left_padding_for_generation(processor, samples):
    prompts = [
        {"input_ids": s["input_ids"][:-3], "pixel_values": s["pixel_values"], "piece_grids": s["piece_grids"]}
        for s in samples
    ]
    batch = LlavaCollator.for_tokenizer(processor.tokenizer, padding_side="left")(prompts)
    assert "labels" not in batch
    width = batch["input_ids"].shape[1]
    for b, p in enumerate(prompts):
        n = len(p["input_ids"])
        assert torch.equal(batch["input_ids"][b, width - n :], p["input_ids"])
        assert batch["attention_mask"][b].tolist() == [0] * (width - n) + [1] * n
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_collate_text_only_batch_and_errors(processor, samples):
    collate = LlavaCollator.for_tokenizer(processor.tokenizer)
    batch = collate([samples[1], samples[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(ConfigError, match=r"batch positions \[1\] hold no sample"):
        collate([samples[0], None])
    with pytest.raises(ConfigError, match="padding_side must be 'right' or 'left', got 'top'"):
        LlavaCollator(0, "top")


def _lengths(n: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths like LLaVA's mix: mostly short answers, some long conversations."""
    rng = random.Random(seed)
    return [int(rng.lognormvariate(5.5, 0.7)) + 1 for _ in range(n)]


def test_grouping_reduces_padding_against_random_order():
    lengths, batch_size = _lengths(2000), 8
    sampler = LengthGroupedSampler(lengths, batch_size, seed=3)
    grouped = padding_fraction(lengths, rank_batches(sampler))
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    shuffled = padding_fraction(
        lengths, [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    )
    assert shuffled > 0.3
    assert grouped < shuffled / 4


def test_padding_fraction_exact():
    assert padding_fraction([2, 4, 4, 4], [[0, 1], [2, 3]]) == pytest.approx(1 - 14 / 16)
    assert padding_fraction([5], [[0]]) == 0.0


def test_sampler_deterministic_per_seed_epoch_and_covers_each_index_once():
    lengths = _lengths(96)
    a, b = LengthGroupedSampler(lengths, 4, seed=1), LengthGroupedSampler(lengths, 4, seed=1)
    assert list(a) == list(b)
    assert sorted(a) == list(range(96)) and len(a) == 96
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0 and sorted(a) == list(range(96))
    assert list(LengthGroupedSampler(lengths, 4, seed=2)) != epoch0


def test_sampler_distributed_ranks_partition_and_match_lengths():
    lengths, batch_size, world = _lengths(100), 4, 3
    ranks = [
        LengthGroupedSampler(lengths, batch_size, world_size=world, rank=r, seed=5) for r in range(world)
    ]
    for s in ranks:
        s.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    assert len(ranks[0]) == 9 * batch_size  # ceil(100 / 12) global batches, padded by wrapping
    seen = [i for p in per_rank for i in p]
    assert set(seen) == set(range(100)) and len(seen) == 108  # 8 repeats fill the last global batch
    # same step on every rank comes from the same global batch: lengths of the same order
    step_batches = [rank_batches(s) for s in ranks]
    global_batches = ranks[0].global_batches()
    for step in range(9):
        assert sorted(i for r in range(world) for i in step_batches[r][step]) == sorted(global_batches[step])
    dropped = LengthGroupedSampler(lengths, batch_size, world_size=world, rank=1, seed=5, drop_last=True)
    assert len(dropped) == 8 * batch_size and len(set(dropped)) == len(dropped)


def test_sampler_rejects_bad_settings():
    with pytest.raises(ConfigError, match=r"rank must be in \[0, 2\), got 2"):
        LengthGroupedSampler([1, 2], 1, world_size=2, rank=2)
    with pytest.raises(ConfigError, match="cannot fill one global batch of 8 with drop_last"):
        LengthGroupedSampler([1, 2, 3], 4, world_size=2, drop_last=True)


def test_dataloader_with_workers_and_sampler(processor, samples, tmp_path):
    """Slicing runs in worker processes; batches come out grouped and collated."""
    from llava_uhd.synth import make_dataset

    data = make_dataset(
        tmp_path, n=8, seed=0, kinds=("caption", "qa", "text"), sizes=((224, 112), (112, 112))
    )
    ds = LlavaDataset(data.json_path, data.image_folder, processor)
    sampler = LengthGroupedSampler(ds.lengths(), batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=4,
        sampler=sampler,
        num_workers=2,
        collate_fn=LlavaCollator.for_tokenizer(processor.tokenizer),
    )
    batches = list(loader)
    assert len(batches) == 2
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for batch in batches:
        assert int((batch["input_ids"] == image_id).sum()) == len(batch["piece_grids"]) * Q
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(ds.lengths())
