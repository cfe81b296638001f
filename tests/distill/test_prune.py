import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from edgekit import artifact
from edgekit.arch import Architecture
from edgekit.distill import prune as prune_mod
from edgekit.distill.prune import (
    Importance,
    measure_importance,
    measure_reconstruction,
    prune,
    run,
    teacher_architecture,
)
from edgekit.errors import RecipeError

D = 16  # head_dim of every tiny model here


def tiny_llama(layers=2, hidden=96, inter=192, heads=6, kv_heads=2, tie=True, init=0.1, seed=0):
    """A tiny random Llama; ``init`` above the HF default 0.02 makes its next-token distributions non-flat."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=D,
                      tie_word_embeddings=tie, initializer_range=init, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def token_batches(n=2, batch=4, seq=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (batch, seq), generator=g) for _ in range(n)]


def hand_importance(model, block=None, head=None, hidden=None, mlp=None):
    """Importance with the given scores and distinct, arbitrary (seeded) scores elsewhere."""
    c = model.config
    g = torch.Generator().manual_seed(7)
    return Importance(
        block=block if block is not None else torch.rand(c.num_hidden_layers, generator=g),
        mlp_channel=mlp if mlp is not None else torch.rand(c.num_hidden_layers, c.intermediate_size, generator=g),
        head=head if head is not None else torch.rand(c.num_hidden_layers, c.num_attention_heads, generator=g),
        hidden_channel=hidden if hidden is not None else torch.rand(c.hidden_size, generator=g),
    )


def rows(heads):
    return torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])


def mean_kl(teacher, student, ids):
    with torch.no_grad():
        p = F.log_softmax(teacher(ids).logits, -1)
        q = F.log_softmax(student(ids).logits, -1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()


def calib_texts(n=6, words=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, 256, (words,), generator=g)) for _ in range(n)]


def test_measure_importance_scores_every_prunable_unit():
    model = tiny_llama()
    imp = measure_importance(model, token_batches())
    assert imp.block.shape == (2,) and imp.mlp_channel.shape == (2, 192)
    assert imp.head.shape == (2, 6) and imp.hidden_channel.shape == (96,)
    assert imp.tokens == 2 * 4 * 48
    for t in imp.tensors().values():
        assert torch.isfinite(t).all() and (t >= 0).all()
    assert (imp.block <= 2).all()  # 1 - cos lies in [0, 2]


@pytest.mark.parametrize("tie", [True, False])
def test_same_shape_prune_reproduces_teacher_logits(tie):
    model = tiny_llama(tie=tie)
    ids = token_batches()[0]
    student = prune(model, teacher_architecture(model), measure_importance(model, token_batches()))
    assert student is not model
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_depth_pruning_keeps_most_important_layers_in_order():
    model = tiny_llama(layers=4)
    imp = hand_importance(model, block=torch.tensor([0.1, 0.9, 0.2, 0.8]))
    student = prune(model, teacher_architecture(model).with_shape(layers=2), imp)
    assert student.config.num_hidden_layers == 2
    for new, old in zip(student.model.layers, [1, 3], strict=True):
        for name, p in new.state_dict().items():
            assert torch.equal(p, model.model.layers[old].state_dict()[name]), name


@pytest.mark.parametrize(("heads", "kv_heads", "kept_q", "kept_kv"), [
    (2, 1, [0, 2], [0]),  # group 0 sums higher (1.4 vs 0.99) though head 3 is the single best
    (1, 1, [2], [0]),
    (2, 2, [2, 3], [0, 1]),  # both groups, the best head of each
])
def test_head_pruning_keeps_whole_kv_groups_and_their_best_query_heads(heads, kv_heads, kept_q, kept_kv):
    model = tiny_llama(layers=1)  # 6 heads, 2 kv heads: query heads 0-2 share kv head 0, 3-5 kv head 1
    imp = hand_importance(model, head=torch.tensor([[0.5, 0.3, 0.6, 0.9, 0.05, 0.04]]))
    student = prune(model, teacher_architecture(model).with_shape(heads=heads, kv_heads=kv_heads), imp)
    new, old = student.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert torch.equal(new.q_proj.weight, old.q_proj.weight[rows(kept_q)])
    assert torch.equal(new.k_proj.weight, old.k_proj.weight[rows(kept_kv)])
    assert torch.equal(new.v_proj.weight, old.v_proj.weight[rows(kept_kv)])
    assert torch.equal(new.o_proj.weight, old.o_proj.weight[:, rows(kept_q)])


def test_width_pruning_selects_top_hidden_and_mlp_channels_everywhere():
    model = tiny_llama(layers=1, tie=True)
    hidden = torch.rand(96, generator=torch.Generator().manual_seed(3))
    mlp = torch.rand(1, 192, generator=torch.Generator().manual_seed(4))
    imp = hand_importance(model, hidden=hidden, mlp=mlp)
    student = prune(model, teacher_architecture(model).with_shape(hidden_size=64, intermediate_size=96), imp)
    hid = hidden.argsort(descending=True)[:64].sort().values
    ch = mlp[0].argsort(descending=True)[:96].sort().values
    new, old = student.model.layers[0], model.model.layers[0]
    assert torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight[:, hid])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert torch.equal(student.model.norm.weight, model.model.norm.weight[hid])
    assert torch.equal(new.input_layernorm.weight, old.input_layernorm.weight[hid])
    assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight[:, hid])
    assert torch.equal(new.self_attn.o_proj.weight, old.self_attn.o_proj.weight[hid])
    assert torch.equal(new.mlp.gate_proj.weight, old.mlp.gate_proj.weight[ch][:, hid])
    assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[hid][:, ch])


def test_minitron_student_is_closer_to_teacher_than_random_student():
    model = tiny_llama()
    batches = token_batches()
    target = teacher_architecture(model).with_shape(intermediate_size=144)  # drop 25% of MLP channels
    pruned = prune(model, target, measure_importance(model, batches))
    random = prune(model, target, None, method="random", seed=0)
    assert mean_kl(model, pruned, batches[0]) < 0.5 * mean_kl(model, random, batches[0])


def _inputs_of(module, model, ids):
    """What ``module`` received when ``model`` ran ``ids`` (its first positional input)."""
    got = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: got.append((args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return got[0]


def test_reconstruction_refits_the_attention_output_to_the_heads_it_keeps():
    """With heads dropped, o_proj is refitted so the kept heads' outputs reproduce what all heads wrote (least
    squares on the calibration text): on held-out tokens its error is below that of copying the kept columns."""
    model = tiny_llama(layers=1)
    batches, held = token_batches(n=4), token_batches(n=1, seed=9)[0]
    imp = measure_importance(model, batches)
    target = teacher_architecture(model).with_shape(heads=4, kv_heads=2)  # one of each kv group's 3 heads goes
    rec = measure_reconstruction(model, batches, target, imp)
    assert set(rec.o_gram) == {0} and rec.norm_ratio == {}  # only what this cut changes is measured
    copied, refitted = prune(model, target, imp), prune(model, target, imp, reconstruction=rec)
    q_rows, _ = prune_mod._head_rows(imp.head[0], teacher_architecture(model), target)
    x = _inputs_of(model.model.layers[0].self_attn.o_proj, model, held).reshape(-1, 6 * D)
    want = x @ model.model.layers[0].self_attn.o_proj.weight.T

    def err(student):
        return (x[:, q_rows] @ student.model.layers[0].self_attn.o_proj.weight.T - want).pow(2).mean().item()
    assert err(refitted) < 0.8 * err(copied)
    # everything else is the plain selection
    assert torch.equal(refitted.model.layers[0].self_attn.q_proj.weight, copied.model.layers[0].self_attn.q_proj.weight)


def test_reconstruction_rescales_norms_for_the_hidden_channels_dropped():
    """RMSNorm divides by the RMS of the channels it sees: with channels gone, the kept weights are scaled by the
    measured RMS ratio so the normalised activations keep the teacher's size."""
    model = tiny_llama(layers=1)
    with torch.no_grad():  # half the residual channels carry little: those are the ones pruning drops
        model.model.embed_tokens.weight[:, ::2] *= 0.2
    batches, held = token_batches(n=4), token_batches(n=1, seed=9)[0]
    imp = measure_importance(model, batches)
    target = teacher_architecture(model).with_shape(hidden_size=48)
    rec = measure_reconstruction(model, batches, target, imp)
    assert rec.o_gram == {} and set(rec.norm_ratio) == {(0, "input_layernorm"), (0, "post_attention_layernorm"),
                                                         (-1, "norm")}
    assert all(r > 1 for r in rec.norm_ratio.values())  # the least active channels went: the kept ones' RMS is higher
    hid = prune_mod.top_indices(imp.hidden_channel, 48)
    copied, refitted = prune(model, target, imp), prune(model, target, imp, reconstruction=rec)
    norm_in = _inputs_of(model.model.layers[0].input_layernorm, model, held)  # the embeddings: same on kept channels
    want = model.model.layers[0].input_layernorm(norm_in)[..., hid]

    def err(student):
        with torch.no_grad():
            return (student.model.layers[0].input_layernorm(norm_in[..., hid]) - want).pow(2).mean().item()
    assert err(refitted) < 0.5 * err(copied)
    ratio = rec.norm_ratio[(0, "input_layernorm")]
    torch.testing.assert_close(refitted.model.layers[0].input_layernorm.weight,
                               copied.model.layers[0].input_layernorm.weight * ratio)


