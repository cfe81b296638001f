"""The fidelity report: exact exports score as exact, lossy ones as lossy, and the maths is right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekit import metrics, runtimes
from edgekit.quantize import report


def test_tally_matches_hand_computed_kl_and_agreement():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    cand = np.array([[1.0, 0.5, -1.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    targets = torch.tensor([0, 2])
    t = metrics.Tally()
    t.add(F.log_softmax(ref, -1), cand, targets)
    r = t.result()
    p, q = F.softmax(ref, -1), F.softmax(torch.from_numpy(cand), -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert r["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert r["top1_agreement"] == 0.5  # row 0 agrees (index 0), row 1 does not (1 vs 2)
    nll = -(math.log(float(q[0, 0])) + math.log(float(q[1, 2]))) / 2
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_tally_of_identical_logits_is_zero_kl_full_agreement():
    logits = torch.randn(7, 11)
    t = metrics.Tally()
    t.add(F.log_softmax(logits, -1), logits.numpy(), torch.randint(0, 11, (7,)))
    r = t.result()
    assert r["kl_mean"] == pytest.approx(0.0, abs=1e-6) and r["top1_agreement"] == 1.0


def test_tally_scores_only_the_marked_positions():
    ref = torch.randn(5, 9)
    cand = torch.randn(5, 9).numpy()
    targets = torch.randint(0, 9, (5,))
    scored = [False, True, False, True, True]
    marked, picked = metrics.Tally(), metrics.Tally()
    marked.add(F.log_softmax(ref, -1), cand, targets, scored)
    keep = torch.tensor(scored)
    picked.add(F.log_softmax(ref[keep], -1), cand[keep.numpy()], targets[keep])
    assert marked.result() == pytest.approx(picked.result())
    assert marked.result()["tokens"] == 3


def test_heldout_chats_are_scored_on_the_answers_only(tiny_bpe_llama_dir, tmp_path):
    """The user's turn and the template markup are given to a deployed model, not predicted: not scored."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bpe_llama_dir))
    chat = {"messages": [{"role": "user", "content": "name a colour please"},
                         {"role": "assistant", "content": "blue is a colour"}]}
    f = tmp_path / "held.jsonl"
    f.write_text(json.dumps(chat) + "\n" + json.dumps({"text": "plain words all scored"}) + "\n")
    (ids, scored), (text_ids, text_scored) = report.heldout_scored(tok, [f], 10_000, 512)
    answer = tok.decode([t for t, s in zip(ids[1:], scored) if s])
    assert answer.startswith("blue is a colour") and "name a colour" not in answer
    assert 0 < sum(scored) < len(scored)
    assert all(text_scored) and len(text_scored) == len(text_ids) - 1
    (cut, cut_scored), = report.heldout_scored(tok, [f], 3, 512)  # the budget counts scored targets
    assert sum(cut_scored) == 3 and len(cut) == len(cut_scored) + 1 and cut_scored[-1]


def test_fidelity_of_tiny_exports(tiny_bpe_llama_dir, tiny_export, home):
    """f32 GGUF and fp32 ONNX reproduce PyTorch; q4_0 is measurably lossy; greedy parity is counted."""
    paths = [str(tiny_export(tiny_bpe_llama_dir, f, q))
             for f, q in (("gguf", "f32"), ("gguf", "q4_0"), ("onnx", "fp32"))]
    rep = report.run(tiny_bpe_llama_dir, paths, max_tokens=600)
    rows = {r["label"]: r for r in rep["rows"]}
    assert rep["tokens"] > 300
    ref = rows["pytorch-fp32 (reference)"]
    assert ref["kl_mean"] == pytest.approx(0, abs=1e-6) and ref["top1_agreement"] == 1.0
    for exact in ("gguf-f32", "onnx-fp32"):
        assert rows[exact]["kl_mean"] < 1e-4, exact
        assert rows[exact]["top1_agreement"] > 0.99, exact
        assert rows[exact]["greedy_match"] == report.GREEDY_TOKENS, exact
        assert abs(rows[exact]["ppl_delta_pct"]) < 0.1
    assert rows["gguf-q4_0"]["kl_mean"] > 10 * rows["gguf-f32"]["kl_mean"]
    md = report.to_markdown(rep)
    assert "| gguf-q4_0 |" in md and "greedy match" in md
    again = report.run(tiny_bpe_llama_dir, paths, max_tokens=600)
    assert again["reused"] and again["path"] == rep["path"]


def test_fidelity_refuses_a_non_export_folder(tiny_bpe_llama_dir, tmp_path):
    from edgekit import artifact
    from edgekit.errors import EdgekitError

    folder = tmp_path / "x"
    folder.mkdir()
    artifact.write_manifest(folder, "distill", {})
    with pytest.raises(EdgekitError, match="not an export"):
        runtimes.open_export(folder, 128)


