"""Templates and label masking, with exact token-level expectations on real tokenizers."""

from __future__ import annotations

import copy
from typing import get_args

import pytest

from llava_uhd.config import TemplateName
from llava_uhd.errors import ConfigError
from llava_uhd.templates import IGNORE_INDEX, TEMPLATES, VICUNA_SYSTEM, Turn, get_template
from llava_uhd.tokens import encode_conversation, encode_text


@pytest.fixture(scope="module")
def llama(llama_tokenizer):
    tok = copy.deepcopy(llama_tokenizer)  # the session fixture is shared: never mutate it
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer):
    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _one_image(tok):
    """Image layout stand-in: the single <image> id, so the result is comparable to whole-string tokenizing."""
    image_id = tok.convert_tokens_to_ids("<image>")
    return lambda i: [image_id]


def supervised(enc) -> list[int]:
    return [label for label in enc.labels if label != IGNORE_INDEX]


TWO_TURNS = [
    Turn("user", "<image>\nWhat is red?"),
    Turn("assistant", "A red box."),
    Turn("user", "And the word?"),
    Turn("assistant", "cat"),
]


def test_vicuna_exact_tokens_and_labels(llama):
    enc = encode_conversation(TWO_TURNS[:2], get_template("vicuna_v1"), llama, _one_image(llama))
    tokens = llama.convert_ids_to_tokens(enc.input_ids)
    # BOS, system, " USER: ", image, "\nWhat is red?", " ASSISTANT:", " A red box.", "</s>"
    assert tokens[0] == "<s>"
    assert tokens[-20:] == [
        ".",
        "▁US",
        "ER",
        ":",
        "▁",
        "<image>",
        "<0x0A>",
        "What",
        "▁is",
        "▁red",
        "?",
        "▁ASS",
        "IST",
        "ANT",
        ":",
        "▁A",
        "▁red",
        "▁box",
        ".",
        "</s>",
    ]
    assert tokens[-9:] == ["▁ASS", "IST", "ANT", ":", "▁A", "▁red", "▁box", ".", "</s>"]
    labels = [llama.convert_ids_to_tokens(x) if x != IGNORE_INDEX else None for x in enc.labels]
    assert labels[-5:] == ["▁A", "▁red", "▁box", ".", "</s>"]
    assert all(x is None for x in labels[:-5])
    assert enc.visual_spans == [(tokens.index("<image>"), tokens.index("<image>") + 1)]


def test_vicuna_pieces_equal_whole_string_tokenization(llama):
    """Tokenizing piece by piece gives exactly the tokens of the whole LLaVA prompt string."""
    enc = encode_conversation(TWO_TURNS, get_template("vicuna_v1"), llama, _one_image(llama))
    prompt = (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is red? ASSISTANT: A red box.</s>"
        "USER: And the word? ASSISTANT: cat</s>"
    )
    assert enc.input_ids == [llama.bos_token_id] + llama(prompt, add_special_tokens=False)["input_ids"]


def test_vicuna_multi_turn_supervises_each_answer_and_eos(llama):
    enc = encode_conversation(TWO_TURNS, get_template("vicuna_v1"), llama, _one_image(llama))
    expected = llama("A red box.</s>", add_special_tokens=False)["input_ids"]
    expected += encode_text(llama, " cat</s>", at_start=False)
    assert supervised(enc) == expected
    assert llama.decode(supervised(enc)) == "A red box.</s> cat</s>"
    # supervised positions are contiguous runs ending in EOS, one per answer
    runs = [k for k in range(len(enc.labels)) if enc.labels[k] != IGNORE_INDEX]
    ends = [k for k in runs if k + 1 not in runs]
    assert [enc.input_ids[k] for k in ends] == [llama.eos_token_id] * 2


def _llava_preprocess_v1_labels(tok, conversation: str) -> tuple[list[int], list[int]]:
    """LLaVA's preprocess_v1 masking rule, re-implemented from its description (text-only rounds).

    Rounds are split at "</s>"; each round's instruction length is len(tokenize(up to "ASSISTANT: ")) - 2
    (BOS and the trailing-space token), and from the second round on one less for non-legacy tokenizers.
    """
    bos = [tok.bos_token_id]
    ids = bos + tok(conversation, add_special_tokens=False)["input_ids"]
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(conversation.split(tok.eos_token)):
        if not rou:
            break
        rou += tok.eos_token
        parts = rou.split(sep)
        parts[0] += sep
        round_len = len(bos + tok(rou, add_special_tokens=False)["input_ids"])
        instruction_len = len(bos + tok(parts[0], add_special_tokens=False)["input_ids"]) - 2
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    return ids, labels


