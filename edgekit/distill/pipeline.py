"""``edgekit distill``: plan -> data -> prune -> (logit cache) -> train -> (QAT) -> evaluate, through artifact folders.

Each stage writes ``$EDGEKIT_HOME/artifacts/<stage>-<id>`` where the id hashes the stage's
config and the ids of its inputs, so re-running the same command reuses every finished
stage and a changed key reruns only the stages downstream of it. Within a stage the
work itself is resumable (data generation per batch, the cache per shard, training per
checkpoint).

With ``qat`` set, a last training phase continues from the trained student through the target
export's quantizer (:mod:`edgekit.quantize.fakequant`) against the same teacher logits; that
artifact is the student the run returns (and later stages export). The evaluation still compares
the float student (and baselines) with the teacher; the QAT student's quality is its export's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgekit import artifact, models
from edgekit.arch import Architecture, student_family
from edgekit.chat import render_text
from edgekit.devices import load_device
from edgekit.distill import cache as cache_stage
from edgekit.distill import data as data_stage
from edgekit.distill import evaluate as eval_stage
from edgekit.distill import prune as prune_stage
from edgekit.distill import train as train_stage
from edgekit.distill.config import DistillConfig, StudentSpec
from edgekit.distill.tokenize import tokenize_examples
from edgekit.errors import ConfigError
from edgekit.plan import plan
from edgekit.sources import check_sources

log = logging.getLogger(__name__)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def student_shape(spec: StudentSpec, teacher_arch: Architecture, teacher_name: str) -> tuple[Architecture, dict | None]:
    teacher_arch = student_family(teacher_arch, spec.family)  # one line before any work for a pair that cannot work
    if spec.device:
        p = plan(teacher_arch, load_device(spec.device), spec.format, spec.quant, spec.context,
                 spec.target_decode_tok_s, teacher_name)
        s = p["student"]
        return teacher_arch.with_shape(layers=s["layers"], hidden_size=s["hidden_size"],
                                       intermediate_size=s["intermediate_size"], heads=s["heads"],
                                       kv_heads=s["kv_heads"]), p
    return teacher_arch.with_shape(layers=spec.layers, hidden_size=spec.hidden_size,
                                   intermediate_size=spec.intermediate_size, heads=spec.heads,
                                   kv_heads=spec.kv_heads), None


def run(cfg: DistillConfig, trust_remote_code: bool = False) -> artifact.Artifact:
    """Run the whole distillation chain. The artifact is the trained student (``reused`` when an earlier run
    had finished it); its ``result`` is a summary with every artifact path and the evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if cfg.data.sources:  # bad user data fails here, before the teacher is resolved (converting it takes minutes)
        check_sources(cfg.data.sources)
    teacher = models.resolve_teacher(cfg.teacher, trust_remote_code=trust_remote_code)
    if cfg.data.max_seq_len > teacher.arch.max_context:
        raise ConfigError(f"data.max_seq_len {cfg.data.max_seq_len} is longer than the teacher {teacher.name} was "
                          f"trained for ({teacher.arch.max_context} positions), so its logits past that point are "
                          f"not meaningful; set data.max_seq_len to {teacher.arch.max_context} or less")
    teacher_id = artifact.content_id(str(teacher.path), teacher.files)
    shape, student_plan = student_shape(cfg.student, teacher.arch, teacher.name)
    log.info("student: %d layers, hidden %d, mlp %d, %d/%d heads (%.1fM params, %.0f%% of the teacher)",
             shape.layers, shape.hidden_size, shape.intermediate_size, shape.heads, shape.kv_heads,
             shape.params / 1e6, 100 * shape.params / teacher.arch.params)

    # the student's weights: its initialisation, each checkpoint (weights + AdamW's two moments), the result
    needed = int(shape.params * 4 * (3 * cfg.train.keep_checkpoints + 3)) + (8 << 20)
    artifact.require_space(artifact.home() / "artifacts" / "distill", needed,
                           f"distilling a {shape.params / 1e6:.1f}M-parameter student (init, checkpoints, result)")
    data_dir = data_stage.run(cfg.data, teacher.path,
                              artifact.store_path("data", cfg.data.model_dump(mode="json"), teacher_id),
                              teacher_gguf=teacher.gguf)
    data_id = data_dir.name
    train_examples = _jsonl(data_dir / "train.jsonl")
    heldout_examples = _jsonl(data_dir / "heldout.jsonl")

    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    calib = [render_text(e, tokenizer) for e in train_examples[:cfg.calibration_sequences]]
    init_dir = prune_stage.run(teacher.path, shape, calib, artifact.store_path(
        "prune", shape.to_dict(), cfg.student.init, cfg.student.reconstruct, cfg.calibration_sequences, teacher_id,
        data_id), method=cfg.student.init, seed=cfg.train.seed, reconstruct=cfg.student.reconstruct)

    train_seqs = tokenize_examples(train_examples, tokenizer, cfg.data.max_seq_len)
    heldout_seqs = tokenize_examples(heldout_examples, tokenizer, cfg.data.max_seq_len)
    cache_dir = None
    if cfg.cache is not None and cfg.train.kd_weight > 0:
        teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher.path), use_safetensors=True)
        cache_dir = cache_stage.build(cfg.cache, teacher_model, train_seqs, artifact.store_path(
            "cache", cfg.cache.model_dump(), cfg.data.max_seq_len, teacher_id, data_id))
        del teacher_model
    online = cfg.cache is None and cfg.train.kd_weight + cfg.train.feature_weight > 0
    train_cfg, assistant_dir = cfg.train, None
    if cfg.progressive is not None:  # teacher -> intermediate (as configured) -> student (assistant, then teacher)
        mid_shape, _ = student_shape(cfg.progressive, teacher.arch, teacher.name)
        mid_init = prune_stage.run(teacher.path, mid_shape, calib, artifact.store_path(
            "prune", mid_shape.to_dict(), cfg.progressive.init, cfg.progressive.reconstruct, cfg.calibration_sequences,
            teacher_id, data_id), method=cfg.progressive.init, seed=cfg.train.seed,
            reconstruct=cfg.progressive.reconstruct)
        assistant_dir = train_stage.train(
            cfg.train, mid_init, artifact.store_path("distill", cfg.train.model_dump(), mid_init.name,
                                            cache_dir.name if cache_dir else teacher_id, data_id),
            sequences=None if cache_dir else train_seqs, cache_dir=cache_dir,
            teacher_dir=teacher.path if online else None)
        train_cfg = cfg.train.model_copy(update={"assistant_fraction": cfg.train.assistant_fraction or 0.5})
        cache_dir, online = None, True  # the assistant schedule compares against live models
    student_dir = artifact.store_path("distill", train_cfg.model_dump(), init_dir.name,
                                      cache_dir.name if cache_dir else teacher_id, data_id,
                                      assistant_dir.name if assistant_dir else None)
    reused = artifact.find(student_dir, "distill") is not None  # what training reuses: a student that verifies
    student_dir = train_stage.train(
        train_cfg, init_dir, student_dir,
        sequences=None if cache_dir else train_seqs, cache_dir=cache_dir,
        teacher_dir=teacher.path if online else None, assistant_dir=assistant_dir)
    float_dir, qat_dir = student_dir, None
    if cfg.qat is not None:  # the last phase: the trained student learns through its export's quantizer
        qat_cfg = cfg.qat.train_config(train_cfg.model_copy(update={"assistant_fraction": 0.0}))
        qat_dir = artifact.store_path("distill", qat_cfg.model_dump(), "qat", cfg.qat.target, student_dir.name,
                                      cache_dir.name if cache_dir else teacher_id, data_id)
        reused = artifact.find(qat_dir, "distill") is not None
        qat_dir = train_stage.train(qat_cfg, student_dir, qat_dir, sequences=None if cache_dir else train_seqs,
                                    cache_dir=cache_dir, teacher_dir=teacher.path if online else None,
                                    qat_target=cfg.qat.target)
    students = {"student (KD)" if cfg.train.kd_weight > 0 else "student": float_dir}
    if "ce" in cfg.eval.baselines and cfg.train.kd_weight > 0:
        ce_cfg = cfg.train.model_copy(update={"kd_weight": 0.0, "ce_weight": 1.0, "feature_weight": 0.0,
                                              "on_policy_fraction": 0.0, "assistant_fraction": 0.0})
        students["student (CE only)"] = train_stage.train(
            ce_cfg, init_dir, artifact.store_path("distill", ce_cfg.model_dump(), init_dir.name, data_id),
            sequences=train_seqs)

    # keyed by what the students hold (a student retrained in place is evaluated again), not only their paths
    student_ids = {k: artifact.folder_id(v) for k, v in students.items()}
    with artifact.stage("eval", cfg.eval.model_dump(), {k: str(v) for k, v in students.items()},
                        key=(cfg.eval.model_dump(), {k: v.name for k, v in students.items()}, data_id, teacher_id,
                             student_ids)) as ev:
        if ev.reused:
            report = json.loads((ev.path / "report.json").read_text())
        else:
            report = eval_stage.evaluate(students, teacher.path, heldout_seqs[:cfg.eval.max_sequences],
                                         cfg.eval.prompts, cfg.eval.max_new_tokens)
            artifact.atomic_write_text(ev.tmp / "report.json", json.dumps(report, indent=2))
            artifact.atomic_write_text(ev.tmp / "report.md", eval_stage.to_markdown(report) + "\n")
    eval_dir = ev.path
    student_dir = qat_dir or float_dir  # what later stages export: the QAT student when there is one
    manifest = artifact.read_manifest(student_dir)
    summary = {
        "teacher": {"name": teacher.name, "params": teacher.arch.params, "path": str(teacher.path)},
        "student": {**shape.to_dict(), "fraction_of_teacher": shape.params / teacher.arch.params,
                    "init": cfg.student.init, "path": str(student_dir)},
        "plan": student_plan,
        "artifacts": {"data": str(data_dir), "init": str(init_dir), "cache": str(cache_dir) if cache_dir else None,
                      "assistant": str(assistant_dir) if assistant_dir else None,
                      "student": str(student_dir), "float_student": str(float_dir),
                      "qat": str(qat_dir) if qat_dir else None, "eval": str(eval_dir),
                      **{f"model:{k}": str(v) for k, v in students.items()}},
        "data": artifact.read_manifest(data_dir)["metrics"],
        "cache": artifact.read_manifest(cache_dir)["metrics"] if cache_dir else None,
        "training": artifact.read_manifest(float_dir)["metrics"],
        "qat": manifest["metrics"] if qat_dir else None,
        "evaluation": report,
    }
    return artifact.Artifact(Path(student_dir), Path(student_dir).name, manifest, reused,
                             round(time.perf_counter() - t0, 3), summary)
