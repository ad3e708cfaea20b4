"""The transformers way in: chat messages with image parts, the processor's chat template, AutoProcessor,
pipeline("image-text-to-text") and streaming, checked against the training path on real tokenizers."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import shutil
import threading

import pytest
import torch
from PIL import Image

from llava_uhd.auto import load_pretrained
from llava_uhd.bundled import bundled_model_dir
from llava_uhd.config import TINY
from llava_uhd.data import LlavaDataset
from llava_uhd.errors import ConfigError, ImageLoadError
from llava_uhd.image_processing import LlavaUHDImageProcessor
from llava_uhd.inference.generate import answer
from llava_uhd.processing import CHAT_TEMPLATE_FILE, PROCESSOR_CONFIG_FILE, LlavaUHDProcessor
from llava_uhd.templates import TEMPLATES, MalformedConversationError, Turn

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "wide.png")
    Image.new("RGB", (90, 120), (20, 20, 220)).save(root / "tall.png")
    return root


@pytest.fixture(scope="module", params=["llama", "qwen", "bpe"])
def tokenizer(request, llama_tokenizer, qwen_tokenizer, bpe_tokenizer):
    chosen = {"llama": llama_tokenizer, "qwen": qwen_tokenizer, "bpe": bpe_tokenizer}[request.param]
    if chosen.chat_template is None:
        chosen = copy.deepcopy(chosen)
        chosen.chat_template = CHATML
    return chosen


def _processor(tokenizer, template: str) -> LlavaUHDProcessor:
    return LlavaUHDProcessor(tokenizer, dataclasses.replace(TINY, template=template))


def _messages(folder, answer_text: str | None = None) -> list[dict]:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(folder / "wide.png")},
                {"type": "image", "path": str(folder / "tall.png")},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    if answer_text is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer_text}]})
    return messages


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_the_jinja_template_renders_the_training_text(tokenizer, folder, template) -> None:
    processor = _processor(tokenizer, template)
    turns = [Turn("user", "<image>\n<image>\nCompare them.")]
    rendered = processor.apply_chat_template(_messages(folder), add_generation_prompt=True)
    assert rendered == TEMPLATES[template].generation_prompt(turns, processor.tokenizer)
    whole = processor.apply_chat_template(_messages(folder, "Red, then blue."))
    pieces = TEMPLATES[template].render([*turns, Turn("assistant", "Red, then blue.")], processor.tokenizer)
    assert whole == "".join(piece.text for piece in pieces)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_chat_template_ids_are_the_training_ids(tokenizer, folder, template) -> None:
    processor = _processor(tokenizer, template)
    record = {
        "id": "two",
        "image": ["wide.png", "tall.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare them."},
            {"from": "gpt", "value": "Red, then blue."},
        ],
    }
    sample = LlavaDataset([record], folder, processor, template=template)[0]
    inputs = processor.apply_chat_template(
        _messages(folder), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    ids = inputs["input_ids"][0].tolist()
    assert sample["input_ids"][: len(ids)].tolist() == ids
    assert inputs["attention_mask"].tolist() == [[1] * len(ids)]
    for key in ("pixel_values", "piece_grids", "pieces_per_image"):
        assert torch.equal(inputs[key], sample[key]), key
    whole = processor.apply_chat_template(_messages(folder, "Red, then blue."), tokenize=True)
    assert whole[0].tolist() == sample["input_ids"].tolist()
    # transformers' two-step flow: the rendered text through the processor call, after the template's BOS
    text = processor.apply_chat_template(_messages(folder), add_generation_prompt=True)
    images = [folder / "wide.png", folder / "tall.png"]
    called = processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")
    bos = TEMPLATES[template].add_bos and processor.tokenizer.bos_token_id is not None
    assert called["input_ids"][0].tolist() == ids[int(bos) :]


def test_continuing_the_final_message_extends_the_prompt_like_training(llama_tokenizer, folder) -> None:
    processor = _processor(llama_tokenizer, "vicuna_v1")
    record = {
        "id": "two",
        "image": ["wide.png", "tall.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare them."},
            {"from": "gpt", "value": "Red, then blue."},
        ],
    }
    sample = LlavaDataset([record], folder, processor)[0]
    ids = processor.apply_chat_template(_messages(folder, "Red,"), continue_final_message=True, tokenize=True)
    assert ids[0].tolist() == sample["input_ids"][: ids.shape[1]].tolist()
    prompt = processor.apply_chat_template(_messages(folder), add_generation_prompt=True, tokenize=True)
    assert ids.shape[1] > prompt.shape[1]
    with pytest.raises(MalformedConversationError, match="add_generation_prompt"):
        processor.apply_chat_template(_messages(folder, "Red."), add_generation_prompt=True, tokenize=True)


def test_a_batch_of_conversations_is_left_padded_with_pieces_in_order(llama_tokenizer, folder) -> None:
    processor = _processor(llama_tokenizer, "vicuna_v1")
    short = [{"role": "user", "content": [{"type": "image", "image": str(folder / "tall.png")}]}]
    batch = processor.apply_chat_template(
        [_messages(folder), short], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    alone = [
        processor.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)
        for m in (_messages(folder), short)
    ]
    lengths = [a["input_ids"].shape[1] for a in alone]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][1, -lengths[1] :].tolist() == alone[1]["input_ids"][0].tolist()
    assert batch["attention_mask"][1, 0] == 0  # left padding: the shorter prompt ends at the right edge
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    texts = processor.apply_chat_template([_messages(folder), short], add_generation_prompt=True)
    assert isinstance(texts, list) and len(texts) == 2


def test_image_parts_read_pil_paths_bytes_and_base64_alike(llama_tokenizer, folder) -> None:
    processor = _processor(llama_tokenizer, "vicuna_v1")
    data = (folder / "wide.png").read_bytes()
    parts = [
        {"type": "image", "image": Image.open(folder / "wide.png")},
        {"type": "image", "image": str(folder / "wide.png")},
        {"type": "image", "image": data},
        {"type": "image", "base64": base64.b64encode(data).decode()},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
        },
    ]
    outputs = [
        processor.apply_chat_template(
            [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        for part in parts
    ]
    for out in outputs[1:]:
        assert torch.equal(out["input_ids"], outputs[0]["input_ids"])
        assert torch.equal(out["pixel_values"], outputs[0]["pixel_values"])


def test_bad_messages_are_one_line_errors(llama_tokenizer) -> None:
    processor = _processor(llama_tokenizer, "vicuna_v1")
    remote = [{"role": "user", "content": [{"type": "image", "url": "https://example.com/a.png"}]}]
    with pytest.raises(ImageLoadError, match="remote URL"):
        processor.apply_chat_template(remote, add_generation_prompt=True, tokenize=True)
    video = [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}]
    with pytest.raises(MalformedConversationError, match="'text' or 'image'"):
        processor.apply_chat_template(video, add_generation_prompt=True, tokenize=True)
    with pytest.raises(ConfigError, match="unknown processor_kwargs"):
        processor.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=True, processor_kwargs={"crop": 1}
        )


def test_saved_folder_holds_the_chat_template_and_loads_through_auto_processor(bpe_tokenizer, tmp_path):
    from transformers import AutoProcessor

    processor = _processor(bpe_tokenizer, "vicuna_v1")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / CHAT_TEMPLATE_FILE).read_text() == processor.chat_template
    assert (tmp_path / PROCESSOR_CONFIG_FILE).is_file()
    # the loading options a pipeline passes are taken by transformers, not handed to our constructor
    loaded = AutoProcessor.from_pretrained(tmp_path, _from_pipeline="image-text-to-text", revision="main")
    assert isinstance(loaded, LlavaUHDProcessor) and not loaded.custom_chat_template
    assert loaded.chat_template == processor.chat_template
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(CHATML)
    edited = LlavaUHDProcessor.from_pretrained(tmp_path)
    assert edited.custom_chat_template
    assert (
        edited.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_auto_image_processor_loads_the_saved_image_processor(bpe_tokenizer, folder, tmp_path) -> None:
    from transformers import AutoImageProcessor, AutoProcessor

    processor = LlavaUHDProcessor(bpe_tokenizer, TINY, resize_mode="exact")  # neither is the default
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaUHDImageProcessor
    assert loaded.slicing == TINY.slicing != LlavaUHDImageProcessor().slicing
    assert loaded.resize_mode == "exact"
    images = [folder / "wide.png", folder / "tall.png"]
    got, expected = loaded(images), processor.process_images(images)
    assert torch.equal(got["pixel_values"], expected.pixel_values)
    assert torch.equal(got["piece_grids"], expected.piece_grids)
    assert AutoProcessor.from_pretrained(tmp_path).image_processor.to_dict() == loaded.to_dict()
    saved = json.loads((tmp_path / PROCESSOR_CONFIG_FILE).read_text())
    saved["image_processor"]["slicing"]["max_slices"] = 2
    (tmp_path / PROCESSOR_CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="slicing differs from llava_uhd_preset.yaml"):
        LlavaUHDProcessor.from_pretrained(tmp_path)


def test_a_folder_saved_before_chat_templates_loads_with_the_presets_template(tmp_path) -> None:
    for source in bundled_model_dir().iterdir():  # the older layout: no chat template, no processor config
        if source.name not in (CHAT_TEMPLATE_FILE, PROCESSOR_CONFIG_FILE, "model.safetensors"):
            shutil.copy(source, tmp_path / source.name)
    processor = LlavaUHDProcessor.from_pretrained(tmp_path)
    assert processor.chat_template.startswith('{%- set IMAGE = "<image>"')
    assert not processor.custom_chat_template


@pytest.fixture(scope="module")
def bundled():
    return load_pretrained(bundled_model_dir())


def test_pipeline_answers_like_the_package(bundled, folder) -> None:
    from transformers import pipeline

    model, processor = bundled
    pipe = pipeline("image-text-to-text", model=str(bundled_model_dir()))
    image = Image.open(folder / "wide.png")
    question = "What colour is the page?"
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]
    expected = answer(model, processor, image, question, max_new_tokens=6)
    single = pipe(text=messages, max_new_tokens=6, return_full_text=False)
    assert single[0]["generated_text"].strip() == expected
    batched = pipe(text=[messages, messages], max_new_tokens=6, return_full_text=False)
    assert [out[0]["generated_text"].strip() for out in batched] == [expected, expected]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    from_text = pipe(images=image, text=prompt, max_new_tokens=6, return_full_text=False)
    assert from_text[0]["generated_text"].strip() == expected
    torch.manual_seed(0)
    sampled = pipe(text=messages, max_new_tokens=6, generate_kwargs={"do_sample": True, "temperature": 1.5})
    assert sampled[0]["generated_text"][-1]["role"] == "assistant"


def test_streamed_text_is_the_generated_text(bundled, folder) -> None:
    from transformers import TextIteratorStreamer

    model, processor = bundled
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(folder / "tall.png")},
                {"type": "text", "text": "Which words?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    with torch.inference_mode():
        plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = processor.decode(plain[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(
        target=model.generate,
        kwargs={**inputs, "max_new_tokens": 12, "do_sample": False, "streamer": streamer},
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == expected and expected.strip()


def test_the_image_processor_alone_plans_each_image(llama_tokenizer, folder) -> None:
    processor = _processor(llama_tokenizer, "vicuna_v1")
    alone = processor.image_processor([folder / "wide.png", folder / "tall.png"], return_tensors="pt")
    together = processor.process_images([folder / "wide.png", folder / "tall.png"])
    assert torch.equal(alone["pixel_values"], together.pixel_values)
    assert torch.equal(alone["piece_grids"], together.piece_grids)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, format="PNG")
    assert processor.image_processor(buffer.getvalue())["pieces_per_image"].tolist() == [1]


def test_a_saved_folder_has_the_hub_layout_and_loads_through_the_auto_classes(bpe_tokenizer, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    from llava_uhd.auto import save_pretrained
    from llava_uhd.model import LlavaUHDConfig, LlavaUHDForConditionalGeneration
    from llava_uhd.slicing import plan_slices

    processor = _processor(bpe_tokenizer, "vicuna_v1")
    text = {**TINY.text.config, "vocab_size": len(processor.tokenizer)}
    config = LlavaUHDConfig.from_preset(
        TINY.with_overrides(text={"config": text}), image_token_id=processor.image_token_id
    )
    save_pretrained(tmp_path, LlavaUHDForConditionalGeneration(config), processor)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        CHAT_TEMPLATE_FILE,
        PROCESSOR_CONFIG_FILE,
        "README.md",
    } <= names
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    plan = plan_slices(640, 480, TINY.slicing)
    tokens = (plan.num_slices + 1) * TINY.resampler.num_queries + plan.num_slices
    assert f"| 640x480 | {plan.grid.cols}x{plan.grid.rows} | {plan.num_slices + 1} | {tokens} |" in card
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), LlavaUHDForConditionalGeneration)
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == processor.chat_template
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is LlavaUHDImageProcessor
