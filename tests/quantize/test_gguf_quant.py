"""llama.cpp quantization of exported GGUFs: types used vs requested, fallbacks, importance matrices."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edgekit.runtimes.llamacpp import last_logits, open_llama
from edgekit.errors import ModelError, RecipeError
from edgekit.export.gguf import export_gguf, read_gguf
from edgekit.quantize.gguf import FTYPES, compute_imatrix, load_imatrix, quantize_gguf, save_imatrix
from edgekit.quantize.schemes import get_scheme, schemes

CALIBRATION = ["The quick brown fox jumps over the lazy dog. Hello world, how are you today?"] * 10 + \
              ["def add(a, b):\n    return a + b\n"] * 10 + ["1234567890 apples and 42 oranges"] * 10


@pytest.fixture(scope="module")
def f32_gguf(tiny_bpe_llama_dir, exporter_output) -> Path:
    """An f32 GGUF of the tiny BPE Llama from the session's export store (read-only: quantized copies go to tmp)."""
    return exporter_output(tiny_bpe_llama_dir, "gguf", "f32")[0]


@pytest.fixture(scope="module")
def imatrix(tiny_bpe_llama_dir):
    return compute_imatrix(tiny_bpe_llama_dir, CALIBRATION, context=64, progress=False)


def tensors(path: Path) -> dict[str, tuple]:
    """name -> (ggml type, raw data) straight from gguf-py, independent of read_gguf."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFReader(path).tensors}


def weighted_error(quantized: Path, original: dict, imatrix: dict) -> float:
    """sum over imatrix'd weights of importance[column] * (dequantized - original)^2."""
    from gguf.quants import dequantize

    q = tensors(quantized)
    total = 0.0
    for name, importance in imatrix.items():
        w = original[name][1]
        deq = dequantize(q[name][1], q[name][0]).reshape(w.shape)
        total += float(((deq - w) ** 2 * importance).sum())
    return total


def test_every_gguf_scheme_has_a_llama_cpp_ftype():
    import llama_cpp

    # every fixed scheme; `auto` picks types per tensor and writes them with ggml's quantizer (test_auto.py)
    assert set(FTYPES) == {s.name for s in schemes("gguf") if not s.options.get("auto")} and "auto" not in FTYPES
    assert all(isinstance(getattr(llama_cpp, v), int) for v in FTYPES.values())


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_k_m", "q4_k_m"])
def test_quantized_model_runs_and_report_matches_the_file(f32_gguf, tmp_path, quant):
    out = tmp_path / f"{quant}.gguf"
    report = quantize_gguf(f32_gguf, out, quant, nthreads=1)

    on_disk = {name: t.name.lower() for name, (t, _) in tensors(out).items()}
    assert {r["name"]: r["used"] for r in report["tensors"]} == on_disk
    info = read_gguf(out)
    assert report["size_bytes"] == out.stat().st_size
    assert report["bits_per_weight"] == pytest.approx(8 * sum(t["nbytes"] for t in info["tensors"]) / info["params"])
    assert report["predicted_weight_bytes"] == report["weight_bytes"]  # edgekit's scheme table predicted llama.cpp
    assert not report["imatrix"] and not report["requantized"]

    ids = [1, 5, 9, 40, 200, 2]
    llm = open_llama(out, n_ctx=64)
    llm.eval(ids)
    assert np.isfinite(last_logits(llm)).all()
    ref = open_llama(f32_gguf, n_ctx=64)
    ref.eval(ids)
    assert np.corrcoef(last_logits(llm), last_logits(ref))[0, 1] > 0.98  # measured >= 0.995


