"""GGUF export: round trips through llama.cpp against PyTorch, tokenizer parity, metadata, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.runtimes.llamacpp import last_logits, open_llama
from edgekit.errors import ModelError
from edgekit.export import gguf as export
from edgekit.export.gguf import detect_pre_tokenizer, export_gguf, read_gguf

IDS = [1, *range(3, 50), 2, 300, 319, 7, 7, 7]  # a BOS-like special, ordinary tokens, EOS, the top of the vocab
TEXTS = [
    "Hello world, how are you today?",
    "1234567890 apples and 42 oranges; 3.14159!",
    "def add(a, b):\n    return a + b\n\n\n  indented\ttab",
    "Quantization trades bits -- for accuracy?! (yes) [no] {maybe} \"quoted\" 'single'",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé — 東京 🙂",
]


def pytorch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_same_tokens(llm, tok, texts: list[str]) -> None:
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False), \
            text


def llama_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    llm = open_llama(gguf, n_ctx=128, logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def f32_gguf(tiny_bpe_llama_dir, exporter_output) -> Path:
    """An f32 GGUF of the tiny BPE Llama from the session's export store (read-only)."""
    return exporter_output(tiny_bpe_llama_dir, "gguf", "f32", name="tiny", license="apache-2.0",
                           teacher="tiny-teacher")[0]


