"""GGUF export of every model family (tests/families.py) against transformers, run in llama.cpp.

Each family is exported once (f32) per module; llama.cpp's logits must match transformers' fp32 logits, 20
greedy tokens must be identical, and llama.cpp must tokenize like the HF tokenizer (byte-level BPE for
llama/qwen2/qwen3, SentencePiece-style BPE with byte fallback for gemma3/phi3/mistral). Prompts are longer
than gemma3's sliding window (8), so a GGUF that ignores the window fails.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import ModelError
from edgekit.export import gguf as export
from edgekit.export.gguf import export_gguf, read_gguf
from edgekit.runtimes.llamacpp import last_logits, open_llama
from tests.families import FAMILIES

PROMPT = "Zebras quietly munch 98 kiwis while 7 owls hoot at dawn; jazz plays."
TEXTS = [
    "Hello world, how are you today?",
    "1234567890 apples and 42 oranges; 3.14159!",
    "  spaces   and\ttabs\n\n\nend  ",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé — 東京 🙂🚀",
    " leading space",
]
# llama.cpp vs transformers, both fp32, max |diff| / max |logit| over a 57-59 token prompt: measured 1.1e-4 to
# 2.2e-4, gemma3 9.7e-4 (ggml's GELU). A norm off by +1, a dropped bias or a missing sliding window moves it by
# more than 10x the bound (test_the_parity_bound_catches_a_dropped_family_detail).
REL_BOUND = 3e-3


def pytorch_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def pytorch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    llm = open_llama(gguf, n_ctx=128, logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def rel_diff(gguf: Path, model, ids: list[int]) -> float:
    ref = pytorch_logits(model, ids)
    return float(np.abs(llama_logits(gguf, ids) - ref).max() / np.abs(ref).max())


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir))(PROMPT)["input_ids"]
    assert len(ids) > 16  # at least twice gemma3's window
    return ids


@pytest.fixture(scope="module")
def family_gguf(family_dir, tmp_path_factory):
    """``family_gguf(family)``: (model folder, f32 GGUF, export summary), exported once per module."""
    made: dict[str, tuple[Path, Path, dict]] = {}

    def get(family: str):
        if family not in made:
            model = family_dir(family)
            out = tmp_path_factory.mktemp(f"gguf-{family}") / f"{family}.gguf"
            made[family] = (model, out, export_gguf(model, out, "f32", progress=False))
        return made[family]

    return get


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logits_and_greedy_tokens_match_transformers(family_gguf, family):
    import torch

    model_dir, gguf, summary = family_gguf(family)
    model = pytorch_model(model_dir)
    ids = prompt_ids(model_dir)
    diff = rel_diff(gguf, model, ids)
    assert diff < REL_BOUND, f"{family}: max |llama.cpp - PyTorch| / max |logit| = {diff:.2e}"

    with torch.no_grad():
        t = torch.tensor([ids])
        expected = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=20,
                                  min_new_tokens=20, pad_token_id=0)[0, len(ids):].tolist()
    llm = open_llama(gguf, n_ctx=128)
    llm.eval(ids)
    got = []
    for _ in range(20):
        got.append(int(np.argmax(last_logits(llm))))
        llm.eval([got[-1]])
    assert got == expected, family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tokenizes_like_transformers_in_llama_cpp(family_gguf, family):
    from transformers import AutoTokenizer

    model_dir, gguf, summary = family_gguf(family)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    llm = open_llama(gguf, n_ctx=64)
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2? Say  it\n twice 🙂"},
                                    {"role": "assistant", "content": "4 4"}, {"role": "user", "content": "ok"}],
                                   tokenize=False, add_generation_prompt=True)
    specials = "".join(f"x {s}  y{s}\n" for s in tok.all_special_tokens)
    for text in [*TEXTS, chat, specials]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok.encode(text, add_special_tokens=False), (family, text)
    assert llm.tokenize(b"Hi there", add_bos=True, special=False) == tok.encode("Hi there"), family  # BOS flag
    assert summary["tokenizer_model"] == ("gpt2" if family in ("llama", "qwen2", "qwen3") else "llama")


# --------------------------------------------------------------------------- what the file holds


def test_each_family_is_written_with_llama_cpps_names_and_keys(family_gguf):
    from safetensors import safe_open

    expected_arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
                     "phi3": "phi3"}
    for family in FAMILIES:
        model_dir, gguf, _ = family_gguf(family)
        info = read_gguf(gguf)
        md, names = info["metadata"], {t["name"] for t in info["tensors"]}
        assert info["arch"] == expected_arch[family], family
        if family == "qwen2":
            assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
        if family == "qwen3":
            assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
            assert md["qwen3.attention.key_length"] == 32
        if family == "phi3":
            assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= names
            assert not {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"} & names
            assert md["phi3.rope.scaling.original_context_length"] == 512
        if family == "llama":
            assert "rope_freqs.weight" in names  # llama3 rope scaling
        if family != "gemma3":
            continue
        assert md["gemma3.attention.sliding_window"] == 8 and md["gemma3.rope.freq_base"] == 1e6
        assert md["gemma3.attention.key_length"] == md["gemma3.attention.value_length"] == 16
        assert {f"blk.5.{n}.weight" for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm",
                                               "attn_q_norm", "attn_k_norm")} <= names
        # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so the file holds w + 1
        with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
            hf = f.get_tensor("model.layers.0.post_feedforward_layernorm.weight")
        from gguf import GGUFReader

        stored = next(t for t in GGUFReader(str(gguf)).tensors if t.name == "blk.0.post_ffw_norm.weight")
        np.testing.assert_allclose(np.asarray(stored.data), hf + 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family, prefix", [("gemma3", False), ("phi3", True), ("mistral", True)])
def test_sentencepiece_style_vocabulary_metadata(family_gguf, family, prefix):
    from gguf import GGUFReader, TokenType

    _, gguf, _ = family_gguf(family)
    md = read_gguf(gguf)["metadata"]
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.pre"] == "default"
    assert md["tokenizer.ggml.add_space_prefix"] is prefix and md["tokenizer.ggml.add_bos_token"] is True
    r = GGUFReader(str(gguf))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    by = dict(zip(tokens, zip(types, scores)))
    assert by["<0x0A>"] == (TokenType.BYTE, 0.0) and by["<0xFF>"][0] == TokenType.BYTE
    bos = tokens[md["tokenizer.ggml.bos_token_id"]]
    assert by[bos] == (TokenType.CONTROL, -1000.0)
    normal = [s for t, s in zip(types, scores) if t == TokenType.NORMAL]
    assert len(set(normal)) > len(normal) // 2  # merge ranks, not one placeholder score


# --------------------------------------------------------------------------- each difference matters


def _break(monkeypatch, what: str) -> None:
    """Make the exporter drop one family detail, to show the parity bound notices it."""
    real = export._convert

    def convert(t, item, hp):
        out = real(t, item, hp)
        if what == "bias" and item["name"].endswith(".bias"):
            return out * 0
        if what == "qk_norm" and item["name"].endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
            return out + 1.0  # off by one, as a missed (or doubled) Gemma-style shift would be
        return out

    if what == "norm_shift":
        monkeypatch.setitem(export.LAYOUTS, "gemma3", dataclasses.replace(export.LAYOUTS["gemma3"], norm_shift=0.0))
    elif what == "window":
        real_gemma3 = export._gemma3
        monkeypatch.setattr(export, "_gemma3", lambda cfg, hp, src: {**real_gemma3(cfg, hp, src),
                                                                      "sliding_window": 512})
    else:
        monkeypatch.setattr(export, "_convert", convert)


@pytest.mark.parametrize("family, what", [("qwen2", "bias"), ("qwen3", "qk_norm"), ("gemma3", "norm_shift"),
                                          ("gemma3", "window")])
def test_the_parity_bound_catches_a_dropped_family_detail(family_dir, tmp_path, monkeypatch, family, what):
    model_dir = family_dir(family)
    _break(monkeypatch, what)
    out = tmp_path / "broken.gguf"
    export_gguf(model_dir, out, "f32", progress=False)
    diff = rel_diff(out, pytorch_model(model_dir), prompt_ids(model_dir))
    assert diff > 10 * REL_BOUND, f"{family} without {what}: {diff:.2e}"


# --------------------------------------------------------------------------- refusals


def _copy_with(model_dir: Path, dst: Path, **config) -> Path:
    shutil.copytree(model_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


@pytest.mark.parametrize("family, change, message", [
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"] * 3}, "layer_types SGSGSG .*every 6th"),
    ("gemma3", {"rope_local_base_freq": 20000.0}, "rope_local_base_freq 20000 .*hard-codes"),
    ("gemma3", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64 .*attention scale"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
     "rope_scaling type 'yarn'"),
    ("qwen3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("phi3", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
])
def test_what_llama_cpp_cannot_run_is_refused_in_one_line(family_dir, tmp_path, family, change, message):
    model = _copy_with(family_dir(family), tmp_path / "m", **change)
    with pytest.raises(ModelError, match=message) as e:
        export_gguf(model, tmp_path / "out.gguf", "f32", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_a_sentencepiece_tokenizer_llama_cpp_would_split_differently_is_refused(family_dir, tmp_path):
    model = _copy_with(family_dir("mistral"), tmp_path / "m")
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["normalizer"] = None  # transformers' non-legacy Llama/Mistral shape: no space after special tokens
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (model / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelError, match="Metaspace\\(first\\).*convert_hf_to_gguf") as e:
        export_gguf(model, tmp_path / "out.gguf", "f32", progress=False)
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.gguf"))


def test_a_phi3_name_does_not_make_llama_cpp_strip_spaces_this_tokenizer_keeps(family_gguf, tmp_path):
    """llama.cpp strips the whitespace after special tokens when general.name contains "phi3"; this tokenizer
    does not, so the name is written so that llama.cpp's rule stays off (and the tokenizer test above holds)."""
    model_dir, _, _ = family_gguf("phi3")
    out = tmp_path / "p.gguf"
    export_gguf(model_dir, out, "f32", name="my-Phi3-student", progress=False)
    assert read_gguf(out)["metadata"]["general.name"] == "my-Phi_3-student"
    export_gguf(model_dir, out, "f32", name="student", progress=False)
    assert read_gguf(out)["metadata"]["general.name"] == "student"


