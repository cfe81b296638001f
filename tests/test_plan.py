import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.devices import list_devices, load_device
from edgekit.errors import BudgetError, RecipeError
from edgekit.plan import candidate_shapes, kv_cache_bytes, memory_model, plan, predict_speed
from edgekit.quantize.schemes import get_scheme
from tests.conftest import SMOLLM2

DEVICES = list_devices()


def _fmt_for(device):
    return ("gguf", "q4_k_m") if "llama.cpp" in device.runtimes else ("executorch", "8da4w")


def test_kv_cache_of_the_teacher_by_hand():
    # K and V, 30 layers, 2048 cells, 3 kv heads x 64, f16: llama.cpp logs "45.00 MiB" for this.
    assert kv_cache_bytes(SMOLLM2, 2048, 2) == 2 * 30 * 2048 * 3 * 64 * 2 == 45 * 2**20
    assert kv_cache_bytes(SMOLLM2, 2000, 2) == kv_cache_bytes(SMOLLM2, 2048, 2)  # padded to 256 cells


def test_memory_terms_sum_and_margin():
    m = memory_model(SMOLLM2, get_scheme("gguf", "q4_0"), 2048, "llama.cpp")
    assert m.weights == 89_941_248
    assert m.kv_cache == 47_185_920
    assert m.predicted_rss == m.weights + m.kv_cache + m.compute_buffer + m.runtime_overhead
    assert m.total == m.predicted_rss + m.predicted_rss // 10


def test_memory_grows_with_context_and_layers():
    s = get_scheme("gguf", "q4_k_m")
    assert memory_model(SMOLLM2, s, 4096, "llama.cpp").total > memory_model(SMOLLM2, s, 2048, "llama.cpp").total
    fewer = SMOLLM2.with_shape(layers=10)
    assert memory_model(fewer, s, 2048, "llama.cpp").total < memory_model(SMOLLM2, s, 2048, "llama.cpp").total


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
def test_plan_for_each_device(device):
    fmt, quant = _fmt_for(device)
    try:
        r = plan(SMOLLM2, device, fmt, quant, 2048 if device.ram > 1e8 else 128)
    except BudgetError as e:
        assert device.device_class in ("mcu", "wearable"), e  # only the microcontroller may be out of reach
        assert "vocabulary" in str(e)
        return
    assert r["memory"]["total_bytes"] <= r["budget_bytes"] == device.memory_budget
    s = r["student"]
    assert s["params"] > 0 and 1 <= s["layers"] <= 30 and s["hidden_size"] <= 576
    assert s["heads"] * s["head_dim"] <= s["hidden_size"] and s["heads"] % s["kv_heads"] == 0
    assert s["heads"] // s["kv_heads"] <= SMOLLM2.heads // SMOLLM2.kv_heads and s["kv_heads"] <= SMOLLM2.kv_heads
    assert r["predicted_decode_tok_s"] > 0 and r["prediction"]["label"] == "predicted"
    for key in ("weights_bytes", "kv_cache_bytes", "compute_buffer_bytes", "runtime_overhead_bytes", "total_bytes"):
        assert r["memory"][key] > 0


def test_small_budget_gets_a_block_friendly_student_and_big_budget_keeps_the_teacher():
    zero = plan(SMOLLM2, load_device("pi-zero-2w"), "gguf", "q4_k_m", 2048)
    assert not zero["teacher_fits"]
    s = zero["student"]
    assert s["hidden_size"] % 256 == 0 and s["intermediate_size"] % 256 == 0  # K-quant rows, no fallback
    # the most heads that fit (6 of 9, not the 4 whose query width is a multiple of 256): only each layer's
    # attention output projection falls back to another type
    assert (s["heads"], s["kv_heads"]) == (6, 3) and zero["fallback_tensors"] == s["layers"]
    pi5 = plan(SMOLLM2, load_device("pi-5-8gb"), "gguf", "q4_k_m", 2048)
    assert pi5["teacher_fits"] and pi5["student"]["params"] == SMOLLM2.params
    assert any("teacher itself fits" in w for w in pi5["warnings"])
    assert any("not a multiple of 256" in w for w in pi5["warnings"])


