"""One primitive for training and inference: a training sample and the same conversation prepared for
inference (the answer left open) give the same prompt ids, pixels and piece grids, for every template
and the real tokenizers; the processor's prompt-string call agrees with both."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from llava_uhd.config import TINY
from llava_uhd.data import LlavaDataset
from llava_uhd.errors import PlaceholderMismatchError
from llava_uhd.images import load_image
from llava_uhd.inference.generate import build_prompt, prompt_inputs
from llava_uhd.pixels import draft_size
from llava_uhd.processing import LlavaUHDProcessor
from llava_uhd.slicing import plan_slices
from llava_uhd.templates import IGNORE_INDEX, TEMPLATES, Turn

# A ChatML-style template for the tokenizers that ship without one (the Llama model file, the tiny BPE).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
JPEG_SIZE = (1600, 1200)  # large enough that the fast path decodes it at a reduced DCT scale


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (JPEG_SIZE[1] // 8, JPEG_SIZE[0] // 8, 3), dtype=np.uint8)
    photo = Image.fromarray(noise).resize(JPEG_SIZE, Image.Resampling.BICUBIC)
    photo.save(root / "photo.jpg", quality=90)
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "wide.png")
    return root


@pytest.fixture(scope="module", params=["llama", "qwen", "bpe"])
def processor(request, llama_tokenizer, qwen_tokenizer, bpe_tokenizer) -> LlavaUHDProcessor:
    tokenizer = {"llama": llama_tokenizer, "qwen": qwen_tokenizer, "bpe": bpe_tokenizer}[request.param]
    if tokenizer.chat_template is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = CHATML
    return LlavaUHDProcessor(tokenizer, TINY)  # fast mode: the default, and the one that drafts JPEGs


CASES = {  # record images, the question as asked at inference, the record's human text
    "one-jpeg": (["photo.jpg"], "What colour is it?", "<image>\nWhat colour is it?"),
    "jpeg-and-png": (["photo.jpg", "wide.png"], "Compare them.", "<image>\n<image>\nCompare them."),
}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_sample_and_inference_prompt_agree(processor, folder, template, case) -> None:
    images, question, human = CASES[case]
    record = {
        "id": case,
        "image": images,
        "conversations": [
            {"from": "human", "value": human},
            {"from": "gpt", "value": "Red, mostly."},
        ],
    }
    sample = LlavaDataset([record], folder, processor, template=template)[0]
    prompt = prompt_inputs(processor, [folder / name for name in images], question, template)
    ids = prompt.text.input_ids
    assert sample["input_ids"][: len(ids)].tolist() == ids
    assert (sample["labels"][: len(ids)] == IGNORE_INDEX).all()
    assert (sample["labels"][len(ids) :] != IGNORE_INDEX).any()  # the answer follows the prompt
    assert all(label == IGNORE_INDEX for label in prompt.text.labels)
    assert torch.equal(sample["pixel_values"], prompt.images.pixel_values)
    assert torch.equal(sample["piece_grids"], prompt.images.piece_grids)
    assert torch.equal(sample["pieces_per_image"], prompt.images.pieces_per_image)
    # the prompt-string call on the rendered prompt: the same ids, after the BOS the template adds
    text = build_prompt(question, len(images), template, processor.tokenizer)
    called = processor(text, [folder / name for name in images], add_special_tokens=False)
    bos = TEMPLATES[template].add_bos and processor.tokenizer.bos_token_id is not None
    assert called["input_ids"][0].tolist() == ids[int(bos) :]
    assert torch.equal(called["pixel_values"], prompt.images.pixel_values)


@pytest.mark.parametrize("template", ["vicuna_v1", "chat_template"])
def test_multi_turn_prompt_is_the_training_prefix(processor, folder, template) -> None:
    history = [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A page."),
        Turn("user", "And its colour?"),
    ]
    sources = [folder / "wide.png"]
    training = processor.prepare([*history, Turn("assistant", "Red.")], sources, template)
    prompt = processor.prepare(history, sources, template, generation_prompt=True)
    n = len(prompt.text.input_ids)
    assert training.text.input_ids[:n] == prompt.text.input_ids
    assert any(label != IGNORE_INDEX for label in training.text.labels[n:])  # the last answer


def test_jpegs_are_drafted_on_both_paths(llama_tokenizer, folder) -> None:
    """One decoding rule: in fast mode a training JPEG is decoded at the DCT scale its plan allows, as at
    inference; exact mode decodes in full on both paths."""
    plan = plan_slices(*JPEG_SIZE, TINY.slicing)
    assert load_image(folder / "photo.jpg", draft_size=draft_size(plan)).size == (800, 600)
    record = {
        "id": "j",
        "image": "photo.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nHi"},
            {"from": "gpt", "value": "Hello."},
        ],
    }
    for mode in ("fast", "exact"):
        processor = LlavaUHDProcessor(llama_tokenizer, TINY, resize_mode=mode)
        sample = LlavaDataset([record], folder, processor)[0]
        alone = processor.process_images([folder / "photo.jpg"])
        assert torch.equal(sample["pixel_values"], alone.pixel_values), mode


def test_prepare_checks_the_placeholder_count(llama_tokenizer, folder) -> None:
    processor = LlavaUHDProcessor(llama_tokenizer, TINY)
    with pytest.raises(PlaceholderMismatchError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        processor.prepare(
            [Turn("user", "<image> hi")], [folder / "wide.png"] * 2, "vicuna_v1", generation_prompt=True
        )


def test_the_processor_leaves_the_callers_tokenizer_alone(llama_tokenizer) -> None:
    vocab = len(llama_tokenizer)
    processor = LlavaUHDProcessor(llama_tokenizer, TINY)
    assert "<image>" not in llama_tokenizer.get_vocab() and len(llama_tokenizer) == vocab
    assert processor.tokenizer.convert_ids_to_tokens(processor.image_token_id) == "<image>"
    again = LlavaUHDProcessor(processor.tokenizer, TINY)
    assert again.tokenizer is processor.tokenizer  # already has the token: used as is