def test_reconstruction_changes_nothing_when_nothing_is_cut_and_brings_a_cut_student_closer():
    model = tiny_llama(layers=3)
    batches = token_batches(n=4)
    imp = measure_importance(model, batches)
    same = teacher_architecture(model)
    rec = measure_reconstruction(model, batches, same, imp)
    assert rec.o_gram == {} and rec.norm_ratio == {}
    with torch.no_grad():
        torch.testing.assert_close(prune(model, same, imp, reconstruction=rec)(batches[0]).logits,
                                   model(batches[0]).logits, atol=1e-6, rtol=0)
    target = same.with_shape(layers=2, hidden_size=64, heads=4, kv_heads=2)
    rec = measure_reconstruction(model, batches, target, imp)
    held = token_batches(n=1, seed=9)[0]
    assert mean_kl(model, prune(model, target, imp, reconstruction=rec), held) < \
        mean_kl(model, prune(model, target, imp), held)


def test_gemma_norms_are_rescaled_through_their_one_plus_weight():
    w = torch.tensor([0.5, -0.25, 0.0])
    torch.testing.assert_close(prune_mod._scale_norm(w, 0.8, offset=True), (1 + w) * 0.8 - 1)
    torch.testing.assert_close(prune_mod._scale_norm(w, 0.8, offset=False), w * 0.8)


