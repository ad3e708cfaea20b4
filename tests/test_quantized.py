"""Quantized loading on CPU: torchao int8 weight-only on the language model, the vision side unquantized,
logits close to float32 and the weights smaller (bitsandbytes runs in tests/test_cuda.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from llava_uhd.config import TINY
from llava_uhd.errors import ConfigError
from llava_uhd.model.quantization import keep_full_precision, module_bytes, quantization_config

pytest.importorskip("torchao", reason="int8 quantization needs torchao (the quant extra)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bpe_tokenizer):
    from llava_uhd.auto import save_pretrained
    from llava_uhd.model import LlavaUHDConfig, LlavaUHDForConditionalGeneration
    from llava_uhd.processing import LlavaUHDProcessor

    folder = tmp_path_factory.mktemp("quant")
    processor = LlavaUHDProcessor(bpe_tokenizer, TINY)
    text = {
        **TINY.text.config,
        "vocab_size": len(processor.tokenizer),
        "hidden_size": 128,
        "intermediate_size": 384,
    }
    preset = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, config=text))
    torch.manual_seed(0)
    model = LlavaUHDForConditionalGeneration(
        LlavaUHDConfig.from_preset(preset, image_token_id=processor.image_token_id)
    )
    save_pretrained(folder, model, processor)
    return folder


def test_int8_logits_are_close_to_float32_and_the_lm_is_smaller(saved) -> None:
    from llava_uhd.auto import load_pretrained

    full, processor = load_pretrained(saved)
    quantized, _ = load_pretrained(saved, quantization_config=quantization_config("int8"))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (300, 200), "red")},
                {"type": "text", "text": "Hi"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    with torch.no_grad():
        expected, got = full(**inputs).logits, quantized(**inputs).logits
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.05, float(error)
    lm_full, lm_int8 = module_bytes(full.language_model), module_bytes(quantized.language_model)
    head = module_bytes(full.language_model.lm_head)  # kept in full precision, as transformers does
    assert lm_int8 < 0.5 * (lm_full - head) + head, (lm_int8, lm_full)
    assert module_bytes(quantized.vision_tower) == module_bytes(full.vision_tower)
    layer = quantized.language_model.model.layers[0].mlp.down_proj.weight
    assert type(layer).__name__ != "Parameter"  # a torchao tensor subclass holding int8 data
    vision = [type(p) for p in [*quantized.vision_tower.parameters(), *quantized.resampler.parameters()]]
    assert set(vision) == {torch.nn.Parameter}
    for name, value in full.vision_tower.state_dict().items():
        assert torch.equal(quantized.vision_tower.state_dict()[name], value), name


def test_asking_for_it_quantizes_the_vision_side_too(saved) -> None:
    from llava_uhd.auto import load_pretrained

    model, _ = load_pretrained(saved, quantization_config=quantization_config("int8", quantize_vision=True))
    assert any(type(p) is not torch.nn.Parameter for p in model.vision_tower.parameters())


def test_a_config_without_a_skip_list_keeps_the_vision_side() -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import BitsAndBytesConfig, TorchAoConfig

    torchao = keep_full_precision(TorchAoConfig(quant_type=Int8WeightOnlyConfig()))
    assert torchao.modules_to_not_convert == ["vision_tower", "resampler", "lm_head"]
    chosen = keep_full_precision(BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[]))
    assert chosen.llm_int8_skip_modules == []  # a list the caller wrote is used as given
    as_dict = keep_full_precision({"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert as_dict["llm_int8_skip_modules"] == ["vision_tower", "resampler", "lm_head"]
    with pytest.raises(ConfigError, match="must be one of"):
        quantization_config("int3")  # type: ignore[arg-type]