def variant(base: Path, dst: Path, sharpen: float = 6.0, **config) -> Path:
    """A copy of the tiny model with config changes, random weights, and Q/K scaled up so attention is sharp.

    With the tiny fixture's 0.02-std weights attention is nearly uniform, so a rope mistake barely moves the
    logits; scaling Q and K makes position matter and such mistakes show.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    model.save_pretrained(dst, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype, bound", [
    ("f32", 1e-3),
    # f16 rounds each weight to 11 significant bits (relative error <= 2^-11 ~ 4.9e-4); on this model's logits
    # (|max| ~ 1.5) that measured 3.6e-4, so 2e-3 leaves ~5x headroom while a layout bug moves them by > 5e-3.
    ("f16", 2e-3),
    # bf16 keeps 8 bits (8x f16's rounding); measured 2.8e-3.
    ("bf16", 1e-2),
])
def test_export_runs_in_llama_cpp_with_pytorch_logits(tiny_bpe_llama_dir, tmp_path, dtype, bound):
    out = tmp_path / f"tiny-{dtype}.gguf"
    summary = export_gguf(tiny_bpe_llama_dir, out, dtype, progress=False)
    assert summary["dtype"] == dtype and summary["n_tensors"] == 2 * 9 + 2
    assert out.stat().st_size == summary["size_bytes"]
    diff = np.abs(llama_logits(out, IDS) - pytorch_logits(tiny_bpe_llama_dir, IDS)).max()
    assert diff < bound, f"{dtype}: max |llama.cpp - PyTorch| = {diff}"
    assert not list(tmp_path.glob(".*.tmp"))


def test_query_key_rows_are_reordered_for_llama_cpp_rope(tiny_bpe_llama_dir, tmp_path, monkeypatch):
    """With sharp attention, skipping the HF->GGML Q/K permutation breaks the logits; doing it keeps them exact."""
    model = variant(tiny_bpe_llama_dir, tmp_path / "sharp")
    ids = list(range(3, 63))
    ref = pytorch_logits(model, ids)
    export_gguf(model, tmp_path / "ok.gguf", "f32", progress=False)
    assert np.abs(llama_logits(tmp_path / "ok.gguf", ids) - ref).max() < 1e-3
    monkeypatch.setattr(export, "rope_interleave", lambda w, n_head: w)
    export_gguf(model, tmp_path / "wrong.gguf", "f32", progress=False)
    assert np.abs(llama_logits(tmp_path / "wrong.gguf", ids) - ref).max() > 0.05


@pytest.mark.parametrize("change", [
    {"tie_word_embeddings": False},
    {"head_dim": 32},  # head_dim != hidden / heads: llama.cpp needs attention.key_length / value_length
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
], ids=["untied-head", "head-dim-32", "llama3-rope", "linear-rope"])
def test_llama_variants_match_pytorch(tiny_bpe_llama_dir, tmp_path, change):
    model = variant(tiny_bpe_llama_dir, tmp_path / "variant", **change)
    ids = list(range(3, 63))
    out = tmp_path / "v.gguf"
    export_gguf(model, out, "f32", progress=False)
    names = {t["name"] for t in read_gguf(out)["tensors"]}
    assert ("output.weight" in names) == (change.get("tie_word_embeddings") is False)
    assert np.abs(llama_logits(out, ids) - pytorch_logits(model, ids)).max() < 1e-3


# --------------------------------------------------------------------------- tokenizer and metadata


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tiny_bpe_llama_dir, f32_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bpe_llama_dir))
    llm = open_llama(f32_gguf, n_ctx=64)
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert_same_tokens(llm, tok, [*TEXTS, chat])


def test_metadata_reads_back(tiny_bpe_llama_dir, f32_gguf, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bpe_llama_dir))
    info = read_gguf(f32_gguf)
    md = info["metadata"]
    assert info["arch"] == "llama" and info["n_vocab"] == 320
    assert md["tokenizer.chat_template"] == tok.chat_template
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert md["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert md["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert md["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds nothing
    assert md["general.name"] == "tiny" and md["general.license"] == "apache-2.0"
    assert md["general.base_model.0.name"] == md["edgekit.teacher"] == "tiny-teacher"
    assert md["general.file_type"] == 0
    assert (md["llama.block_count"], md["llama.embedding_length"], md["llama.attention.head_count_kv"]) == (2, 64, 2)
    assert "output.weight" not in {t["name"] for t in info["tensors"]}  # tied: token_embd is the head
    llm = open_llama(f32_gguf, n_ctx=64)
    assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)

    out = tmp_path / "f16.gguf"
    export_gguf(tiny_bpe_llama_dir, out, "f16", progress=False)
    types = {t["name"]: t["type"] for t in read_gguf(out)["tensors"]}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "f32"  # norms stay f32
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == "f16"
    assert read_gguf(out)["metadata"]["general.file_type"] == 1


def _retrained(base: Path, dst: Path, pre_tokenizer) -> Path:
    """A copy of the tiny model whose BPE tokenizer was trained with another pre-tokenizer (same specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(base, dst)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In 2024 we sold 1234567 units at $19.99 each.", "The year 1999 and 2000!",
                             "Hello world, how are you today?", "it's 10:45, isn't it?\n\nYes  it is."] * 20,
                            trainer=trainer)
    for f in dst.glob("tokenizer*"):
        f.unlink()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(dst)
    return dst


def _pre(kind: str):
    from tokenizers import Regex, pre_tokenizers

    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    split = export._QWEN2_SPLIT if kind == "qwen2" else export._LLAMA3_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("expected", ["smollm", "llama-bpe", "qwen2"])
def test_each_pre_tokenizer_rule_tokenizes_like_hf_in_llama_cpp(tiny_bpe_llama_dir, tmp_path, expected):
    from transformers import AutoTokenizer

    model = _retrained(tiny_bpe_llama_dir, tmp_path / "m", _pre(expected))
    out = tmp_path / "m.gguf"
    assert export_gguf(model, out, "f32", progress=False)["tokenizer_pre"] == expected
    tok = AutoTokenizer.from_pretrained(str(model))
    llm = open_llama(out, n_ctx=64)
    assert_same_tokens(llm, tok, [*TEXTS, "In 2024 we sold 1234567 units", "it's   10:45\n\n\nok",
                                  "I'LL SEE YOU'RE HERE"])