def test_random_method_is_seeded():
    model = tiny_llama()
    target = teacher_architecture(model).with_shape(layers=1)
    a, b, c = (prune(model, target, None, method="random", seed=s) for s in (0, 0, 1))
    w = [m.model.layers[0].mlp.up_proj.weight for m in (a, b, c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


@pytest.mark.parametrize(("changes", "named"), [
    ({"layers": 0}, "layers 0 is below 1"),
    ({"layers": 3}, "layers 3 is larger"),
    ({"hidden_size": 128}, "hidden_size 128 is larger"),
    ({"intermediate_size": 256}, "intermediate_size 256 is larger"),
    ({"heads": 8, "kv_heads": 2}, "heads 8 is larger"),
    ({"heads": 3, "kv_heads": 3}, "kv_heads 3 is larger"),
    ({"heads": 5, "kv_heads": 2}, "heads 5 is not a multiple of kv_heads 2"),
    ({"heads": 4, "kv_heads": 1}, "4 query heads per kv group exceeds"),
    ({"head_dim": 8}, "head_dim 8 differs"),
    ({"vocab_size": 128}, "vocab_size 128 differs"),
])
def test_prune_refuses_targets_not_carvable_from_teacher(changes, named):
    model = tiny_llama()
    target = teacher_architecture(model).with_shape(**changes)
    with pytest.raises(RecipeError, match=named) as e:
        prune(model, target, hand_importance(model))
    assert "Fix:" in str(e.value)


def test_run_writes_student_of_exact_target_shape_that_loads(tiny_llama_dir, tmp_path):
    teacher = Architecture.from_hf_config(json.loads((tiny_llama_dir / "config.json").read_text()))
    target = teacher.with_shape(layers=1, hidden_size=48, intermediate_size=96, heads=2, kv_heads=1)
    out = run(tiny_llama_dir, target, calib_texts(), tmp_path / "student", max_tokens=300)

    assert artifact.verify_manifest(out) == []
    manifest = artifact.read_manifest(out)
    assert manifest["stage"] == "prune" and manifest["config"]["method"] == "minitron"
    assert len(manifest["metrics"]["kept_layers"]) == 1 and manifest["metrics"]["calibration_tokens"] == 300
    assert manifest["metrics"]["params"] == target.params
    student = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == \
           (1, 48, 96, 2, 1, 16, 256, True)
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == (256, 48)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32, 48)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 48)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (48, 32)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (48, 96)
    assert shapes["model.norm.weight"] == (48,)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert student(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 256)
    imp = load_file(out / "importance.safetensors")
    assert imp["head"].shape == (2, 4) and imp["hidden_channel"].shape == (64,)
    assert (out / "tokenizer.json").is_file()


def test_second_run_with_same_config_reuses_artifact(tiny_llama_dir, tmp_path, monkeypatch):
    teacher = Architecture.from_hf_config(json.loads((tiny_llama_dir / "config.json").read_text()))
    target = teacher.with_shape(intermediate_size=64)
    out = run(tiny_llama_dir, target, calib_texts(), tmp_path / "student", max_tokens=200)
    written = (out / artifact.MANIFEST).read_text()

    def fail(*args, **kwargs):
        raise AssertionError("importance was measured again")

    monkeypatch.setattr(prune_mod, "measure_importance", fail)
    assert run(tiny_llama_dir, target, calib_texts(), out, max_tokens=200) == out
    assert (out / artifact.MANIFEST).read_text() == written
    with pytest.raises(AssertionError, match="measured again"):  # a changed config is not reused
        run(tiny_llama_dir, target.with_shape(intermediate_size=96), calib_texts(), out, max_tokens=200)
    assert artifact.verify_manifest(out) == [] and (out / artifact.MANIFEST).read_text() == written
