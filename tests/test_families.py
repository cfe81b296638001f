"""Model families: what the architecture, planner and teacher resolution know about each one."""

import json
import time

import pytest

from edgekit.arch import FAMILIES, Architecture, family_of
from edgekit.errors import ModelError
from edgekit.models import resolve_teacher, teacher_architecture
from edgekit.plan import kv_cache_bytes, memory_model
from edgekit.quantize.schemes import get_scheme
from tests.families import FAMILIES as TINY

# Gemma 3 270M's config.json as published (google/gemma-3-270m), the fields the planner reads.
GEMMA3_270M = {
    "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "max_position_embeddings": 32768, "sliding_window": 512, "query_pre_attn_scalar": 256,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"]
    + ["sliding_attention"] * 5 + ["full_attention"],
}
QWEN3_1_7B = {
    "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "tie_word_embeddings": True, "sliding_window": None,
    "use_sliding_window": False,
}


def test_the_tiny_models_cover_every_family():
    assert set(TINY) == set(FAMILIES)


@pytest.mark.parametrize("family", TINY)
def test_architecture_counts_exactly_the_models_parameters(family, family_dir):
    """Biases, q/k norms, Gemma's extra norms and fused projections are all counted, nothing twice."""
    from transformers import AutoModelForCausalLM

    folder = family_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    arch = Architecture.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert arch.family.name == family
    assert arch.params == sum(unique.values())
    assert arch.with_shape(layers=arch.layers).params == arch.params


def test_gemma3_sliding_layers_and_window_come_from_the_config(family_dir):
    arch = Architecture.from_hf_config(json.loads((family_dir("gemma3") / "config.json").read_text()))
    assert (arch.sliding_window, arch.sliding_layers, arch.layers) == (8, 5, 6)
    # 5 sliding layers hold 8 positions, the global one all 100
    assert arch.kv_positions(100) == 5 * 8 + 100
    # a student keeps the pattern at its own depth, as llama.cpp's gemma3 graph lays it out (every 6th global)
    assert arch.with_shape(layers=3).sliding_layers == 3
    assert arch.with_shape(layers=12).sliding_layers == 10


def test_kv_cache_of_sliding_layers_is_counted_at_the_window():
    arch = Architecture.from_hf_config(GEMMA3_270M)
    assert arch.embedding_share > 0.6  # 262k x 640 of 268M
    assert round(arch.params / 1e6) == 268
    # llama.cpp (swa_full off): 3 global layers x 2048 cells + 15 sliding x pad(512 + 512, 256) cells, f16 K and V.
    # llama.cpp 0.3.36 logs exactly these: "6.00 MiB (2048 cells, 3 layers)" and "15.00 MiB (1024 cells, 15 layers)".
    assert kv_cache_bytes(arch, 2048, 2, "llama.cpp") == (6 + 15) * 2**20
    # a runtime that keeps the whole context for every layer is counted that way
    assert kv_cache_bytes(arch, 2048, 2, "onnxruntime") == 18 * 2048 * 2 * 256 * 2
    # the window pays off only beyond it
    assert kv_cache_bytes(arch, 256, 2, "llama.cpp") == 18 * 256 * 2 * 256 * 2


def test_planner_layout_counts_each_familys_tensors():
    q4 = get_scheme("gguf", "q4_k_m")
    names = {t.name for t in q4.tensors(Architecture.from_hf_config(GEMMA3_270M))}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    assert len(names) == 236  # what llama.cpp's own gemma3 GGUF holds
    phi = Architecture.from_hf_config({**GEMMA3_270M, "model_type": "phi3", "layer_types": None,
                                       "sliding_window": None, "tie_word_embeddings": False})
    phi_names = {t.name for t in q4.tensors(phi)}
    assert "blk.0.attn_qkv.weight" in phi_names and "blk.0.attn_q.weight" not in phi_names
    qwen2 = Architecture.from_hf_config({**QWEN3_1_7B, "model_type": "qwen2"})
    assert "blk.0.attn_k.bias" in {t.name for t in q4.tensors(qwen2)}
    onnx = get_scheme("onnx", "int4")
    assert memory_model(qwen2, onnx, 2048, "onnxruntime").weights > 0


