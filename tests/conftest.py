"""Shared fixtures. Tests never reach the network: the hub is forced offline here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("EDGEKIT_QUIET", "1")

from edgekit.arch import Architecture  # noqa: E402

# SmolLM2-135M-Instruct, as its config.json and GGUF header state it.
SMOLLM2 = Architecture(layers=30, hidden_size=576, intermediate_size=1536, heads=9, kv_heads=3, head_dim=64,
                       vocab_size=49152, tie_embeddings=True, max_context=8192)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty EDGEKIT_HOME for one test."""
    h = tmp_path / "edgekit-home"
    monkeypatch.setenv("EDGEKIT_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def teacher_home(tmp_path_factory) -> Path:
    """An EDGEKIT_HOME shared by the slow tests, so the embedded teacher is converted once per session."""
    return tmp_path_factory.mktemp("teacher-home")


@pytest.fixture(scope="session")
def teacher(teacher_home):
    """The real embedded teacher, resolved (converted on first use) in the session's home."""
    from edgekit.models import resolve_teacher

    old = os.environ.get("EDGEKIT_HOME")
    os.environ["EDGEKIT_HOME"] = str(teacher_home)
    try:
        yield resolve_teacher("default")
    finally:
        if old is None:
            os.environ.pop("EDGEKIT_HOME", None)
        else:
            os.environ["EDGEKIT_HOME"] = old


def _tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved as a safetensors HF folder, with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    _tiny_tokenizer(folder, 256)
    return folder


@pytest.fixture
def tiny_copy(tiny_llama_dir, tmp_path) -> Path:
    """A writable copy of the tiny model folder, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tiny_bpe_tokenizer(folder: Path, vocab_size: int) -> None:
    """A real byte-level BPE (GPT-2 style, like SmolLM2's), trained on a few sentences, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
              "Quantization trades bits for accuracy; distillation trades size for speed.",
              "def add(a, b):\n    return a + b\n", "1234567890 apples and 42 oranges"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token=None, pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_bpe_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64, vocab 320) with a byte-level BPE tokenizer and a ChatML template.

    Unlike ``tiny_llama_dir`` (word-level tokenizer), llama.cpp and onnxruntime-genai can load its tokenizer,
    so exporters round-trip it end to end.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-bpe-llama")
    _tiny_bpe_tokenizer(folder, 320)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder
