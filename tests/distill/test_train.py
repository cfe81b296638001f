import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgekit import artifact
from edgekit.distill.cache import CacheConfig, build
from edgekit.distill.train import TrainConfig, batch_indices, lr_at, train
from edgekit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-layer teacher and a 1-layer student of the same width (random), plus fixed-length data."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d / "teacher")
    cfg.num_hidden_layers = 1
    LlamaForCausalLM(cfg).save_pretrained(d / "student")
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(32):
        ids = torch.randint(3, 256, (16,), generator=g).tolist()
        seqs.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    (d / "seqs.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seqs))
    return d, seqs


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


FAST = dict(batch_size=4, precision="fp32", checkpoint_every=5, warmup_steps=2)


def test_kd_training_lowers_the_divergence_and_saves_a_loadable_student(models, tmp_path):
    from transformers import AutoModelForCausalLM

    d, seqs = models
    out = train(TrainConfig(steps=40, lr=3e-3, **FAST), d / "student", tmp_path / "out", seqs, teacher_dir=d / "teacher")
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 41))
    assert sum(r["kd"] for r in m[-5:]) < 0.7 * sum(r["kd"] for r in m[:5])
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in m)
    assert artifact.verify_manifest(out) == []
    assert artifact.read_manifest(out)["metrics"]["steps"] == 40
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert not (tmp_path / "out.inprogress").exists()


def test_second_run_with_the_same_config_is_a_no_op(models, tmp_path):
    d, seqs = models
    cfg = TrainConfig(steps=3, **FAST)
    out = train(cfg, d / "student", tmp_path / "out", seqs, teacher_dir=d / "teacher")
    stamp = (out / "manifest.json").stat().st_mtime_ns
    train(cfg, d / "student", tmp_path / "out", seqs, teacher_dir=d / "teacher")
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_an_init_rebuilt_in_place_is_trained_again(models, tmp_path):
    """The student folder's content, not its path, keys the result: a re-pruned init at the same path retrains."""
    import shutil

    from transformers import LlamaForCausalLM

    d, seqs = models
    init = tmp_path / "init"
    shutil.copytree(d / "student", init)
    cfg = TrainConfig(steps=3, **FAST)
    first = weights(train(cfg, init, tmp_path / "out", seqs, teacher_dir=d / "teacher"))
    torch.manual_seed(5)
    other = LlamaForCausalLM.from_pretrained(init)
    for p in other.parameters():
        p.data.normal_(0, 0.05)
    other.save_pretrained(init)
    again = weights(train(cfg, init, tmp_path / "out", seqs, teacher_dir=d / "teacher"))
    assert any(not torch.equal(first[k], again[k]) for k in first)


def test_ce_baseline_needs_no_teacher(models, tmp_path):
    d, seqs = models
    out = train(TrainConfig(steps=5, kd_weight=0, ce_weight=1, **FAST), d / "student", tmp_path / "ce", seqs)
    assert all(r["kd"] == 0 and r["ce"] > 0 for r in metrics(out))


def test_full_vocabulary_topk_cache_trains_like_the_online_teacher(models, tmp_path):
    from transformers import AutoModelForCausalLM

    d, seqs = models
    cache = build(CacheConfig(k=256), AutoModelForCausalLM.from_pretrained(d / "teacher"), seqs, tmp_path / "cache")
    cfg = TrainConfig(steps=10, **FAST)
    a = weights(train(cfg, d / "student", tmp_path / "online", seqs, teacher_dir=d / "teacher"))
    b = weights(train(cfg, d / "student", tmp_path / "cached", cache_dir=cache))
    init = weights(d / "student")
    # float16 logits in the cache perturb the gradients slightly (Adam magnifies tiny ones), so compare
    # the gap between the two runs with how far training moved the weights.
    moved = sum((a[k] - init[k]).norm() ** 2 for k in a) ** 0.5
    gap = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
    assert gap < 0.05 * moved, (gap, moved)


def test_output_head_on_answer_positions_only_trains_exactly_like_the_full_head(models, tmp_path, monkeypatch):
    """With a cache the head runs only where some row has a label; prompts of different lengths per row."""
    from transformers import AutoModelForCausalLM

    import edgekit.distill.train as train_mod

    d, seqs = models
    ragged = [{"input_ids": s["input_ids"], "labels": [-100] * (2 + i % 7) + s["input_ids"][2 + i % 7:]}
              for i, s in enumerate(seqs)]
    cache = build(CacheConfig(k=16), AutoModelForCausalLM.from_pretrained(d / "teacher"), ragged, tmp_path / "cache")
    cfg = TrainConfig(steps=6, **FAST)
    sliced = train(cfg, d / "student", tmp_path / "sliced", cache_dir=cache)
    monkeypatch.setattr(train_mod, "_accepts_logits_to_keep", lambda model: False)
    full = train(cfg, d / "student", tmp_path / "full", cache_dir=cache)
    a, b = weights(sliced), weights(full)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert [r["loss"] for r in metrics(sliced)] == pytest.approx([r["loss"] for r in metrics(full)], rel=1e-4)
    assert not torch.equal(a["model.norm.weight"], weights(d / "student")["model.norm.weight"])