def test_vicuna_matches_llava_preprocess_v1_on_text(llama):
    turns = [
        Turn("user", "Name a colour."),
        Turn("assistant", "Blue."),
        Turn("user", "Another one?"),
        Turn("assistant", "Green, of course."),
    ]
    enc = encode_conversation(turns, get_template("vicuna_v1"), llama, _one_image(llama))
    conversation = (
        f"{VICUNA_SYSTEM} USER: Name a colour. ASSISTANT: Blue.</s>"
        "USER: Another one? ASSISTANT: Green, of course.</s>"
    )
    ids, labels = _llava_preprocess_v1_labels(llama, conversation)
    assert enc.input_ids == ids
    # The first round agrees exactly: answer + "</s>" supervised. From the second round on, LLaVA's length
    # arithmetic is one token off with this (non-legacy) tokenizer: "</s>USER" is one token "USER" in
    # context but "▁US" "ER" alone, so LLaVA trains on "USER" and drops the answer's first token. Building
    # the ids from pieces has no such offset: that is the intended result.
    diff = [k for k, (ours, theirs) in enumerate(zip(enc.labels, labels, strict=True)) if ours != theirs]
    tokens = llama.convert_ids_to_tokens(ids)
    assert [tokens[k] for k in diff] == ["USER", "▁Green"]
    assert labels[diff[0]] == ids[diff[0]] and enc.labels[diff[0]] == IGNORE_INDEX
    assert enc.labels[diff[1]] == ids[diff[1]] and labels[diff[1]] == IGNORE_INDEX
    assert llama.decode(supervised(enc)) == "Blue.</s> Green, of course.</s>"


def test_plain_image_then_caption_then_eos(llama):
    turns = [Turn("user", "Describe this <image> please"), Turn("assistant", "A dog on grass.")]
    layout = [llama.convert_tokens_to_ids("<image>")] * 4 + encode_text(llama, ",", at_start=False)
    enc = encode_conversation(turns, get_template("plain"), llama, lambda i: layout)
    caption = encode_text(llama, "A dog on grass.</s>", at_start=False)
    assert enc.input_ids == [llama.bos_token_id, *layout, *caption]  # the human text is dropped
    assert enc.labels == [IGNORE_INDEX] * (1 + len(layout)) + caption
    assert llama.convert_ids_to_tokens(caption)[-2:] == [".", "</s>"]
    assert enc.visual_spans == [(1, 1 + len(layout))]


def test_plain_two_images(llama):
    turns = [Turn("user", "<image>\n<image>"), Turn("assistant", "Two pictures.")]
    enc = encode_conversation(turns, get_template("plain"), llama, lambda i: [100 + i] * 3)
    assert enc.input_ids[1:7] == [100, 100, 100, 101, 101, 101]
    assert enc.visual_spans == [(1, 4), (4, 7)]


def test_chat_template_single_and_multi_turn(qwen):
    turns = [
        Turn("user", "<image>\nHi"),
        Turn("assistant", "Yo"),
        Turn("user", "Q2"),
        Turn("assistant", "A2"),
    ]
    template = get_template("chat_template")
    enc = encode_conversation(turns, template, qwen, _one_image(qwen))
    messages = [{"role": t.role, "content": t.text} for t in turns]
    full = qwen.apply_chat_template(messages, tokenize=False)
    assert enc.input_ids == qwen(full, add_special_tokens=False)["input_ids"]
    runs, current = [], []
    for label in enc.labels:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [qwen.decode(r) for r in runs] == ["Yo<|im_end|>\n", "A2<|im_end|>\n"]
    single = encode_conversation(turns[:2], template, qwen, _one_image(qwen))
    assert qwen.decode(supervised(single)) == "Yo<|im_end|>\n"
    assert qwen.decode(single.input_ids).endswith("<think>\n\n</think>\n\nYo<|im_end|>\n")


def test_generation_prompt_is_training_prefix(llama):
    template = get_template("vicuna_v1")
    prompt = template.generation_prompt(TWO_TURNS[:1], llama)
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat is red? ASSISTANT:"
    pieces = template.render(TWO_TURNS[:2], llama)
    assert "".join(p.text for p in pieces).startswith(prompt)


def test_unknown_template_and_missing_chat_template(llama):
    with pytest.raises(ConfigError, match="unknown template 'chatml'"):
        get_template("chatml")
    tok = copy.deepcopy(llama)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        encode_conversation(TWO_TURNS[:2], get_template("chat_template"), tok, _one_image(tok))


def test_the_templates_are_the_names_a_preset_may_hold():
    assert sorted(TEMPLATES) == sorted(get_args(TemplateName))
    assert all(get_template(name).name == name for name in TEMPLATES)
