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


# --------------------------------------------------------------------------- `edgekit eval` on user files


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_of_prompts_only_data_scores_the_teachers_answers_once(tiny_bpe_llama_dir, tiny_bpe_other_dir,
                                                                    tiny_export, home, tmp_path, capsys, monkeypatch):
    """Prompts without answers: the teacher answers them (a data artifact, reused by a rerun), then the model and
    every --export are scored on those answers."""
    import json

    from edgekit.cli import main
    from edgekit.distill import data as data_stage

    prompts = _jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Hello world, how are you today?"},
        {"messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]},
        {"prompt": "def add(a, b):"}, {"prompt": "1234567890 apples and 42 oranges"}])
    calls = []
    real = data_stage.generate_responses
    monkeypatch.setattr(data_stage, "generate_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    export = tiny_export(tiny_bpe_other_dir, "gguf", "q8_0")
    args = ["eval", str(tiny_bpe_other_dir), "--against", str(tiny_bpe_llama_dir), "--data", str(prompts),
            "--export", str(export), "--prompt", "Hello world", "--max-new-tokens", "4", "--json", "-q"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    rows = rep["models"]
    assert list(rows)[0] == "teacher" and "gguf-q8_0" in rows and len(rows) == 3
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and rows["teacher"]["tokens"] > 0
    student = next(v for k, v in rows.items() if k not in ("teacher", "gguf-q8_0"))
    assert student["kl_to_teacher"] > 0 and student["tokens"] == rows["teacher"]["tokens"]
    assert rows["gguf-q8_0"]["tokens"] == student["tokens"]
    assert rows["gguf-q8_0"]["kl_to_teacher"] == pytest.approx(student["kl_to_teacher"], rel=0.05)  # q8_0 of it
    assert set(rep["generations"][0]) == {"prompt", "teacher", "gguf-q8_0", *(k for k in rows if k != "teacher")}
    assert calls == [1] and len(list((home / "artifacts").glob("data-*"))) == 1

    assert main(args) == 0  # the teacher's answers are reused, not generated again
    assert json.loads(capsys.readouterr().out)["models"] == rows and calls == [1]


@pytest.mark.parametrize("rows, says", [
    ([], "is empty"),
    ([{"text": "a"}], "nothing to score"),
    ([{"prompt": "hi", "response": "x"}, {"bad": 1}], "unknown record shape"),
])
def test_eval_of_bad_data_is_one_line_and_exit_2(rows, says, tiny_bpe_llama_dir, home, tmp_path, capsys):
    from edgekit.cli import main

    data = _jsonl(tmp_path / "data.jsonl", rows)
    assert main(["eval", str(tiny_bpe_llama_dir), "--against", str(tiny_bpe_llama_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err
