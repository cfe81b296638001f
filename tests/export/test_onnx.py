"""ONNX export: round trips through onnxruntime against PyTorch, quantized variants, damaged files.

Fast tests export the tiny BPE Llama once per quant (module fixture, well under a second each);
slow ones export the real embedded teacher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import ModelError, RecipeError
from edgekit.export.onnx import QUANTS, export_onnx, genai_config, resolve_quant
from edgekit.runtimes.onnxruntime import OrtSession, check_onnx, op_counts

TEXT = "The quick brown fox jumps over the lazy dog. Hello world, 42 apples!"
HELD_OUT = "Quantization trades bits for accuracy; how are you today, lazy fox? def add(a, b): return 1234567890"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_and_top1(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || other) per position and top-1 agreement, for logits ``[T, vocab]``."""
    lp, lq = _log_softmax(ref), _log_softmax(other)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == other.argmax(-1)).mean())


@pytest.fixture(scope="module")
def exports(tiny_bpe_llama_dir, exporter_output) -> dict[str, tuple[Path, dict]]:
    """(folder, summary) of ``export_onnx`` per quant, from the session's export store (read-only)."""
    return {q: exporter_output(tiny_bpe_llama_dir, "onnx", q)
            for q in ("fp32", "fp16", "int8-dynamic", "int8", "int4", "int4-b128", "int4-awq")}


@pytest.fixture(scope="module")
def torch_lm(tiny_bpe_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_bpe_llama_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_bpe_llama_dir))


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _ort(folder: Path):
    from edgekit.runtimes.onnxruntime import OrtSession as OrtLM

    return OrtLM(folder, threads=1)


# --------------------------------------------------------------------------- fp32 round trip


def test_fp32_export_folder_has_model_config_and_tokenizer(exports):
    folder, summary = exports["fp32"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "generation_config.json", "config.json"} <= names
    assert not any(n.startswith(".") for n in names)  # no work folder left behind
    assert summary["files"] == {p.name: p.stat().st_size for p in folder.iterdir()}
    assert summary["quant"] == "fp32" and summary["quantized_ops"] == {} and summary["ops"]["MatMul"] > 0
    # the fused graph: one GroupQueryAttention per layer, RMSNorm fused with the residual add, no K/V Concat
    assert summary["graph"] == "fused" and "GroupQueryAttention" in summary["tools"]["graph"]
    assert summary["ops"]["GroupQueryAttention"] == 2 and summary["ops"]["SkipSimplifiedLayerNormalization"] == 4
    assert "Concat" not in summary["ops"] and sum(summary["ops"].values()) < 40
    assert not list(folder.parent.glob(".fp32*"))  # the temporary sibling was renamed away


def test_fp32_logits_match_pytorch(exports, torch_lm):
    model, tok = torch_lm
    ids = tok(TEXT)["input_ids"][:20]
    assert len(ids) == 20
    diff = np.abs(_ort(exports["fp32"][0]).logits(ids) - _torch_logits(model, ids)).max()
    assert diff <= 1e-3


def test_decode_with_cache_equals_full_recompute(exports, torch_lm):
    _, tok = torch_lm
    lm = _ort(exports["fp32"][0])
    ids = tok(TEXT + " " + HELD_OUT)["input_ids"][:24]
    full = lm.logits(ids)
    logits, past = lm.forward(ids[:8])
    steps = [logits[-1]]
    for pos in range(8, len(ids) - 1):
        logits, past = lm.forward([ids[pos]], past, pos)
        steps.append(logits[-1])
    assert past[0][0].shape[2] == len(ids) - 1  # the cache grew one position per step
    np.testing.assert_allclose(np.stack(steps), full[7:-1], atol=1e-4)


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_in_place_cache_decodes_the_tokens_of_the_growing_cache_and_of_genai(exports, torch_lm, quant):
    """prefill/decode bind one preallocated cache as past and present (GroupQueryAttention writes in place);
    generate feeds a growing cache: both give the same greedy tokens as onnxruntime-genai's shared buffer."""
    from edgekit.runtimes.onnxruntime_genai import genai_generate

    _, tok = torch_lm
    folder = exports[quant][0]
    ids = tok(TEXT + " " + HELD_OUT)["input_ids"][:24]
    lm = OrtSession(folder, threads=1, context=64)
    assert lm.shared and lm.buffer_len == 64
    in_place = [lm.prefill(ids)] + lm.decode(30)
    assert lm._buffers[0][0].shape() == [1, 2, 64, 16]  # one buffer, never regrown
    growing = _ort(folder).generate(ids, 31)
    assert in_place == growing == genai_generate(folder, ids, 31)
    lm.prefill(ids[:5])  # a new sequence reuses the buffer: positions past the prompt are ignored
    assert lm.decode(10) == _ort(folder).generate(ids[:5], 11)[1:]
    with pytest.raises(ModelError, match="do not fit the 64-position K/V cache"):
        lm.decode(60)