def test_k_quants_report_their_fallbacks_with_the_reason(f32_gguf, tmp_path, caplog):
    """The tiny model's rows (64 and 128) are not multiples of 256, so every K-quant falls back."""
    with caplog.at_level(logging.WARNING, logger="edgekit.quantize.gguf"):
        report = quantize_gguf(f32_gguf, tmp_path / "q4km.gguf", "q4_k_m")
    by_kind = {(f["requested"], f["used"]): f for f in report["fallbacks"]}
    assert set(by_kind) == {("q4_k", "q5_0"), ("q6_k", "q8_0")}
    q4k = by_kind[("q4_k", "q5_0")]
    assert q4k["tensors"] == 12 and q4k["row_lengths"] == [64, 128]
    assert q4k["summary"] == ("q4_k -> q5_0: 12 tensors, because their row lengths 64, 128 are not a multiple "
                              "of 256 (a K-quant super-block)")
    # use_more_bits gives the last of 2 layers Q6_K in attn_v and ffn_down; Q6_K falls back too
    assert sorted(by_kind[("q6_k", "q8_0")]["names"]) == ["blk.1.attn_v.weight", "blk.1.ffn_down.weight"]
    assert "q4_k -> q5_0: 12 tensors" in caplog.text and "14 of 20 tensors" in caplog.text

    plain = quantize_gguf(f32_gguf, tmp_path / "q8.gguf", "q8_0")
    assert plain["fallbacks"] == []


def test_unknown_quant_lists_the_valid_names(f32_gguf, tmp_path):
    with pytest.raises(RecipeError, match="unknown GGUF quant 'q9_k'.*q4_k_m"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "q9_k")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_quantization_names_the_source_and_leaves_nothing(tmp_path):
    from gguf import GGUFWriter

    src = tmp_path / "alien.gguf"
    w = GGUFWriter(src, arch="no-such-architecture")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=f"could not quantize {src}"):
        quantize_gguf(src, tmp_path / "out.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alien.gguf"]


def test_quantized_sources_are_requantized_with_a_warning(f32_gguf, tmp_path, caplog):
    q8 = tmp_path / "q8.gguf"
    assert quantize_gguf(f32_gguf, q8, "q8_0")["requantized"] is False
    with caplog.at_level(logging.WARNING, logger="edgekit.quantize.gguf"):
        report = quantize_gguf(q8, tmp_path / "q4.gguf", "q4_0")
    assert report["requantized"] and "already quantized" in caplog.text
    assert {r["used"] for r in report["tensors"]} == {"q4_0", "q8_0", "f32"}


# --------------------------------------------------------------------------- importance matrix