def test_pre_tokenizer_table():
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    smollm2 = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, bl]}
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": export._LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**bl, "use_regex": False}]}
    assert detect_pre_tokenizer(bl) == "gpt-2"
    assert detect_pre_tokenizer(smollm2) == "smollm"
    assert detect_pre_tokenizer(llama3) == "llama-bpe"
    qwen2 = {"type": "Sequence", "pretokenizers": [{**llama3["pretokenizers"][0], "pattern": {"Regex": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+")}}, {**bl, "use_regex": False}]}  # Qwen2.5's tokenizer.json, verbatim
    assert detect_pre_tokenizer(qwen2) == "qwen2"
    with pytest.raises(ModelError, match="tokenizer_pre=<name>"):
        detect_pre_tokenizer({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                                    bl]}, "x/tokenizer.json")
    with pytest.raises(ModelError, match="x/tokenizer.json"):
        detect_pre_tokenizer({**bl, "add_prefix_space": True}, "x/tokenizer.json")


def test_tokenizer_pre_can_be_overridden(tiny_bpe_llama_dir, tmp_path):
    out = tmp_path / "o.gguf"
    export_gguf(tiny_bpe_llama_dir, out, "f32", progress=False, tokenizer_pre="smollm")
    assert read_gguf(out)["metadata"]["tokenizer.ggml.pre"] == "smollm"


# --------------------------------------------------------------------------- refusals and bad files


def test_unsupported_models_are_refused_with_the_fix(tiny_bpe_llama_dir, tiny_llama_dir, tmp_path):
    qwen = tmp_path / "qwen"
    shutil.copytree(tiny_bpe_llama_dir, qwen)
    cfg = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_bigcode"}))
    with pytest.raises(ModelError, match="model_type 'gpt_bigcode'.*convert_hf_to_gguf") as e:
        export_gguf(qwen, tmp_path / "q.gguf", progress=False)
    assert "\n" not in str(e.value)
    (qwen / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(ModelError, match="attention_bias"):
        export_gguf(qwen, tmp_path / "q.gguf", progress=False)
    with pytest.raises(ModelError, match="WordLevel tokenizer.*byte-level BPE"):
        export_gguf(tiny_llama_dir, tmp_path / "w.gguf", progress=False)
    with pytest.raises(ModelError, match="choose one of f32, f16, bf16"):
        export_gguf(tiny_bpe_llama_dir, tmp_path / "x.gguf", "q4_0", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_export_leaves_nothing(tiny_bpe_llama_dir, tmp_path, monkeypatch):
    calls = []

    def boom(t, item, hp):
        calls.append(item["name"])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(t, item, hp)

    real = export._convert
    monkeypatch.setattr(export, "_convert", boom)
    with pytest.raises(RuntimeError):
        export_gguf(tiny_bpe_llama_dir, tmp_path / "m.gguf", "f32", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated-data", "truncated-header", "random-bytes", "empty"])
def test_bad_gguf_raises_one_line_naming_the_file(f32_gguf, tmp_path, damage):
    bad = tmp_path / "bad.gguf"
    data = f32_gguf.read_bytes()
    rng = np.random.default_rng(0)
    bad.write_bytes({"truncated-data": data[: len(data) - 1000], "truncated-header": data[:2000],
                     "random-bytes": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "empty": b""}[damage])
    with pytest.raises(ModelError) as e:
        read_gguf(bad)
    msg = str(e.value)
    assert str(bad) in msg and "not a readable GGUF" in msg and "re-export" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------- the real teacher


def greedy_llama(llm, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(last_logits(llm)))
        out.append(t)
        if t in eos:
            break
        llm.eval([t])
    return out


def greedy_pytorch(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_teacher_f16_greedy_generation_equals_pytorch_fp32(teacher, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "teacher-f16.gguf"
    export_gguf(teacher.path, out, "f16", name=teacher.name, progress=False)
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot who learns "
                                                                  "to paint."}], add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(str(teacher.path), dtype=torch.float32).eval()
    expected = greedy_pytorch(model, prompt, 64)
    assert len(expected) == 64
    assert greedy_llama(open_llama(out, n_ctx=256), prompt, 64, {model.generation_config.eos_token_id}) == expected

    llm = open_llama(out, n_ctx=256)
    assert_same_tokens(llm, tok, [*TEXTS, tok.decode(prompt)])
