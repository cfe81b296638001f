"""The fake-quant grids equal, bit for bit, what each exporter's own quantizer stores (dequantized by its reader).

GGUF: llama.cpp's quantizer on an f32 export, read back and dequantized with gguf-py. ONNX: onnxruntime's
MatMulNBits quantizer (through the exporter, and directly on awkward blocks). ExecuTorch: torchao's
``quantize_`` with the exporter's config, against torchao's own QAT fake quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.arch import Architecture
from edgekit.errors import ModelError, RecipeError
from edgekit.export.gguf import export_gguf, rope_interleave
from edgekit.quantize import fakequant
from edgekit.quantize.gguf import quantize_gguf
from tests.conftest import _tiny_bpe_tokenizer, needs_executorch


def _awkward(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random weights with the cases a quantizer can get wrong: zero, flat, one-signed and heavy-tailed blocks."""
    w = w.clone() * torch.exp(torch.randn(w.shape[0], 1, generator=g))  # rows of very different scales
    w[0, :256] = 0.0
    w[1, :256] = 0.01
    w[2] = w[2].abs()
    w[3] = -w[3].abs()
    w[4] = torch.distributions.StudentT(2.0).sample((w.shape[1],)) * 0.02
    w[5, :64] = torch.tensor([0.5, -0.5] * 32)  # ties: both signs at the largest magnitude
    return w


