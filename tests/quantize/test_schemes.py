import ctypes

import pytest

from edgekit.errors import RecipeError
from edgekit.quantize.schemes import get_scheme, schemes
from tests.conftest import SMOLLM2

NORMS = (2 * 576 * 30 + 576) * 4  # attn_norm + ffn_norm per layer + output_norm, f32
LINEAR_PER_LAYER = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536  # q,o + k,v + gate,up,down
EMBED = 49152 * 576


def test_q8_0_weights_of_the_teacher_by_hand():
    # Every matrix at Q8_0: 34 bytes per block of 32 weights.
    expected = (30 * LINEAR_PER_LAYER + EMBED) * 34 // 32 + NORMS
    assert get_scheme("gguf", "q8_0").weight_bytes(SMOLLM2) == expected == 143_025_408


def test_q4_0_weights_of_the_teacher_by_hand():
    # Layers at Q4_0 (18 bytes / 32); the tied embedding is the output head, which llama.cpp keeps
    # at Q8_0 because 576 is not a multiple of 256.
    expected = 30 * LINEAR_PER_LAYER * 18 // 32 + EMBED * 34 // 32 + NORMS
    assert get_scheme("gguf", "q4_0").weight_bytes(SMOLLM2) == expected == 89_941_248


def test_k_quants_fall_back_when_rows_are_not_multiples_of_256():
    q4km = get_scheme("gguf", "q4_k_m")
    types = {t.name: t.dtype for t in q4km.tensors(SMOLLM2)}
    assert types["blk.5.attn_q.weight"] == "Q5_0"  # Q4_K wanted, 576-wide rows
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K wanted (use_more_bits), falls back
    assert types["blk.4.ffn_down.weight"] == "Q4_K"  # rows of 1536 = 6 x 256 keep the K-quant
    assert types["blk.0.ffn_down.weight"] == "Q6_K"
    assert len(q4km.fallbacks(SMOLLM2)) == 180
    assert q4km.fallbacks(SMOLLM2.with_shape(hidden_size=512, heads=8, kv_heads=2, intermediate_size=1280)) == []


def test_bits_per_weight_include_scales():
    a = SMOLLM2.with_shape(hidden_size=512, heads=8, kv_heads=2, intermediate_size=1536, tie_embeddings=False)
    assert get_scheme("gguf", "f16").bits_per_weight(a) == pytest.approx(16, abs=0.05)
    assert get_scheme("gguf", "q4_0").bits_per_weight(a) == pytest.approx(4.5, abs=0.5)  # head stays Q6_K
    assert get_scheme("onnx", "int4").bits_per_weight(a) > 5  # int8 head (shared with the embedding) next to int4 blocks


def test_unknown_scheme_names_the_choices_and_the_right_format():
    with pytest.raises(RecipeError, match="choose one of .*q4_k_m"):
        get_scheme("gguf", "q9_k")
    with pytest.raises(RecipeError, match="is a onnx scheme: pass --format onnx"):
        get_scheme("gguf", "int4")
    with pytest.raises(RecipeError, match="unknown format"):
        get_scheme("tflite", "int8")


def test_every_scheme_lays_out_every_tensor_once():
    for s in schemes():
        names = [t.name for t in s.tensors(SMOLLM2)]
        assert len(names) == len(set(names)), s.name
        assert all(t.nbytes > 0 for t in s.tensors(SMOLLM2))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k"])
def test_gguf_layout_matches_llama_cpp_quantizer_tensor_by_tensor(quant, tmp_path):
    """Requantize the embedded teacher's GGUF with llama.cpp and compare every tensor's type and size."""
    import llama_cpp
    from gguf import GGUFReader

    from edgekit.models import embedded_gguf_path

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.allow_requantize = True
    params.nthread = 2
    out = tmp_path / f"{quant}.gguf"
    assert llama_cpp.llama_model_quantize(str(embedded_gguf_path()).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    actual = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(out).tensors}
    predicted = {t.name: (t.dtype, t.nbytes) for t in get_scheme("gguf", quant).tensors(SMOLLM2)}
    assert predicted == actual