def test_speed_target_shrinks_the_student():
    dev = load_device("pi-5-8gb")
    free = plan(SMOLLM2, dev, "gguf", "q4_0", 2048)
    fast = plan(SMOLLM2, dev, "gguf", "q4_0", 2048, target_decode_tok_s=free["predicted_decode_tok_s"] * 1.5)
    assert fast["student"]["params"] < free["student"]["params"]
    assert fast["predicted_decode_tok_s"] >= free["predicted_decode_tok_s"] * 1.5


def test_budget_smaller_than_the_embeddings_explains_and_suggests():
    dev = load_device("pi-zero-2w").model_copy(update={"memory_budget": 20_000_000})
    with pytest.raises(BudgetError) as e:
        plan(SMOLLM2, dev, "gguf", "q4_0", 2048)
    msg = str(e.value)
    assert "pi-zero-2w" in msg and "20.0MB" in msg and "embeddings alone" in msg
    assert "Fix:" in msg and "memory_budget" in msg


def test_budget_error_suggests_a_shorter_context_when_that_is_enough():
    dev = load_device("pi-zero-2w").model_copy(update={"memory_budget": 100_000_000})
    with pytest.raises(BudgetError, match="lower context to"):
        plan(SMOLLM2, dev, "gguf", "q4_0", 8192)


def test_unknown_quant_format_and_runtime_mismatch_are_recipe_errors():
    dev = load_device("pi-5-8gb")
    with pytest.raises(RecipeError, match="unknown quant"):
        plan(SMOLLM2, dev, "gguf", "q3_0")
    with pytest.raises(RecipeError, match="no runtime for format 'gguf'.*--format executorch"):
        plan(SMOLLM2, load_device("esp32-s3-psram"), "gguf", "q4_0")
    with pytest.raises(RecipeError, match="exceeds"):
        plan(SMOLLM2, dev, "gguf", "q4_0", 100_000)


def test_decode_prediction_is_a_bandwidth_roofline():
    dev = load_device("pi-5-8gb")
    s = get_scheme("gguf", "q8_0")
    slow = predict_speed(SMOLLM2, s, dev.model_copy(update={"memory_bandwidth": dev.memory_bandwidth / 2}),
                         "llama.cpp", 2048)
    fast = predict_speed(SMOLLM2, s, dev, "llama.cpp", 2048)
    assert fast["decode_bound"] == "memory"
    assert slow["predicted_decode_tok_s"] < fast["predicted_decode_tok_s"] < 2 * slow["predicted_decode_tok_s"] + 1e-9
    assert fast["bytes_read_per_token"] > s.weight_bytes(SMOLLM2) * 0.99  # tied: the embedding is the head, read whole


def test_candidate_shapes_respect_blocks_and_heads():
    for align in (32, 256):
        for a in candidate_shapes(SMOLLM2, align):
            assert a.hidden_size % align == 0 and a.hidden_size % 64 == 0
            assert a.intermediate_size % align == 0 and a.intermediate_size <= 1536
            # prunable by selection: whole kv groups, at most 3 query heads per group as in the teacher
            assert a.heads * a.head_dim <= a.hidden_size and a.heads % a.kv_heads == 0
            assert a.kv_heads <= 3 and a.heads // a.kv_heads <= 3 and a.head_dim == 64


@settings(max_examples=40, deadline=None)
@given(budget_mb=st.integers(min_value=1, max_value=600), quant=st.sampled_from(["q4_0", "q4_k_m", "q8_0"]),
       context=st.sampled_from([256, 1024, 2048]))
def test_every_plan_fits_or_says_why(budget_mb, quant, context):
    dev = load_device("pi-zero-2w").model_copy(update={"memory_budget": budget_mb * 1_000_000})
    try:
        r = plan(SMOLLM2, dev, "gguf", quant, context)
    except BudgetError as e:
        assert "nothing fits" in str(e)
        return
    assert r["memory"]["total_bytes"] <= dev.memory_budget
