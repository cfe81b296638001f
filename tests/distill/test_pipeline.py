import json

import pytest

from edgekit import artifact
from edgekit.cli import main
from edgekit.distill.pipeline import DistillConfig, StudentSpec


def test_student_spec_wants_a_device_or_a_whole_shape():
    StudentSpec(device="pi-zero-2w")
    StudentSpec(layers=2, hidden_size=64, intermediate_size=128, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="not both"):
        StudentSpec(device="pi-zero-2w", layers=2)
    with pytest.raises(ValueError, match="needs layers"):
        StudentSpec(layers=2)
    with pytest.raises(ValueError, match="extra"):
        DistillConfig(student={"device": "pi-zero-2w"}, trian={})


def test_bad_distill_options_are_one_line_errors(capsys, tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("student: {device: pi-zero-2w}\ntrain: {stepz: 3}\n")
    assert main(["distill", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and err.count("\n") == 1
    assert main(["distill", "--time-budget", "soon"]) == 2
    assert "90s, 20m" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_the_real_teacher_for_a_few_steps(teacher, teacher_home, monkeypatch, capsys, tmp_path):
    """End to end on the embedded teacher: Magpie data, pruning, top-k cache, KD, CE baseline, evaluation."""
    monkeypatch.setenv("EDGEKIT_HOME", str(teacher_home))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "student: {layers: 4, hidden_size: 256, intermediate_size: 512, heads: 4, kv_heads: 2}\n"
        "data: {synthetic_prompts: 6, max_new_tokens: 24, batch_size: 6, heldout_fraction: 0.34}\n"
        "cache: {k: 16}\n"
        "train: {steps: 3, batch_size: 2, warmup_steps: 1, checkpoint_every: 2}\n"
        "eval: {prompts: ['What is 2+2?'], max_new_tokens: 8, baselines: [teacher, ce]}\n"
    )
    assert main(["distill", str(cfg), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["student"]["layers"] == 4 and summary["student"]["params"] < summary["teacher"]["params"]
    rows = summary["evaluation"]["models"]
    assert set(rows) == {"teacher", "student (KD)", "student (CE only)"}
    assert rows["teacher"]["kl_to_teacher"] < 1e-4 and rows["teacher"]["top1_agreement"] == 1.0
    assert rows["student (KD)"]["perplexity"] > rows["teacher"]["perplexity"]
    assert summary["cache"]["bytes_per_token"] > 0 and summary["training"]["steps"] == 3
    for path in summary["artifacts"].values():
        if path:
            assert artifact.verify_manifest(path) == []
    # everything is reused on a second run: same artifacts, nothing retrained
    assert main(["distill", str(cfg), "--json", "-q"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["artifacts"] == summary["artifacts"]


def _text_data(tmp_path, n=24):
    import random

    rng = random.Random(0)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{rng.randrange(3, 256)}" for _ in range(20))}) + "\n"
                            for _ in range(n)))
    return path


def test_pipeline_on_the_tiny_model_with_user_text_and_a_progressive_schedule(tiny_llama_dir, tmp_path, monkeypatch):
    from edgekit.distill.pipeline import run

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    cfg = DistillConfig.model_validate({
        "teacher": str(tiny_llama_dir),
        "student": {"layers": 1, "hidden_size": 32, "intermediate_size": 64, "heads": 2, "kv_heads": 1},
        "progressive": {"layers": 2, "hidden_size": 48, "intermediate_size": 96, "heads": 2, "kv_heads": 1},
        "data": {"sources": [str(_text_data(tmp_path))], "heldout_fraction": 0.25, "max_seq_len": 32},
        "cache": {"k": 8},
        "train": {"steps": 2, "batch_size": 2, "precision": "fp32", "warmup_steps": 1},
        "eval": {"prompts": [], "baselines": ["teacher", "ce"]},
    })
    summary = run(cfg)
    assert summary["artifacts"]["assistant"] and summary["student"]["hidden_size"] == 32
    rows = summary["evaluation"]["models"]
    assert set(rows) == {"teacher", "student (KD)", "student (CE only)"}
    assert rows["student (KD)"]["params"] < rows["teacher"]["params"]
    assert artifact.read_manifest(summary["artifacts"]["student"])["config"]["assistant"]
    again = run(cfg)  # nothing reruns
    assert again["artifacts"] == summary["artifacts"]