@pytest.mark.slow
def test_teacher_quantize_and_fidelity_through_the_cli(teacher, teacher_home, monkeypatch, capsys):
    """The real teacher end to end: q8_0, q4_k_m and imatrix-calibrated q4_k_m GGUFs, and the fidelity table.

    8-bit is close to lossless, 4-bit costs measurably more, and the importance matrix helps 4-bit."""
    import json

    from edgekit.cli import main

    monkeypatch.setenv("EDGEKIT_HOME", str(teacher_home))
    paths = {}
    for label, extra in (("q8_0", []), ("q4_k_m", []), ("q4_k_m-cal", ["--calibrate", "--calibration-tokens", "8000"])):
        quant = label.split("-")[0]
        assert main(["quantize", "default", "--format", "gguf", "--quant", quant, *extra, "--json", "-q"]) == 0
        paths[label] = json.loads(capsys.readouterr().out)["path"]
    assert main(["fidelity", *paths.values(), "--max-tokens", "3000", "--json", "-q"]) == 0
    rows = {r["label"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    q8, q4, cal = rows["gguf-q8_0"], rows["gguf-q4_k_m"], rows["gguf-q4_k_m-calibrated"]
    assert q8["kl_mean"] < 0.01 and q8["top1_agreement"] > 0.95
    assert q4["kl_mean"] > 3 * q8["kl_mean"]
    assert cal["kl_mean"] < 0.9 * q4["kl_mean"]
    assert q8["size_bytes"] > q4["size_bytes"] == cal["size_bytes"]


def test_every_row_is_scored_against_the_teacher_and_answers_the_questions(tiny_bpe_llama_dir, tiny_bpe_other_dir,
                                                                           tiny_export, home):
    """Teacher = reference: KL 0 and top-1 100 % for the float model, the same answers; another teacher: KL > 0.
    The teacher is part of the artifact id; without one the report is as before."""
    from edgekit.chat import QUESTIONS

    paths = [str(tiny_export(tiny_bpe_llama_dir, "gguf", "q4_0"))]
    same = report.run(tiny_bpe_llama_dir, paths, max_tokens=200, teacher=tiny_bpe_llama_dir)
    ref, q4 = same["rows"]
    assert same["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert ref["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and ref["top1_vs_teacher"] == 1.0
    assert same["teacher"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert q4["kl_to_teacher"] == pytest.approx(q4["kl_mean"], rel=1e-4)  # teacher = reference: the same measure
    assert [a["question"] for a in same["answers"]] == list(QUESTIONS)
    for a in same["answers"]:
        assert list(a["answers"]) == ["teacher", report.STUDENT_LABEL, q4["label"]]
        assert a["answers"]["teacher"] == a["answers"][report.STUDENT_LABEL]  # one model, greedy: one answer

    other = report.run(tiny_bpe_llama_dir, paths, max_tokens=200, teacher=tiny_bpe_other_dir)
    assert other["path"] != same["path"]  # the teacher is in the id
    # (top-1 is no test here: two random tied-embedding models both predict the token they read on answer text)
    for r in other["rows"]:
        assert r["kl_to_teacher"] > 0.01, r["label"]
    assert other["teacher"]["perplexity"] != pytest.approx(other["rows"][0]["perplexity"], rel=1e-3)
    md = report.to_markdown(other.result)
    assert "KL to teacher" in md and f"**{QUESTIONS[0]}**" in md and "| teacher |" in md
    assert [r["model"] for r in report.against_teacher(other.result)] == ["teacher", report.STUDENT_LABEL, q4["label"]]

    plain = report.run(tiny_bpe_llama_dir, paths, max_tokens=200)
    assert "teacher" not in plain.result and "answers" not in plain.result
    assert "kl_to_teacher" not in plain["rows"][1]
    assert "KL to teacher" not in report.to_markdown(plain.result) and report.against_teacher(plain.result) == []
    again = report.run(tiny_bpe_llama_dir, paths, max_tokens=200, teacher=tiny_bpe_other_dir)
    assert again["reused"] and again["path"] == other["path"] and again["answers"] == other["answers"]


def test_a_teacher_with_another_vocabulary_is_refused(tiny_bpe_llama_dir, tiny_llama_dir, tiny_export, home):
    from edgekit.errors import ModelError

    paths = [str(tiny_export(tiny_bpe_llama_dir, "gguf", "q4_0"))]
    with pytest.raises(ModelError, match="vocabulary"):
        report.run(tiny_bpe_llama_dir, paths, max_tokens=50, teacher=tiny_llama_dir)


def test_fidelity_cli_takes_a_teacher(tiny_bpe_llama_dir, tiny_bpe_other_dir, tiny_export, home, capsys):
    import json

    from edgekit.cli import main

    path = str(tiny_export(tiny_bpe_llama_dir, "gguf", "q4_0"))
    assert main(["fidelity", path, "--teacher", str(tiny_bpe_other_dir), "--max-tokens", "64", "-q"]) == 0
    out = capsys.readouterr().out
    assert "KL to teacher" in out and "| teacher |" in out
    assert main(["fidelity", path, "--max-tokens", "64", "--json", "-q"]) == 0
    assert "kl_to_teacher" not in json.loads(capsys.readouterr().out)["rows"][1]
