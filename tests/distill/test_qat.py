"""Quantization-aware distillation: the QAT phase trains through the export's grid, and the export holds that grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from edgekit import artifact
from edgekit.arch import Architecture
from edgekit.distill.cache import CacheConfig, build
from edgekit.distill.config import DistillConfig, QatConfig, TrainConfig
from edgekit.distill.train import train
from edgekit.export.gguf import export_gguf, rope_interleave
from edgekit.quantize import fakequant
from edgekit.quantize.gguf import quantize_gguf
from edgekit.recipe import load_recipe
from edgekit.validate import validate_recipe
from tests.conftest import _tiny_bpe_tokenizer

FAST = dict(batch_size=4, precision="fp32", checkpoint_every=10, warmup_steps=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer teacher, its top-k logit cache, and a 1-layer student trained on it (float)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg)
    teacher.save_pretrained(d / "teacher")
    cfg.num_hidden_layers = 1
    LlamaForCausalLM(cfg).save_pretrained(d / "student")
    _tiny_bpe_tokenizer(d / "student", 320)
    g = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(32):
        ids = torch.randint(3, 256, (16,), generator=g).tolist()
        seqs.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    cache = build(CacheConfig(k=16), AutoModelForCausalLM.from_pretrained(d / "teacher"), seqs, d / "cache")
    student = train(TrainConfig(steps=20, lr=3e-3, **FAST), d / "student", d / "float", cache_dir=cache)
    return d, cache, student


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_qat_phase_trains_through_q4_0_and_the_gguf_holds_its_grid(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    d, cache, student = trained
    qat = QatConfig(target="gguf-q4_0", steps=30, lr=3e-3)
    out = train(qat.train_config(TrainConfig(**FAST)), student, tmp_path / "qat", cache_dir=cache,
                qat_target=qat.target)
    m = _metrics(out)
    assert all(math.isfinite(r["loss"]) for r in m)
    assert sum(r["kd"] for r in m[-5:]) < sum(r["kd"] for r in m[:5])
    manifest = artifact.read_manifest(out)
    assert manifest["metrics"]["qat"]["target"] == "gguf-q4_0"
    assert manifest["metrics"]["qat"]["weights_on_grid"] == {"Q4_0": 7}
    assert artifact.verify_manifest(out) == []

    # the saved model is a plain HF folder whose float weights quantize to what training computed with
    model = AutoModelForCausalLM.from_pretrained(out)
    arch = Architecture.from_hf_config(model.config.to_dict())
    plan = fakequant.plan_grids("gguf-q4_0", arch)
    fake = fakequant.fake_quantized_weights(model, plan)
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert not torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           before["model.layers.0.mlp.up_proj.weight"])
    export_gguf(out, tmp_path / "f32.gguf", "f32")
    quantize_gguf(tmp_path / "f32.gguf", tmp_path / "q4_0.gguf", "q4_0")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    stored = {t.name: dequantize(np.array(t.data), t.tensor_type) for t in GGUFReader(tmp_path / "q4_0.gguf").tensors}
    checked = 0
    for name, values in stored.items():
        module = fakequant.hf_module("gguf", name)
        if module not in fake:
            continue
        w = fake[module]
        if name.endswith("attn_q.weight"):
            w = rope_interleave(w, arch.heads)
        elif name.endswith("attn_k.weight"):
            w = rope_interleave(w, arch.kv_heads)
        assert np.array_equal(w.numpy(), values), name
        checked += 1
    assert checked == len(plan.grids) == 7


def test_qat_phase_resumes_and_is_its_own_artifact(trained, tmp_path):
    d, cache, student = trained
    cfg = QatConfig(target="onnx-int4", steps=4).train_config(TrainConfig(**FAST))
    a = train(cfg, student, tmp_path / "a", cache_dir=cache, qat_target="onnx-int4")
    b = train(cfg, student, tmp_path / "b", cache_dir=cache)  # the same run without QAT: another artifact
    assert artifact.read_manifest(a)["config"] != artifact.read_manifest(b)["config"]
    assert "qat" not in artifact.read_manifest(b)["metrics"]
    again = train(cfg, student, tmp_path / "a", cache_dir=cache, qat_target="onnx-int4")
    assert again == a and len(_metrics(a)) == 4


def test_executorch_qat_uses_torchao_and_saves_plain_linears(trained, tmp_path):
    pytest.importorskip("torchao")
    from safetensors.torch import load_file

    d, cache, student = trained
    cfg = QatConfig(target="executorch-8da4w", steps=3).train_config(TrainConfig(**FAST))
    out = train(cfg, student, tmp_path / "et", cache_dir=cache, qat_target="executorch-8da4w")
    kinds = artifact.read_manifest(out)["metrics"]["qat"]["weights_on_grid"]
    assert set(kinds) == {"torchao:8da4w", "torchao:8da8w"}
    keys = set(load_file(str(out / "model.safetensors")))
    assert "model.layers.0.mlp.up_proj.weight" in keys and not any("fake" in k for k in keys)


# --------------------------------------------------------------------------- recipe and validate


RECIPE = {"device": "pi-5-8gb", "exports": [{"format": "gguf", "quant": "q4_0"}],
          "distill": {"steps": 10, "qat": {"target": "gguf-q4_0", "steps": 5}}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_recipe_qat_reaches_the_distill_config_and_defaults_to_off(tmp_path):
    cfg = load_recipe(_write(tmp_path, RECIPE)).distill_config()
    assert cfg.qat == QatConfig(target="gguf-q4_0", steps=5)
    assert DistillConfig().qat is None
    assert load_recipe(_write(tmp_path, {**RECIPE, "distill": {"steps": 10}})).distill_config().qat is None
    assert validate_recipe(_write(tmp_path, RECIPE)) == []


def test_bad_qat_target_is_refused_in_one_line(tmp_path):
    bad = {**RECIPE, "distill": {"steps": 10, "qat": {"target": "gguf-q3_k"}}}
    problems = validate_recipe(_write(tmp_path, bad))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "distill.qat.target" in problems[0] and "gguf-q4_0" in problems[0]


def test_qat_target_must_be_an_export_and_not_calibrated(tmp_path):
    other = {**RECIPE, "exports": [{"format": "onnx", "quant": "int4"}]}
    problems = validate_recipe(_write(tmp_path, other))
    assert len(problems) == 1 and "distill.qat.target" in problems[0] and "onnx-int4" in problems[0]
    calibrated = {**RECIPE, "exports": [{"format": "gguf", "quant": "q4_0", "calibrate": True}]}
    problems = validate_recipe(_write(tmp_path, calibrated))
    assert len(problems) == 1 and "exports.0.calibrate" in problems[0] and "calibrate: false" in problems[0]
    awq = {**RECIPE, "exports": [{"format": "onnx", "quant": "int4-awq"}],
           "distill": {"steps": 10, "qat": {"target": "onnx-int4"}}}
    problems = validate_recipe(_write(tmp_path, awq))
    assert len(problems) == 1 and "exports.0.calibrate" in problems[0]


def test_pipeline_returns_the_qat_student_after_the_float_one(tiny_llama_dir, tmp_path, monkeypatch):
    from edgekit.distill.pipeline import run

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path / "home"))
    data = tmp_path / "data.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(3, 256, 20))}) + "\n"
                            for _ in range(16)))
    cfg = DistillConfig.model_validate({
        "teacher": str(tiny_llama_dir),
        "student": {"layers": 1, "hidden_size": 32, "intermediate_size": 64, "heads": 2, "kv_heads": 1},
        "data": {"sources": [str(data)], "heldout_fraction": 0.25, "max_seq_len": 32},
        "cache": {"k": 8},
        "train": {"steps": 2, "batch_size": 2, "precision": "fp32", "warmup_steps": 1},
        "qat": {"target": "gguf-q4_0", "steps": 2},
        "eval": {"prompts": [], "baselines": ["teacher"]},
    })
    a = run(cfg)
    arts = a["artifacts"]
    assert arts["student"] == arts["qat"] == str(a.path) and arts["float_student"] != arts["qat"]
    assert a["qat"]["qat"]["target"] == "gguf-q4_0" and a["training"]["steps"] == 2
    assert artifact.read_manifest(arts["qat"])["config"]["student"] == arts["float_student"]
    again = run(cfg)
    assert again.reused and again["artifacts"] == arts
