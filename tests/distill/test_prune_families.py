"""Pruning every family: the family's own structure (biases, q/k norms, Gemma's four norms and embedding
scale, Phi-3's fused projections, sliding/global layers) is carved, saved and reloaded."""

import json

import pytest
import torch
import torch.nn.functional as F

from edgekit.arch import Architecture
from edgekit.distill.prune import measure_importance, prune, run, teacher_architecture
from tests.families import FAMILIES


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _batches(vocab, n=2, batch=2, seq=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (batch, seq), generator=g) for _ in range(n)]


def _kl(teacher, student, ids):
    with torch.no_grad():
        p = F.log_softmax(teacher(ids).logits, -1)
        q = F.log_softmax(student(ids).logits, -1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_shape_prune_reproduces_the_teacher(family, family_dir):
    model = _model(family_dir(family))
    batches = _batches(model.config.vocab_size)
    student = prune(model, teacher_architecture(model), measure_importance(model, batches))
    with torch.no_grad():
        torch.testing.assert_close(student(batches[0]).logits, model(batches[0]).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_narrower_shallower_student_keeps_the_family_and_beats_random(family, family_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = family_dir(family)
    model = _model(folder)
    teacher = teacher_architecture(model)
    target = teacher.with_shape(layers=teacher.layers - 1, hidden_size=48, intermediate_size=96, heads=2,
                                kv_heads=1)
    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "Hello world, 42 apples and oranges. " * 8]
    out = run(folder, target, texts, tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = json.loads((out / "config.json").read_text())
    got = Architecture.from_hf_config(cfg)
    assert got.family == teacher.family
    assert (got.layers, got.hidden_size, got.intermediate_size, got.heads, got.kv_heads) == (
        target.layers, 48, 96, 2, 1)
    assert got.params == sum({p.data_ptr(): p.numel() for p in student.parameters()}.values())
    if family == "gemma3":  # 5 layers: all sliding, as llama.cpp's every-6th-global pattern has them
        assert cfg["layer_types"] == ["sliding_attention"] * 5 and got.sliding_layers == 5
    ids = _batches(cfg["vocab_size"])[0]
    random = prune(model, target, None, method="random", seed=0)
    assert _kl(model, student, ids) < _kl(model, random, ids)


def test_gemma_embedding_scale_is_kept_on_a_narrower_student(family_dir):
    """Gemma scales embeddings by sqrt(hidden): a narrower student's kept channels keep the teacher's values."""
    from edgekit.distill.prune import top_indices

    model = _model(family_dir("gemma3"))
    imp = measure_importance(model, _batches(model.config.vocab_size))
    student = prune(model, teacher_architecture(model).with_shape(hidden_size=32), imp)
    hid = top_indices(imp.hidden_channel, 32)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(student.model.embed_tokens(ids), model.model.embed_tokens(ids)[..., hid])


@pytest.mark.parametrize("teacher_family", ["qwen2", "qwen3"])
def test_a_llama_student_from_a_qwen_teacher_is_a_llama_that_beats_random(teacher_family, family_dir, tmp_path):
    """student.family: llama layout (no biases / q-k norms), same tokenizer; it loads as a Llama and exports."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from edgekit.arch import student_family
    from edgekit.export.gguf import export_gguf

    folder = family_dir(teacher_family)
    model = _model(folder)
    teacher = teacher_architecture(model)
    target = student_family(teacher, "llama").with_shape(layers=1, hidden_size=48, intermediate_size=96)
    out = run(folder, target, ["The quick brown fox jumps over the lazy dog. " * 8], tmp_path / "student")
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(student, LlamaForCausalLM) and not student.config.attention_bias
    assert student.config.rope_theta == model.config.rope_theta
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    ids = _batches(model.config.vocab_size)[0]
    assert _kl(model, student, ids) < _kl(model, prune(model, target, None, method="random"), ids)
    model_only = tmp_path / "model-only"  # the prune artifact also holds importance.safetensors
    model_only.mkdir()
    for f in out.iterdir():
        if f.name != "importance.safetensors":
            (model_only / f.name).write_bytes(f.read_bytes())
    assert export_gguf(model_only, tmp_path / "s.gguf", "f16", progress=False)["n_tensors"] > 0


def test_a_student_family_that_cannot_be_carved_is_refused_in_one_line(family_dir):
    from edgekit.arch import student_family
    from edgekit.errors import ModelError

    teacher = Architecture.from_hf_config(json.loads((family_dir("gemma3") / "config.json").read_text()))
    with pytest.raises(ModelError, match=r"a llama student cannot be carved from a gemma3 teacher.*qwen2 -> llama"):
        student_family(teacher, "llama")
    with pytest.raises(ModelError, match="unknown student family 'gpt2'"):
        student_family(teacher, "gpt2")
    assert student_family(teacher, "gemma3") is teacher