def test_labelled_positions_skip_prompt_columns_only():
    from edgekit.distill.train import _labelled_positions

    mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    assert _labelled_positions(mask).tolist() == [1, 2, 3]
    assert _labelled_positions(torch.ones(2, 3, dtype=torch.bool)) is None
    assert _labelled_positions(torch.zeros(2, 3, dtype=torch.bool)) is None


def test_online_only_options_and_bad_configs_are_refused(models, tmp_path):
    d, seqs = models
    with pytest.raises(ConfigError, match="needs a teacher"):
        train(TrainConfig(steps=1, **FAST), d / "student", tmp_path / "x", seqs)
    with pytest.raises(ConfigError, match="only supports forward_kl"):
        train(TrainConfig(steps=1, loss="reverse_kl", **FAST), d / "student", tmp_path / "x", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="larger than"):
        train(TrainConfig(steps=1, batch_size=64, precision="fp32"), d / "student", tmp_path / "x", seqs,
              teacher_dir=d / "teacher")
    with pytest.raises(ValueError, match="steps or time_budget_s"):
        TrainConfig(steps=None)
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(stpes=3)


def test_every_loss_and_option_runs_online(models, tmp_path):
    d, seqs = models
    for i, extra in enumerate([dict(loss="reverse_kl"), dict(loss="jsd", beta=0.3), dict(loss="skew_kl"),
                               dict(loss="skew_rkl", temperature=2.0), dict(feature_weight=0.5, ce_weight=0.1),
                               dict(on_policy_fraction=1.0, on_policy_max_new_tokens=8),
                               dict(gradient_checkpointing=True, precision="bf16")]):
        cfg = TrainConfig(**{**FAST, "steps": 2, **extra})
        m = metrics(train(cfg, d / "student", tmp_path / f"o{i}", seqs, teacher_dir=d / "teacher"))
        assert len(m) == 2 and all(r["loss"] == r["loss"] for r in m), extra  # no NaN


def test_progressive_schedule_uses_the_assistant_first(models, tmp_path):
    d, seqs = models
    cfg = TrainConfig(steps=4, assistant_fraction=0.5, **FAST)
    out = train(cfg, d / "student", tmp_path / "p", seqs, teacher_dir=d / "teacher", assistant_dir=d / "teacher")
    assert len(metrics(out)) == 4
    with pytest.raises(ConfigError, match="assistant_dir"):
        train(cfg, d / "student", tmp_path / "q", seqs, teacher_dir=d / "teacher")


def test_data_order_is_a_pure_function_of_seed_and_position():
    a = [batch_indices(10, 3, 7, m) for m in range(9)]
    assert a == [batch_indices(10, 3, 7, m) for m in range(9)]
    epoch0 = sum(a[:3], [])
    assert len(set(epoch0)) == 9  # no repeats inside an epoch
    assert a[:3] != a[3:6]  # each epoch reshuffles
    assert batch_indices(10, 3, 8, 0) != a[0]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 0.09) == pytest.approx(1e-3)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(cfg, 99, 1.0) == pytest.approx(1e-4)


def _spec(d: Path, out: Path, steps: int, **train_kw) -> Path:
    spec = {"train": {**FAST, "steps": steps, "checkpoint_every": 10, **train_kw}, "student_dir": str(d / "student"),
            "out_dir": str(out), "sequences_path": str(d / "seqs.jsonl"), "teacher_dir": str(d / "teacher")}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(spec))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EDGEKIT_QUIET": "1"}


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_result(models, tmp_path):
    d, _ = models
    cmd = [sys.executable, "-m", "edgekit.distill.train", "--config"]
    ref = tmp_path / "ref"
    subprocess.run([*cmd, str(_spec(d, ref, 300))], check=True, env=_env(), capture_output=True, timeout=600)
    out = tmp_path / "run"
    spec = _spec(d, out, 300)
    work = tmp_path / "run.inprogress"
    kills = 0
    for wait_for in ("ckpt-0000050", "ckpt-0000150"):  # kill twice, at different points
        proc = subprocess.Popen([*cmd, str(spec)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (work / wait_for).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not out.exists() or kills == 0  # never published while incomplete
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    subprocess.run([*cmd, str(spec)], check=True, env=_env(), capture_output=True, timeout=600)
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(out)] == list(range(1, 301))
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(ref)]


@pytest.mark.slow
def test_two_processes_on_gloo_match_one_process(models, tmp_path):
    d, _ = models
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "edgekit.distill.train", "--config",
                    str(_spec(d, single, 6, grad_accum=2))], check=True, env=_env(), capture_output=True, timeout=600)
    double = tmp_path / "double"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "edgekit.distill.train", "--config",
                           str(_spec(d, double, 6, grad_accum=1))],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert artifact.read_manifest(double)["metrics"]["processes"] == 2
    a, b = weights(single), weights(double)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ms, md = metrics(single), metrics(double)
    assert [r["tokens"] for r in ms] == [r["tokens"] for r in md]
