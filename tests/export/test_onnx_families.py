"""ONNX export of every family: fp32 logits and greedy tokens equal transformers' in onnxruntime and
onnxruntime-genai, int4 runs, and onnxruntime-genai's tokenizer agrees with transformers'.

The prompts are longer than the tiny Gemma 3's sliding window (8), so a graph that attends past the
window on its sliding layers fails here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.runtimes.onnxruntime import OrtSession
from tests.families import FAMILIES

PROMPT = ("The quick brown fox jumps over the lazy dog. Hello world, 42 apples! Zebras quietly jog past 987 "
          "vivid kites while xylophones hum.")
TEXTS = ["Hello world! 12345 apples, 3.14 and 2024-11-24.", "  spaces   runs\n\n\ttabs and émoji 😀🙂",
         "def add(a, b):\n    return a + b"]


@pytest.fixture(scope="module")
def torch_models(family_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(family):
        if family not in cache:
            folder = family_dir(family)
            cache[family] = (AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder))
        return cache[family]

    return get


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _greedy(model, ids, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_20_greedy_tokens_match_transformers(family, family_dir, exporter_output, torch_models):
    from edgekit.runtimes.onnxruntime_genai import genai_generate

    model, tok = torch_models(family)
    folder, summary = exporter_output(family_dir(family), "onnx", "fp32")
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) > 2 * 8  # beyond gemma3's window
    ref = _torch_logits(model, ids)
    session = OrtSession(folder, threads=1)
    got = session.logits(ids)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    expected = _greedy(model, ids, 20)
    assert session.generate(ids, 20, eos_ids=[]) == expected
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    assert cfg["type"] in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
    got_genai = genai_generate(folder, ids, 20)
    assert got_genai == expected[:len(got_genai)] and len(got_genai) >= 1  # genai stops at an EOS the model picks


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_exports_run_close_to_fp32(family, family_dir, exporter_output, torch_models):
    model, tok = torch_models(family)
    folder, summary = exporter_output(family_dir(family), "onnx", "int4")
    assert summary["quantized_ops"].get("MatMulNBits", 0) >= 1
    ids = tok(PROMPT)["input_ids"]
    got = OrtSession(folder, threads=1).logits(ids)
    ref = _torch_logits(model, ids)
    assert np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_awq_keeps_the_float_function_of_each_family(family, family_dir, torch_models):
    """AWQ folds its scales into the producers (Gemma's 1+w norms, Phi-3's fused matrices): fp32 output is unchanged."""
    import copy

    from edgekit.quantize.awq import awq_scale

    model, tok = torch_models(family)
    scaled = copy.deepcopy(model)
    ids = tok(PROMPT)["input_ids"]
    results = awq_scale(scaled, [ids, tok(TEXTS[0])["input_ids"]], block_size=32, alphas=(0.5,))
    assert any(r.alpha for r in results)
    assert np.abs(_torch_logits(scaled, ids) - _torch_logits(model, ids)).max() < 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # byte-level BPE (SentencePiece: the real Gemma 3 teacher, slow)
def test_onnxruntime_genai_tokenizes_like_transformers(family, family_dir, exporter_output, torch_models):
    import onnxruntime_genai as og

    _, tok = torch_models(family)
    folder, _ = exporter_output(family_dir(family), "onnx", "fp32")
    og_tok = og.Tokenizer(og.Model(str(folder)))
    specials = [t for t in tok.all_special_tokens if t not in (tok.unk_token,)]
    for text in TEXTS + [specials[0] + " hi " + specials[-1]]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert list(og_tok.encode(text)) == ids, (family, text)