def test_genai_config_matches_the_graph_and_tokenizer(exports, tiny_bpe_llama_dir):
    import onnx

    folder, _ = exports["fp32"]
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg == genai_config(tiny_bpe_llama_dir)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    dec = cfg["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"],
            dec["hidden_size"]) == (2, 4, 2, 16, 64)
    for i in range(dec["num_hidden_layers"]):
        assert dec["inputs"]["past_key_names"] % i in inputs and dec["inputs"]["past_value_names"] % i in inputs
        assert dec["outputs"]["present_key_names"] % i in outputs
    assert {dec["inputs"][k] for k in ("input_ids", "attention_mask")} == inputs - {
        n for n in inputs if n.startswith("past_key_values.")}  # GroupQueryAttention derives positions from the mask
    assert "position_ids" not in dec["inputs"]
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert ids["<|im_end|>"] in cfg["model"]["eos_token_id"]
    assert cfg["model"]["pad_token_id"] == ids["<|endoftext|>"] and cfg["model"]["bos_token_id"] == ids["<|im_start|>"]
    assert cfg["search"]["do_sample"] is False and cfg["search"]["past_present_share_buffer"] is True
    assert "intra_op_num_threads" not in dec["session_options"]


def test_chat_end_of_turn_token_is_added_to_eos(tiny_bpe_llama_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_bpe_llama_dir, src)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((src / name).read_text())
        cfg["eos_token_id"] = 0  # <|endoftext|> only, as many chat models' config.json says
        (src / name).write_text(json.dumps(cfg))
    assert genai_config(src)["model"]["eos_token_id"] == [0, 2]  # + <|im_end|> from the chat template