def _model(folder: Path, hidden: int, inter: int, layers: int, tied: bool) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _tiny_bpe_tokenizer(folder, 320)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(_awkward(p, g))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Path:
    """Rows of 64 and 128 (Q4_0 / Q8_0 / K-quant fallbacks), untied: the embedding is quantized on its own."""
    return _model(tmp_path_factory.mktemp("fq-narrow"), 64, 128, 2, tied=False)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Rows of 256 and 512: the K-quants apply without fallback."""
    return _model(tmp_path_factory.mktemp("fq-wide"), 256, 512, 2, tied=False)


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k[:-len(".weight")]: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.endswith(".weight") and v.ndim == 2}


def _gguf_dequantized(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: (t.tensor_type.name, dequantize(np.array(t.data), t.tensor_type))
            for t in GGUFReader(path).tensors if len(t.shape) == 2}


def _arch(folder: Path) -> Architecture:
    import json

    return Architecture.from_hf_config(json.loads((folder / "config.json").read_text()))


@pytest.mark.parametrize("model,quant", [("narrow", "q4_0"), ("wide", "q4_k_s"), ("wide", "q4_k_m"),
                                         ("wide", "q4_0"), ("narrow", "q4_k_m")])
def test_gguf_grids_equal_llama_cpp_dequantized(request, tmp_path, model, quant):
    folder = request.getfixturevalue(model)
    src = tmp_path / "f32.gguf"
    export_gguf(folder, src, "f32")
    quantize_gguf(src, tmp_path / "q.gguf", quant)
    stored = _gguf_dequantized(tmp_path / "q.gguf")
    hf = _hf_weights(folder)
    arch = _arch(folder)
    checked = set()
    for name, (kind, values) in stored.items():
        fn = fakequant.grid(kind)
        module = fakequant.hf_module("gguf", name)
        if fn is None or module is None:
            continue
        fake = fn(hf[module])
        if name.endswith("attn_q.weight"):  # the exporter interleaves q/k rows; whole rows move, blocks do not
            fake = rope_interleave(fake, arch.heads)
        elif name.endswith("attn_k.weight"):
            fake = rope_interleave(fake, arch.kv_heads)
        assert np.array_equal(fake.numpy(), values.astype(np.float32)), f"{quant} {name} ({kind})"
        checked.add(kind)
    # narrow: the 64-wide output head is Q8_0; wide: it is Q6_K (no grid), and the K-quants need no fallback
    want = {"q4_0": {"Q4_0", "Q8_0"} if model == "narrow" else {"Q4_0"}, "q4_k_s": {"Q4_K"}, "q4_k_m": {"Q4_K"}}[quant]
    if model == "narrow" and quant != "q4_0":
        want = {"Q5_0"}  # rows of 64 and 128: every Q4_K falls back
    assert want <= checked, f"{quant}: checked only {checked}"
    # the plan QAT trains through names the types the file holds
    plan = fakequant.plan_grids(f"gguf-{quant}", arch)
    by_module = {fakequant.hf_module("gguf", n): k for n, (k, _) in stored.items()}
    assert plan.grids and all(by_module[m] == k for m, k in plan.grids.items())
    assert all(by_module[m] in k for m, k in plan.float_kept.items())


def _ggml():
    """llama.cpp's ggml-base library (the one llama-cpp-python's quantizer runs), for its reference quantizers."""
    import ctypes

    import llama_cpp

    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base here")
    return ctypes.CDLL(str(libs[0]))


# grid -> (block, bytes per block, its name in ggml's C functions)
GGML = {"Q4_0": (32, 18, "q4_0"), "Q5_0": (32, 22, "q5_0"), "Q8_0": (32, 34, "q8_0"), "Q4_K": (256, 144, "q4_K")}


@pytest.mark.parametrize("kind", list(GGML))
def test_gguf_grids_equal_ggml_reference_quantizers_on_awkward_weights(kind):
    import ctypes

    lib = _ggml()
    block, nbytes, c_name = GGML[kind]
    g = torch.Generator().manual_seed(len(kind))
    for scale in (1e-3, 0.02, 1.0, 300.0):
        w = _awkward(torch.randn(64, 512, generator=g) * scale, g)
        x = np.ascontiguousarray(w.numpy())
        buf = (ctypes.c_uint8 * (x.size // block * nbytes))()
        getattr(lib, f"quantize_row_{c_name}_ref")(x.ctypes.data_as(ctypes.c_void_p), buf, ctypes.c_int64(x.size))
        out = np.zeros(x.size, dtype=np.float32)
        getattr(lib, f"dequantize_row_{c_name}")(buf, out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        got = fakequant.grid(kind)(w).numpy()
        want = out.reshape(w.shape)
        assert np.array_equal(got, want), f"{kind} at scale {scale}: {(got != want).sum()} weights differ"


def test_fast_q4_k_that_training_uses_differs_from_the_exact_grid_in_few_sub_blocks():
    g = torch.Generator().manual_seed(11)
    w = _awkward(torch.randn(128, 512, generator=g) * 0.02, g)
    exact, fast = fakequant.q4_k(w), fakequant.q4_k(w, exact=False)
    differ = (exact != fast).reshape(-1, 32).any(1).float().mean().item()
    assert differ < 0.02, f"{100 * differ:.2f}% of sub-blocks differ"


def _onnx_dequantized(model_path: Path) -> dict[str, np.ndarray]:
    """MatMulNBits weights of an exported model as float [N, K], by their MatMul's module path."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "GatherBlockQuantized":  # the untied embedding: rows of the table, blocks along hidden
            data, bits, block = inits[node.input[0]], attrs["bits"], attrs["block_size"]
            n = data.shape[0]
            packed, scales, zeros = data.reshape(n, -1), inits[node.input[2]].reshape(n, -1), node.input[3]
            k, name = scales.shape[1] * block, "model.embed_tokens"
        else:
            n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
            packed, scales, zeros = inits[node.input[1]].reshape(n, -1), inits[node.input[2]].reshape(n, -1), \
                node.input[3]
            name = node.name.strip("/").replace("/MatMul_Q4", "").replace("/MatMul_Q8", "").replace("/", ".")
        blocks = scales.shape[1]
        if bits == 4:
            q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)
            zp_bytes = inits[zeros].reshape(n, -1)
            zp = np.stack([zp_bytes & 0xF, zp_bytes >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        else:
            q = packed
            zp = inits[zeros].reshape(n, -1)[:, :blocks]
        q = q[:, :blocks * block].reshape(n, blocks, block).astype(np.float32)
        w = ((q - zp[..., None].astype(np.float32)) * scales[..., None]).reshape(n, -1)[:, :k]
        out[name] = w.astype(np.float32)
    return out


def _unpacked(stored: dict[str, np.ndarray], arch: Architecture) -> dict[str, np.ndarray]:
    """The fused graph's packed q/k/v MatMulNBits split back into its q_proj, k_proj and v_proj rows (each row is
    quantized on its own, so the split rows are exactly what three separate matmuls would hold)."""
    out = {}
    for name, w in stored.items():
        if "qkv_proj" in name:
            q, k, v = np.split(w, [arch.q_dim, arch.q_dim + arch.kv_dim])
            for part, rows in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[name.replace("qkv_proj", part)] = rows
        else:
            out[name] = w
    return out


@pytest.mark.slow
def test_onnx_int4_grids_equal_the_exported_matmulnbits(narrow, exporter_output):
    path, _ = exporter_output(narrow, "onnx", "int4")
    stored = _unpacked(_onnx_dequantized(path / "model.onnx"), _arch(narrow))
    assert any("qkv_proj" in n for n in _onnx_dequantized(path / "model.onnx"))  # the fused graph packs q/k/v
    hf = _hf_weights(narrow)
    plan = fakequant.plan_grids("onnx-int4", _arch(narrow))
    assert {k for k in plan.grids.values()} == {"int4-b32", "int8-b32"}
    matched = 0
    for module, kind in plan.grids.items():
        key = next((k for k in stored if k.endswith(module.replace("model.", "", 1)) or k.startswith(module)), None)
        assert key is not None, f"no MatMulNBits for {module}: {sorted(stored)}"
        want = fakequant.grid(kind)(hf[module]).numpy()
        assert np.array_equal(want, stored[key][:, :want.shape[1]]), f"{module} ({kind})"
        matched += 1
    assert matched == len(plan.grids)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32), (4, 16), (4, 256)])