def test_phi3_longrope_writes_both_factor_tensors_and_matches_within_the_original_context(family_dir, tmp_path):
    """Phi-3's longrope: llama.cpp uses rope_factors_short while its context is within the original one (as
    transformers does for such sequences), with the attention factor sqrt(1 + ln(scale) / ln(original))."""
    import math

    import torch

    g = torch.Generator().manual_seed(0)
    model = _copy_with(family_dir("phi3"), tmp_path / "lr", max_position_embeddings=4096,
                       original_max_position_embeddings=512,
                       rope_scaling={"type": "longrope", "short_factor": (1 + 3 * torch.rand(8, generator=g)).tolist(),
                                     "long_factor": (4 + 8 * torch.rand(8, generator=g)).tolist()})
    out = tmp_path / "lr.gguf"
    export_gguf(model, out, "f32", progress=False)
    info = read_gguf(out)
    md, names = info["metadata"], {t["name"] for t in info["tensors"]}
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
    assert md["phi3.rope.scaling.original_context_length"] == 512 and md["phi3.context_length"] == 4096
    assert md["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(512)))
    assert rel_diff(out, pytorch_model(model), prompt_ids(model)) < REL_BOUND


def test_a_window_llama_cpp_does_not_apply_becomes_the_recorded_context(family_dir, tmp_path):
    """llama.cpp's llama graph attends to everything: a Mistral sliding window is kept exact by recording it as the
    trained context (the two agree up to it)."""
    model = _copy_with(family_dir("mistral"), tmp_path / "w", sliding_window=64)
    out = tmp_path / "w.gguf"
    export_gguf(model, out, "f32", progress=False)
    assert read_gguf(out)["metadata"]["llama.context_length"] == 64
    assert rel_diff(out, pytorch_model(model), prompt_ids(model)) < REL_BOUND
