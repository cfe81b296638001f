import math

import pytest
import torch

from edgekit.distill.evaluate import evaluate, score, to_markdown


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(3)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    other.save_pretrained(d / "other")
    g = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(6):
        ids = torch.randint(3, 256, (12,), generator=g).tolist()
        seqs.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), other.eval(), seqs, d


def test_teacher_against_itself_has_zero_kl_and_full_agreement(pair):
    teacher, _, seqs, _ = pair
    r = score(teacher, teacher, seqs)
    assert r["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"] == 1.0
    assert r["tokens"] == 6 * 7  # only positions whose next token is a target
    assert r["perplexity"] == pytest.approx(math.exp(r["cross_entropy"]))


def test_perplexity_matches_the_models_own_loss(pair):
    teacher, _, seqs, _ = pair
    ids = torch.tensor([s["input_ids"] for s in seqs])
    labels = torch.tensor([s["labels"] for s in seqs])
    with torch.no_grad():
        ref = teacher(input_ids=ids, labels=labels).loss.item()
    assert score(teacher, teacher, seqs, batch_size=4)["cross_entropy"] == pytest.approx(ref, rel=1e-5)


def test_a_different_model_disagrees_and_the_report_has_every_row(pair, tiny_llama_dir):
    _, _, seqs, d = pair
    report = evaluate({"other": d / "other"}, tiny_llama_dir, seqs, prompts=["w5 w6 w7"], max_new_tokens=4)
    assert set(report["models"]) == {"teacher", "other"}
    assert report["models"]["other"]["kl_to_teacher"] > 0.0
    assert report["models"]["other"]["top1_agreement"] < 1.0
    assert report["generations"][0]["prompt"] == "w5 w6 w7" and "teacher" in report["generations"][0]
    md = to_markdown(report)
    assert "| other |" in md and "| teacher |" in md