def test_imatrix_has_one_entry_per_quantized_weight_under_its_gguf_name(imatrix, f32_gguf):
    matrices = {t["name"]: t["shape"] for t in read_gguf(f32_gguf)["tensors"] if len(t["shape"]) == 2}
    assert set(imatrix) == set(matrices)  # the tied head is token_embd.weight, which the quantizer looks up
    for name, v in imatrix.items():
        assert v.dtype == np.float32 and v.shape == (matrices[name][0],) and (v > 0).all(), name
    assert imatrix.meta["chunks"] == -(-imatrix.meta["tokens"] // 64) and imatrix.meta["tokens"] > 200


def test_imatrix_changes_the_bytes_and_lowers_the_weighted_error(f32_gguf, imatrix, tmp_path):
    original = tensors(f32_gguf)
    for quant in ("q4_0", "q4_k_m"):
        plain, guided = tmp_path / f"{quant}.gguf", tmp_path / f"{quant}-imatrix.gguf"
        quantize_gguf(f32_gguf, plain, quant)
        report = quantize_gguf(f32_gguf, guided, quant, imatrix=imatrix)
        assert report["imatrix"] and report["imatrix_tensors"] == len(imatrix)
        assert plain.read_bytes() != guided.read_bytes()
        ratio = weighted_error(guided, original, imatrix) / weighted_error(plain, original, imatrix)
        assert ratio < 0.95, f"{quant}: imatrix-weighted error ratio {ratio:.3f}"


def test_imatrix_reaches_the_columns_it_names(f32_gguf, imatrix, tmp_path):
    """Marking a few columns 1000x more important makes llama.cpp keep exactly those columns more precisely."""
    rng = np.random.default_rng(0)
    flat = {k: np.ones_like(v) for k, v in imatrix.items()}
    marked = {}
    for k, v in flat.items():
        m = v.copy()
        m[rng.choice(v.size, v.size // 8, replace=False)] = 1000.0
        marked[k] = m
    quantize_gguf(f32_gguf, tmp_path / "flat.gguf", "q4_0", imatrix=flat)
    quantize_gguf(f32_gguf, tmp_path / "marked.gguf", "q4_0", imatrix=marked)
    original = tensors(f32_gguf)
    on_marked = {k: (v > 1).astype(np.float32) for k, v in marked.items()}
    ratio = (weighted_error(tmp_path / "marked.gguf", original, on_marked)
             / weighted_error(tmp_path / "flat.gguf", original, on_marked))
    assert ratio < 0.8, ratio


def test_imatrix_for_another_model_is_refused(f32_gguf, imatrix, tmp_path):
    wrong = {**imatrix, "blk.0.attn_q.weight": np.ones(576, dtype=np.float32)}
    with pytest.raises(ModelError, match="blk.0.attn_q.weight has 576 values.*rows of 64.*recompute"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "q4_0", imatrix=wrong)
    with pytest.raises(ModelError, match="no importance matrix entry matches"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "q4_0", imatrix={"model.layers.0.q_proj": np.ones(64)})
    nan = {**imatrix, "blk.0.attn_q.weight": np.full(64, np.nan, dtype=np.float32)}
    with pytest.raises(ModelError, match="NaN"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "q4_0", imatrix=nan)
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_saves_and_loads(imatrix, tmp_path):
    path = tmp_path / "imatrix.safetensors"
    save_imatrix(path, imatrix, {"model": "tiny"})
    back = load_imatrix(path)
    assert set(back) == set(imatrix) and all(np.array_equal(back[k], imatrix[k]) for k in imatrix)
    assert back.meta == {**imatrix.meta, "model": "tiny"}
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelError, match="imatrix.safetensors is not a readable importance matrix"):
        load_imatrix(path)


# --------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_teacher_q8_0_and_q4_k_m(teacher, tmp_path):
    """q8_0 stays close to the fp32 teacher; K-quants fall back on its 576-wide rows exactly as the schemes say."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "teacher-f32.gguf"
    export_gguf(teacher.path, src, "f32", progress=False)
    q8 = quantize_gguf(src, tmp_path / "q8_0.gguf", "q8_0")
    assert 8.4 < q8["bits_per_weight"] < 8.6 and q8["fallbacks"] == []
    q4 = quantize_gguf(src, tmp_path / "q4_k_m.gguf", "q4_k_m")
    assert q4["weight_bytes"] == q4["predicted_weight_bytes"] == get_scheme("gguf", "q4_k_m").weight_bytes(teacher.arch)
    assert [f["summary"] for f in q4["fallbacks"]] == [
        "q4_k -> q5_0: 166 tensors, because their row length 576 is not a multiple of 256 (a K-quant super-block)",
        "q6_k -> q8_0: 14 tensors, because their row length 576 is not a multiple of 256 (a K-quant super-block)",
    ]

    # q8_0 against PyTorch fp32 on the teacher's own greedy continuation (teacher forcing): llama.cpp also rounds
    # activations to 8 bits in q8_0 matmuls, so greedy decoding drifts at near-ties (see the report); the
    # distributions must still agree closely.
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    model = AutoModelForCausalLM.from_pretrained(str(teacher.path), dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Explain photosynthesis in simple terms."}],
                                     add_generation_prompt=True)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64,
                             pad_token_id=2)[0].tolist()
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0, len(prompt) - 1:-1], -1)
    llm = open_llama(tmp_path / "q8_0.gguf", n_ctx=256, logits_all=True)
    llm.eval(seq)
    got = torch.log_softmax(torch.tensor(np.array(llm.scores[len(prompt) - 1: len(seq) - 1])), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert kl < 0.02 and top1 >= 0.9, (kl, top1)