def test_a_config_only_folder_is_planned_without_weights(tmp_path, capsys):
    from edgekit.cli.app import main

    folder = tmp_path / "Qwen3-1.7B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_1_7B))
    arch, name = teacher_architecture(str(folder))
    assert name == "Qwen3-1.7B" and arch.family.name == "qwen3" and arch.sliding_layers == 0
    assert main(["plan", "--teacher", str(folder), "--device", "pi-5-8gb", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["teacher"]["architecture"]["family"] == "qwen3" and r["student"]["family"] == "qwen3"
    assert 0 < r["student"]["embedding_share"] < 1
    assert not list(folder.iterdir())[1:]  # nothing written next to the config


def test_a_hub_id_is_planned_from_its_config_alone(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(GEMMA3_270M))
    fetched = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, **kw: fetched.append((repo, filename)) or str(cfg))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **kw: pytest.fail("plan must not download the weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    arch, name = teacher_architecture("google/gemma-3-270m")
    assert fetched == [("google/gemma-3-270m", "config.json")]
    assert name == "google/gemma-3-270m" and arch.sliding_layers == 15
    with pytest.raises(ModelError, match="validate never downloads"):
        teacher_architecture("google/gemma-3-270m", fetch=False)


def test_an_unsupported_hub_model_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**QWEN3_1_7B, "model_type": "gpt_neox"}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(cfg))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **kw: pytest.fail("an unsupported family must not be downloaded"))
    with pytest.raises(ModelError, match="model_type 'gpt_neox' is not supported"):
        resolve_teacher("EleutherAI/pythia-70m")


def _foreign_gguf(path, arch="gpt2"):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_an_unsupported_gguf_is_refused_from_its_header_in_seconds_writing_nothing(tmp_path, home):
    g = tmp_path / "gpt2-tiny.gguf"
    _foreign_gguf(g)
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        resolve_teacher(str(g))
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "GGUF architecture 'gpt2' is not supported" in msg and "nothing was converted" in msg
    assert not (home / "teachers").exists()


def test_unsupported_and_near_miss_model_types_say_why(tmp_path):
    with pytest.raises(ModelError, match="multimodal config; use the text-only checkpoint"):
        family_of("gemma3")
    with pytest.raises(ModelError, match="NoPE"):
        family_of("smollm3")
    folder = tmp_path / "neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**QWEN3_1_7B, "model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match="model_type 'gpt_neox' is not supported.*gemma3_text"):
        resolve_teacher(str(folder))  # refused by family, before the missing weights are noticed


TOKENIZER_TEXTS = ["Hello world! 12345 apples, 3.14 and 2024-11-24.", "  spaces   runs\n\n\ttabs and émoji 😀🙂",
                   "def add(a, b):\n    return a + b"]


@pytest.mark.parametrize("family", TINY)
def test_executorch_tokenizer_reads_each_familys_tokenizer_like_transformers(family, family_dir):
    """ExecuTorch's C++ runner tokenizes with pytorch_tokenizers' HF tokenizer, from the same tokenizer.json."""
    pt = pytest.importorskip("pytorch_tokenizers")
    from transformers import AutoTokenizer

    folder = family_dir(family)
    tok = AutoTokenizer.from_pretrained(folder)
    et = pt.CppHFTokenizer()
    et.load(str(folder / "tokenizer.json"))
    for text in TOKENIZER_TEXTS:
        assert list(et.encode(text, 0, 0)) == tok(text, add_special_tokens=False).input_ids, (family, text)


def test_decode_reads_the_window_only_where_the_runtime_caches_only_the_window():
    """llama.cpp's sliding layers read their window; a runtime that masks a full cache reads it whole."""
    from edgekit.plan import bytes_read_per_token

    arch = Architecture.from_hf_config(GEMMA3_270M)
    scheme = get_scheme("gguf", "f16")
    weights = bytes_read_per_token(arch, scheme, 0, 2)[0]
    window = bytes_read_per_token(arch, scheme, 2048, 2, "llama.cpp")[0] - weights
    full = bytes_read_per_token(arch, scheme, 2048, 2, "onnxruntime")[0] - weights
    assert window == 2 * (3 * 2048 + 15 * 512) * 256 * 2
    assert full == 2 * 18 * 2048 * 256 * 2


def test_a_recipe_asks_for_a_student_family_and_validate_refuses_a_pair_that_cannot_work(tmp_path):
    from edgekit.recipe import load_recipe
    from edgekit.validate import validate_recipe

    def recipe(family):
        p = tmp_path / f"{family}.yaml"
        p.write_text(f"teacher: default\ndevice: pi-5-8gb\ndistill: {{student_family: {family}}}\n"
                     "exports: [{format: gguf, quant: q4_k_m}]\n")
        return p

    assert load_recipe(recipe("mistral")).distill_config().student.family == "mistral"
    assert not [p for p in validate_recipe(recipe("mistral")) if "student_family" in p]
    problems = [p for p in validate_recipe(recipe("gemma3")) if "student_family" in p]
    assert len(problems) == 1 and "a gemma3 student cannot be carved from a llama teacher" in problems[0]