def test_nbits_grid_equals_onnxruntime_quantizer_on_awkward_blocks(bits, block):
    from edgekit.export.onnx_quant import _nbits_module

    g = torch.Generator().manual_seed(bits * 1000 + block)
    w = _awkward(torch.randn(24, 320, generator=g) * 0.05, g)
    k = w.shape[1]
    with _nbits_module() as mod:
        cfg = mod.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits)
        packed, scales, zeros = mod.DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(w.T.contiguous().numpy())
    n = w.shape[0]
    blocks = -(-k // block)
    if bits == 4:
        q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)
        zp = np.stack([zeros & 0xF, zeros >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        q, zp = packed.reshape(n, -1), zeros.reshape(n, -1)[:, :blocks]
    q = q[:, :blocks * block].reshape(n, blocks, block).astype(np.float32)
    want = ((q - zp[..., None].astype(np.float32)) * scales.reshape(n, blocks)[..., None]).reshape(n, -1)[:, :k]
    assert np.array_equal(fakequant.nbits(w, bits, block).numpy(), want)


def test_torchao_qat_weights_equal_the_executorch_exporters_quantize():
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    g = torch.Generator().manual_seed(7)
    for kind in ("torchao:8da4w", "torchao:8da8w"):
        w = _awkward(torch.randn(48, 256, generator=g) * 0.05, g)
        lin = torch.nn.Sequential(torch.nn.Linear(256, 48, bias=False))
        with torch.no_grad():
            lin[0].weight.copy_(w)
        quantize_(lin, fakequant.torchao_config(kind))  # what edgekit.export.executorch applies
        exported = lin[0].weight.dequantize()
        assert torch.equal(fakequant.torchao_weight(w, kind), exported), kind


@needs_executorch
def test_executorch_exporters_quantized_linears_equal_the_qat_weights(narrow):
    from edgekit.export.executorch import _build, resolve_quant

    module, _ = _build(narrow, resolve_quant("8da4w"), 32, narrow)  # the exporter's model, quantized as it ships
    quantized = {n: m.weight.dequantize() for n, m in module.named_modules()
                 if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "dequantize")}
    hf = _hf_weights(narrow)
    plan = fakequant.plan_grids("executorch-8da4w", _arch(narrow))
    assert set(plan.grids.values()) == {"torchao:8da4w", "torchao:8da8w"}
    for module_name, kind in plan.grids.items():
        et_name = module_name.replace("model.", "", 1).replace("self_attn.", "").replace("mlp.", "")
        assert torch.equal(fakequant.torchao_weight(hf[module_name], kind), quantized[et_name]), module_name
    assert len(plan.grids) == len(quantized)


@pytest.mark.parametrize("target,hidden,grid", [("gguf-q4_0", 64, fakequant.q4_0),
                                                 ("gguf-q4_k_s", 256, lambda w: fakequant.q4_k(w, exact=False))])
def test_straight_through_gradient_and_release_restore_the_float_weights(target, hidden, grid):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fakequant.plan_grids(target, Architecture.from_hf_config(model.config.to_dict()))
    fakequant.prepare(model, plan)
    q = model.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(q, grid(before["model.layers.0.self_attn.o_proj.weight"]))
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    latent = model.model.layers[0].self_attn.o_proj.parametrizations.weight.original
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    fakequant.release(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_unknown_target_and_fused_family_are_refused():
    arch = Architecture.from_hf_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                        "vocab_size": 64})
    with pytest.raises(RecipeError, match="choose one of"):
        fakequant.plan_grids("gguf-q3_k", arch)
    phi = Architecture.from_hf_config({"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                                       "vocab_size": 64})
    with pytest.raises(ModelError, match="fuses"):
        fakequant.plan_grids("gguf-q4_0", phi)