def test_fp16_export_runs_on_the_cpu_provider_close_to_pytorch(exports, torch_lm):
    import onnx

    from edgekit.runtimes.onnxruntime_genai import genai_generate

    model, tok = torch_lm
    folder, summary = exports["fp16"]
    graph = onnx.load(str(folder / "model.onnx"))
    past = next(i for i in graph.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert summary["model_bytes"] < 0.7 * exports["fp32"][1]["model_bytes"]  # weights halve; graph overhead stays
    ids = tok(TEXT)["input_ids"][:20]
    lm = _ort(folder)
    assert lm.kv_dtype == np.float16
    ref = _torch_logits(model, ids)
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-2 * max(1.0, np.abs(ref).max())
    assert lm.generate(ids, 8) == genai_generate(folder, ids, 8)


# --------------------------------------------------------------------------- quantized variants


def test_int8_uses_per_channel_matmulinteger_on_every_weight_matmul(exports):
    import onnx
    from onnx import numpy_helper

    folder, summary = exports["int8-dynamic"]
    model = onnx.load(str(folder / "model.onnx"))
    ops = op_counts(model)
    linears = 2 * 5 + 1  # qkv (packed), o, gate, up, down per layer + the LM head
    assert ops["MatMulInteger"] == summary["quantized_ops"]["MatMulInteger"] == linears
    inits = {t.name: t for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]  # none left fp32
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            weight = inits[node.input[1]]
            zero = numpy_helper.to_array(inits[node.input[3]])
            assert weight.data_type == onnx.TensorProto.INT8 and zero.shape == (weight.dims[1],)  # one per column
    assert summary["model_bytes"] < exports["fp32"][1]["model_bytes"]


def test_int8_dynamic_weights_cannot_saturate_a_16_bit_pair_sum(exports):
    """x86 kernels without VNNI add two uint8 x int8 products in int16 (VPMADDUBSW): 255 * (|w1| + |w2|) must fit."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exports["int8-dynamic"][0] / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(weights) == 2 * 5 + 1
    for w in weights:
        assert np.abs(w.astype(np.int32)).max() <= 64  # reduce_range: 7-bit weights
        pairs = np.abs(w[0::2].astype(np.int32)) + np.abs(w[1::2].astype(np.int32))  # adjacent along K
        assert 255 * pairs.max() <= 32767


@pytest.mark.parametrize("quant,bits,block", [("int4", 4, 32), ("int4-b128", 4, 128), ("int4-awq", 4, 32),
                                              ("int8", 8, 32)])
def test_matmulnbits_exports_have_their_bits_block_and_a_quantized_embedding(exports, quant, bits, block):
    import onnx

    folder, summary = exports[quant]
    model = onnx.load(str(folder / "model.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5 + 1 and summary["block_size"] == block
    head = next(n for n in nbits if "logits" in n.output)
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # the LM head (shared with the tied embedding) stays 8-bit, block 32, as llama.cpp keeps its output;
        # so do the packed qkv (which holds v_proj) and down_proj of the layers llama.cpp's use_more_bits picks
        # (of 2 layers: the last)
        more = "/layers.1/self_attn/qkv_proj/" in node.name or "/layers.1/mlp/down_proj/" in node.name
        want = (8, 32) if node is head or (bits == 4 and more) else (bits, block)
        assert (attrs["bits"], attrs["block_size"]) == want, node.name
        assert attrs.get("accuracy_level", 0) == 4
        assert len(node.input) == 4  # asymmetric: zero points present
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in gather.attribute}["bits"] == 8
    assert summary["quantized_ops"]["GatherBlockQuantized"] == 1
    big_floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                  and int(np.prod(t.dims)) >= 320 * 64]
    assert big_floats == []  # the embedding and the LM head are no longer stored as fp32
    assert summary["model_bytes"] < exports["fp32"][1]["model_bytes"] * (0.5 if bits == 4 else 0.7)


def test_quantized_embedding_rows_are_the_lm_head_rows(exports, tiny_bpe_llama_dir):
    """GatherBlockQuantized reads the LM head's int4 matrix: a row comes back within one int4 step."""
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file

    folder, _ = exports["int4"]
    model = onnx.load(str(folder / "model.onnx"))
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    out = "/model/embed_tokens/Gather_output_0"
    model.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    assert gather.output[0] == out
    from edgekit.export.onnx import prefill_inputs

    ids = list(range(40))
    got = ort.InferenceSession(model.SerializeToString()).run([out], prefill_inputs(ids, 2, 2, 16, np.float32))[0][0]
    table = load_file(str(tiny_bpe_llama_dir / "model.safetensors"))["model.embed_tokens.weight"][ids]
    blocks = table.reshape(len(ids), -1, 32)
    step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / 15  # one int4 step per block
    assert (np.abs(got - table).reshape(blocks.shape) <= step[..., None] * 1.01 + 1e-6).all()
    assert np.abs(got - table).max() > 0  # really quantized


# The KL bounds come from the quantization's error model, not from one host's measurement:
# - Rounding to a step D adds noise of variance D^2/12. A matmul y = Wx whose input is quantized per tensor (int8:
#   D = range(x)/255, range ~8 rms for ~3k activations) and whose weights per channel or block (int8: D = max|w|/64
#   with 7-bit weights; int4: D = range of a block of 32 (~4 sd) or 128 (~5.2 sd) / 15) gets a relative output error
#   r = sqrt(r_x^2 + r_w^2) with r = D / (sqrt(12) rms): 0.015 for int8, ~0.08 (block 32) / 0.10 (block 128) for int4.
# - At most all 15 quantized matmuls' errors reach the logits at full strength (sqrt(15) r; the int4 quants keep the
#   head and 2 matmuls at 8 bits), on logits with sd 0.02 * sqrt(64) = 0.16 (initializer_range 0.02, hidden 64).
# - For a logit error d small against the logits, KL(p||q) ~ Var_p(d) / 2, so: int8 <= (sqrt(15) 0.015 0.16)^2 / 2
#   = 4e-5, int4 <= 9e-4 (block 32) and 1.5e-3 (block 128). The bounds below are these rounded up (1e-4, 2e-3).
# This holds wherever the kernels accumulate the integer products exactly; that is why the int8-dynamic export keeps
# its weights to 7 bits (onnxruntime's VPMADDUBSW path on x86 without VNNI saturates 8-bit ones, measured 1.5e-4
# on such a CPU; see test_int8_dynamic_weights_cannot_saturate_a_16_bit_pair_sum). Measured on an AVX512-VNNI host:
# 5e-6 (int8-dynamic), 2e-6 (int8), 4e-5 to 9e-5 (int4).
@pytest.mark.parametrize("quant,max_kl", [("int8-dynamic", 1e-4), ("int8", 1e-4), ("int4", 2e-3), ("int4-b128", 2e-3),
                                         ("int4-awq", 2e-3)])
def test_quantized_logits_stay_close_to_fp32(exports, torch_lm, quant, max_kl):
    _, tok = torch_lm
    ids = tok(HELD_OUT)["input_ids"]
    ref = _ort(exports["fp32"][0]).logits(ids)
    kl, top1 = kl_and_top1(ref, _ort(exports[quant][0]).logits(ids))
    # The bound can fail: permuting the vocabulary of the same logits costs ~100x more.
    shuffled, _ = kl_and_top1(ref, ref[:, np.random.default_rng(0).permutation(ref.shape[1])])
    assert max_kl * 5 < shuffled
    assert kl <= max_kl and top1 >= 0.9, (kl, top1)


def test_awq_error_is_not_worse_than_rtn_on_held_out_text(exports, torch_lm):
    _, tok = torch_lm
    ids = tok(HELD_OUT + " " + TEXT)["input_ids"]
    ref = _ort(exports["fp32"][0]).logits(ids)
    rtn, _ = kl_and_top1(ref, _ort(exports["int4"][0]).logits(ids))
    awq, _ = kl_and_top1(ref, _ort(exports["int4-awq"][0]).logits(ids))
    assert awq <= rtn * 1.15, (awq, rtn)  # a random tiny model has no outlier channels to protect
    info = exports["int4-awq"][1]["awq"]
    assert info["groups"] == 2 * 4 and info["calibration_error_vs_rtn"] <= 1.0
    assert exports["int4-awq"][1]["calibration_samples"] > 0


# --------------------------------------------------------------------------- errors


def test_unknown_quant_lists_the_valid_names():
    with pytest.raises(RecipeError, match="unknown ONNX quant 'q4_k_m'.*fp32, fp16, int8, int8-dynamic, int4, int4-b128, "
                                          "auto, int4-awq, auto-awq"):
        resolve_quant("q4_k_m")
    with pytest.raises(RecipeError, match="block-wise ONNX quants only"):
        resolve_quant("int8-dynamic", block_size=64)
    with pytest.raises(RecipeError, match="power of two"):
        resolve_quant("int4", block_size=48)
    assert resolve_quant("int4", block_size=64).block_size == 64
    assert set(QUANTS) == {"fp32", "fp16", "int8", "int8-dynamic", "int4", "int4-b128", "int4-awq", "auto",
                           "auto-awq"}


def test_unknown_quant_fails_before_any_work(tiny_bpe_llama_dir, tmp_path):
    with pytest.raises(RecipeError, match="choose one of"):
        export_onnx(tiny_bpe_llama_dir, tmp_path / "out", "int3", progress=False)
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_no_folder(tiny_bpe_llama_dir, tmp_path, monkeypatch):
    import edgekit.export.onnx as onnx_export

    def boom(*args, **kwargs):
        raise ModelError("simulated failure")

    monkeypatch.setattr(onnx_export, "_smoke_run", boom)
    with pytest.raises(ModelError, match="simulated"):
        export_onnx(tiny_bpe_llama_dir, tmp_path / "out", "fp32", progress=False)
    assert not list(tmp_path.iterdir())


DAMAGES = ["truncate", "garbage", "cut_tail"]


def damaged_copy(folder: Path, name: str, damage: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``folder`` whose file ``name`` is cut in half, replaced by garbage, or loses its last 1000 bytes."""
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    path = copy / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xffnot a model" * 100,
                      "cut_tail": data[:-1000]}[damage])
    return copy, path


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_model_onnx_is_one_line_model_error_naming_the_file(exports, tmp_path, damage):
    folder, path = damaged_copy(exports["fp32"][0], "model.onnx", damage, tmp_path)
    with pytest.raises(ModelError) as err:
        check_onnx(folder)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="model.onnx"):
        _ort(folder)


def test_missing_or_short_external_data_is_named(exports, tmp_path):
    import onnx

    folder = tmp_path / "m"
    folder.mkdir()
    model = onnx.load(str(exports["fp32"][0] / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert check_onnx(folder)["MatMul"] > 0
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"model\.onnx is incomplete .*model\.onnx\.data is shorter"):
        check_onnx(folder / "model.onnx")
    data.unlink()
    with pytest.raises(ModelError, match=r"model\.onnx\.data is missing") as err:
        check_onnx(folder / "model.onnx")
    assert "\n" not in str(err.value)


def test_missing_model_onnx_is_named(tmp_path):
    with pytest.raises(ModelError, match="model.onnx is missing"):
        check_onnx(tmp_path)


# --------------------------------------------------------------------------- the real teacher (slow)


CHAT = [{"role": "system", "content": "You are a concise, helpful assistant."},
        {"role": "user", "content": "Explain in two sentences why the sky looks blue during the day and red at "
                                    "sunset, then give one everyday example of the same effect that a child could "
                                    "notice at home or on the way to school."}]


@pytest.fixture(scope="module")
def teacher_exports(teacher, exporter_output):
    return {q: exporter_output(teacher.path, "onnx", q) for q in ("fp32", "int4")}


@pytest.fixture(scope="module")
def teacher_torch(teacher):
    from edgekit.models import load_model, load_tokenizer

    return load_model(teacher).eval(), load_tokenizer(teacher)


@pytest.mark.slow
def test_teacher_fp32_logits_match_pytorch_over_a_chat_prompt(teacher_exports, teacher_torch):
    model, tok = teacher_torch
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert 56 <= len(ids) <= 80  # ~64 tokens
    diff = np.abs(_ort(teacher_exports["fp32"][0]).logits(ids) - _torch_logits(model, ids)).max()
    assert diff <= 1e-3


@pytest.mark.slow
def test_teacher_greedy_64_tokens_identical_in_pytorch_ortlm_and_genai(teacher_exports, teacher_torch):
    import torch

    from edgekit.runtimes.onnxruntime_genai import genai_generate

    model, tok = teacher_torch
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    folder = teacher_exports["fp32"][0]
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0], attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = out[0, len(ids):].tolist()
    assert len(expected) >= 32  # a real answer, not an immediate stop
    assert _ort(folder).generate(ids, 64, eos_ids=eos) == expected
    assert genai_generate(folder, ids, 64) == expected


@pytest.mark.slow
def test_teacher_int4_runs_and_mostly_agrees_with_fp32(teacher_exports, teacher_torch):
    from edgekit.runtimes.onnxruntime_genai import genai_generate

    _, tok = teacher_torch
    folder, summary = teacher_exports["int4"]
    assert summary["quantized_ops"]["MatMulNBits"] == 30 * 5 + 1  # packed qkv, o, gate, up, down per layer + head
    assert summary["model_bytes"] < 115e6  # the fp32 teacher is ~540 MB; int4 with its 8-bit head and _M mix 113.5 MB
    ids = tok(HELD_OUT + " The sky is blue because sunlight is scattered by the air.")["input_ids"]
    _, top1 = kl_and_top1(_ort(teacher_exports["fp32"][0]).logits(ids), _ort(folder).logits(ids))
    assert top1 >= 0.5
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert len(genai_generate(folder, chat, 16)) > 0


@pytest.mark.slow
def test_teacher_folder_tokenizes_in_onnxruntime_genai_like_transformers(teacher_exports, teacher_torch):
    """onnxruntime-genai's own tokenizer reads the exported tokenizer files and agrees with transformers."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    folder = teacher_exports["fp32"][0]
    tok = AutoTokenizer.from_pretrained(str(folder))
    og_tok = og.Tokenizer(og.Model(str(folder)))
    for text in ["Hello world! 12345 apples, 3.14 and 2024-11-24.", "<|im_start|>user\nhi<|im_end|>\n",
                 "  spaces\n\ttabs émoji 😀"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert list(og_tok.encode(text)) == ids, text
        assert og_tok.decode(ids) == tok.decode(ids, skip_special_tokens=True)  # genai drops special tokens
