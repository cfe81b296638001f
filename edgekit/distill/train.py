"""The distillation training loop: one readable function, resumable, single- or multi-process.

``train(cfg, student_dir, out_dir, ...)`` trains the student in ``student_dir`` (a
pruned or random-init HF folder) against one of:

- a teacher-logit cache (``cache_dir``): sparse targets, no teacher in memory;
- the teacher itself (``teacher_dir``), online: dense targets, needed for reverse KL /
  JSD / skew losses, the hidden-state loss, on-policy batches and the progressive
  (assistant) schedule;
- nothing (``kd_weight=0``): plain cross-entropy fine-tuning, the baseline.

AdamW, linear warmup then cosine decay, gradient accumulation, clipping, optional
gradient checkpointing, bf16 autocast where the CPU/GPU supports it, a fixed seed.
The data order is a pure function of (seed, epoch, position), so a run killed at any
moment resumes from its last checkpoint (written atomically every N steps) and sees
the same batches it would have seen. Multi-process runs go through ``accelerate``
(DDP; gloo on CPU): launch with ``torchrun --nproc_per_node N -m edgekit.distill.train
--config run.json``. Each process takes every N-th micro-batch, so N processes with
``grad_accum=A`` train exactly like one process with ``grad_accum=N*A``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

from edgekit import artifact
from edgekit.arch import Architecture
from edgekit.distill.batch import collate
from edgekit.distill.cache import LogitCache
from edgekit.distill.config import TrainConfig
from edgekit.distill.losses import FeatureProjector, cross_entropy, divergence, feature_loss, sparse_forward_kl
from edgekit.errors import ConfigError
from edgekit.hf import NOTICE_FILE, TOKENIZER_FILES, copy_tokenizer
from edgekit.progress import bar
from edgekit.quantize import fakequant

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- data order


def batch_indices(n_examples: int, batch_size: int, seed: int, micro: int) -> list[int]:
    """Example indices of global micro-batch ``micro``: epochs are seeded permutations, last partial batch dropped."""
    import torch

    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch_size {batch_size} is larger than the {n_examples} training sequences; lower it")
    epoch, j = divmod(micro, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size].tolist()


class _Source:
    """Training sequences from a list of {input_ids, labels} or from a logit cache, as tensors."""

    def __init__(self, sequences: list[dict] | None, cache_dir: Path | None):
        import torch

        self.cache = None
        if cache_dir is not None:
            self.cache = LogitCache(cache_dir)
            self.n = len(self.cache)
        elif sequences:
            self.seqs = [{"input_ids": torch.tensor(s["input_ids"]), "labels": torch.tensor(s["labels"])}
                         for s in sequences]
            self.n = len(self.seqs)
        else:
            raise ConfigError("no training data: pass sequences or a logit cache")

    @property
    def sparse_mode(self) -> str | None:
        return self.cache.mode if self.cache else None

    def get(self, i: int) -> dict:
        if self.cache:
            c = self.cache[i]
            return {"input_ids": c.input_ids, "labels": c.labels, "indices": c.indices, "values": c.values}
        return self.seqs[i]


# --------------------------------------------------------------------------- helpers


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr*min_lr_ratio over the run's progress (0..1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def _use_bf16(cfg: TrainConfig) -> bool:
    import torch

    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)


def _latest_checkpoint(work: Path) -> Path | None:
    for ckpt in sorted(work.glob("ckpt-*"), reverse=True):
        if (ckpt / artifact.MANIFEST).is_file() and not artifact.verify_manifest(ckpt):
            return ckpt
        log.warning("checkpoint %s is incomplete or damaged; trying an older one", ckpt)
    return None


def _labelled_positions(mask):
    """Positions (of the shifted sequence) where any row of the batch has a label; None when that is all of them."""
    keep = mask.any(0).nonzero().flatten()
    return None if len(keep) in (0, mask.shape[1]) else keep


def _accepts_logits_to_keep(model) -> bool:
    """transformers' causal LMs take ``logits_to_keep`` (an index tensor computes the head at those positions only)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _step_of(line: str) -> int | None:
    """The step of a metrics line, or None for a line torn by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _count(kinds) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return out


def _on_policy(student, batch: dict, cfg: TrainConfig, seed: int) -> dict:
    """Replace each response with the student's own sample (GKD): prompt tokens are those with label -100."""
    import torch

    rows, labels = [], []
    for ids, lab in zip(batch["input_ids"], batch["labels"]):
        keep = int((lab != -100).nonzero()[0]) if (lab != -100).any() else len(ids)
        prompt = ids[:max(1, keep)][None]
        torch.manual_seed(seed)
        with torch.no_grad():
            out = student.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                   top_k=0, max_new_tokens=cfg.on_policy_max_new_tokens, pad_token_id=0)[0]
        rows.append(out)
        labels.append(torch.cat([torch.full((prompt.shape[1],), -100), out[prompt.shape[1]:]]))
    return collate([{"input_ids": r, "labels": lab} for r, lab in zip(rows, labels)], None)


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, student_dir: Path, out_dir: Path, sequences: list[dict] | None = None,
          cache_dir: Path | None = None, teacher_dir: Path | None = None, assistant_dir: Path | None = None,
          qat_target: str | None = None) -> Path:
    """Train the student; returns ``out_dir``, an HF folder with metrics.jsonl and manifest.json.

    ``qat_target`` (a :data:`edgekit.quantize.fakequant.TARGETS` name) trains through that export's
    quantizer: the weights it quantizes are fake-quantized in every forward pass (straight-through
    gradient), and the float weights saved are the ones the exporter's quantizer turns into exactly
    the trained values.
    """
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_model, save_model

    out_dir = Path(out_dir)
    online = teacher_dir is not None
    if cfg.kd_weight > 0 and not online and cache_dir is None:
        raise ConfigError("kd_weight > 0 needs a teacher: pass a logit cache or the teacher (or set kd_weight: 0)")
    if cache_dir is not None and not online and cfg.loss != "forward_kl":
        raise ConfigError(f"loss {cfg.loss!r} needs the full teacher distribution; a logit cache only supports "
                          "forward_kl -- use loss: forward_kl or train against the teacher online")
    if (cfg.feature_weight > 0 or cfg.on_policy_fraction > 0) and not online:
        raise ConfigError("feature_weight and on_policy_fraction need the teacher online (teacher_dir), not a cache")
    if cfg.assistant_fraction > 0 and (assistant_dir is None or not online):
        raise ConfigError("assistant_fraction > 0 needs assistant_dir (the intermediate model) and the teacher online")
    config = {"train": cfg.model_dump(), "student": str(student_dir), "cache": str(cache_dir or ""),
              "teacher": str(teacher_dir or ""), "assistant": str(assistant_dir or ""),
              "data": artifact.content_id([s["input_ids"] for s in sequences]) if sequences else None,
              # what the folders hold, not only where: an init or cache rebuilt in place (another pruning
              # config, say) must not be answered with a student trained from the old one
              "student_id": artifact.folder_id(student_dir),
              "cache_id": artifact.folder_id(cache_dir) if cache_dir else None}
    if qat_target is not None:  # absent otherwise: ids of runs without QAT stay as they were
        config["qat_target"] = qat_target
    if artifact.find(out_dir, "distill", config) is not None:
        log.info("%s is already trained with this config; reusing it", out_dir)
        return out_dir

    weights = sum(p.stat().st_size for p in Path(student_dir).glob("*.safetensors"))
    # each checkpoint holds the weights and AdamW's two moments; plus the published student
    resumable = out_dir.with_name(out_dir.name + ".inprogress")
    held = sum(p.stat().st_size for p in resumable.rglob("*") if p.is_file()) if resumable.is_dir() else 0
    artifact.require_space(out_dir, weights * (3 * cfg.keep_checkpoints + 2) + (1 << 20) - held,
                           "training checkpoints")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(cfg.seed)
    work = out_dir.with_name(out_dir.name + ".inprogress")
    if acc.is_main_process:
        if (work / "config.json").is_file() and json.loads((work / "config.json").read_text()) != config:
            log.warning("%s holds a run with another config; starting over", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        for partial in work.glob(".ckpt-*"):  # a checkpoint being written when the run was killed
            shutil.rmtree(partial, ignore_errors=True)
        artifact.atomic_write_text(work / "config.json", json.dumps(config, indent=2))
    acc.wait_for_everyone()

    source = _Source(sequences, cache_dir)
    student = _load(student_dir)
    grid_plan = None
    if qat_target is not None:
        arch = Architecture.from_hf_config(student.config.to_dict(), str(Path(student_dir) / "config.json"))
        grid_plan = fakequant.plan_grids(qat_target, arch)
        fakequant.prepare(student, grid_plan)
        log.info("QAT through %s: %d weights on the export's grid, %d kept float", qat_target,
                 len(grid_plan.grids), len(grid_plan.float_kept))
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        student.config.use_cache = False
    teacher = _load(teacher_dir).eval().requires_grad_(False) if online and cfg.kd_weight + cfg.feature_weight > 0 else None
    assistant = _load(assistant_dir).eval().requires_grad_(False) if cfg.assistant_fraction > 0 else None
    projector = None
    if cfg.feature_weight > 0:
        projector = FeatureProjector(student.config.hidden_size, teacher.config.hidden_size,
                                     student.config.num_hidden_layers)
    params = list(student.parameters()) + (list(projector.parameters()) if projector else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    step, tokens_seen, elapsed = 0, 0, 0.0
    ckpt = _latest_checkpoint(work)
    if ckpt is not None:
        load_model(student, str(ckpt / "student.safetensors"))
        if projector:
            load_model(projector, str(ckpt / "projector.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        log.info("resuming from %s (step %d)", ckpt.name, step)
    if acc.is_main_process:  # drop metrics logged after the checkpoint we resume from
        metrics_path = work / "metrics.jsonl"
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        kept = [ln for ln in lines if _step_of(ln) is not None and _step_of(ln) <= step]
        artifact.atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    student, opt = acc.prepare(student, opt)
    model = acc.unwrap_model(student)
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16) if _use_bf16(cfg) else nullcontext()
    # dense targets (online teacher, features) keep every position; the cache's sparse targets slice along
    head_slicing = (source.sparse_mode is not None and not online and projector is None
                    and _accepts_logits_to_keep(model))

    def progress_now() -> float:
        if cfg.time_budget_s:
            return elapsed / cfg.time_budget_s
        return step / cfg.steps

    def done() -> bool:
        return (cfg.steps is not None and step >= cfg.steps) or (cfg.time_budget_s is not None
                                                                 and elapsed >= cfg.time_budget_s)

    total = cfg.steps if cfg.steps else None
    pbar = bar(total=total, desc="distilling", unit="step") if acc.is_main_process else None
    if pbar is not None:
        pbar.update(step)
    student.train()
    while not done():
        t0 = time.perf_counter()
        lr = lr_at(cfg, step, progress_now())
        for group in opt.param_groups:
            group["lr"] = lr
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "feature": 0.0}
        step_tokens = 0
        for a in range(cfg.grad_accum):
            micro = (step * cfg.grad_accum + a) * world + rank
            idx = batch_indices(source.n, cfg.batch_size, cfg.seed, micro)
            batch = collate([source.get(i) for i in idx], source.sparse_mode)
            if cfg.on_policy_fraction > 0 and (micro % 1000) < cfg.on_policy_fraction * 1000:
                model.eval()
                batch = _on_policy(model, batch, cfg, seed=cfg.seed * 7919 + micro)
                model.train()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            step_tokens += int(batch["attention_mask"].sum())
            # The output head only where some sequence has a label (the answers): prompts are a third of the
            # tokens, and the head (vocab x hidden) is a third of a small student's compute.
            keep = _labelled_positions(mask) if head_slicing else None
            with autocast:
                out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=projector is not None,
                              **({"logits_to_keep": keep} if keep is not None else {}))
            if keep is not None:
                labels, mask = labels[:, keep], mask[:, keep]
                logits = out.logits.float()
            else:
                logits = out.logits[:, :-1].float()
            kd = logits.new_zeros(())
            feat = logits.new_zeros(())
            if cfg.kd_weight > 0 or projector is not None:
                if source.sparse_mode and not online:
                    indices, values = batch["indices"][:, :-1], batch["values"][:, :-1]
                    if keep is not None:
                        indices, values = indices[:, keep], values[:, keep]
                    kd = sparse_forward_kl(logits, indices, values, source.sparse_mode, cfg.temperature, mask)
                else:
                    use_assistant = assistant is not None and progress_now() < cfg.assistant_fraction
                    target_model = assistant if use_assistant else teacher
                    with torch.no_grad(), autocast:
                        t_out = target_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             output_hidden_states=projector is not None)
                    kd = divergence(logits, t_out.logits[:, :-1].float(), cfg.loss, cfg.temperature, mask,
                                    cfg.beta, cfg.skew)
                    if projector is not None:
                        feat = feature_loss(out.hidden_states, t_out.hidden_states, projector, batch["attention_mask"])
            ce = cross_entropy(logits, labels) if cfg.ce_weight > 0 else logits.new_zeros(())
            loss = cfg.kd_weight * kd + cfg.ce_weight * ce + cfg.feature_weight * feat
            acc.backward(loss / cfg.grad_accum)
            for k, v in (("loss", loss), ("kd", kd), ("ce", ce), ("feature", feat)):
                sums[k] += float(v.detach()) / cfg.grad_accum
        grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        step_tokens = int(acc.reduce(torch.tensor(step_tokens), reduction="sum")) if world > 1 else step_tokens
        tokens_seen += step_tokens
        if acc.is_main_process:
            row = {"step": step, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr, "grad_norm": round(grad_norm, 4),
                   "tokens": step_tokens, "tokens_per_s": round(step_tokens / dt, 1), "elapsed_s": round(elapsed, 3)}
            with open(work / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            artifact.fault_point("train.step")
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % cfg.checkpoint_every == 0 or done():
            if acc.is_main_process:
                with artifact.atomic_dir(work / f"ckpt-{step:07d}") as tmp:
                    save_model(model, str(tmp / "student.safetensors"))
                    if projector:
                        save_model(projector, str(tmp / "projector.safetensors"))
                    torch.save(opt.state_dict(), tmp / "optimizer.pt")
                    artifact.atomic_write_text(tmp / "state.json", json.dumps(
                        {"step": step, "tokens_seen": tokens_seen, "elapsed_s": elapsed}))
                    artifact.write_manifest(tmp, stage="checkpoint", config={"step": step})
                artifact.fault_point("train.checkpoint")
                for old in sorted(work.glob("ckpt-*"))[:-cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()
    if pbar is not None:
        pbar.close()

    if acc.is_main_process:
        metrics = [json.loads(ln) for ln in (work / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        if grid_plan is not None:
            fakequant.release(model)  # plain linears holding the float weights the exporter quantizes
        with artifact.atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            copy_tokenizer(student_dir, tmp, (*TOKENIZER_FILES, NOTICE_FILE))  # the tokenizer travels with it
            shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
            tail = metrics[-max(1, len(metrics) // 10):]
            artifact.write_manifest(tmp, stage="distill", config=config, inputs={
                "student_init": str(student_dir), "cache": str(cache_dir or ""), "teacher": str(teacher_dir or "")},
                metrics={
                    "steps": step, "tokens_seen": tokens_seen, "wall_s": round(elapsed, 2),
                    "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                    "final_loss": sum(m["loss"] for m in tail) / len(tail) if tail else None,
                    "processes": world, "bf16": _use_bf16(cfg),
                    **({"qat": {"target": qat_target, "weights_on_grid": _count(grid_plan.grids.values()),
                               "kept_float": grid_plan.float_kept}}
                       if grid_plan is not None else {}),
                })
        shutil.rmtree(work, ignore_errors=True)
    acc.wait_for_everyone()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun``/``accelerate launch``: ``--config run.json`` holding the train() arguments."""
    ap = argparse.ArgumentParser(prog="python -m edgekit.distill.train")
    ap.add_argument("--config", required=True, help="JSON: {train, student_dir, out_dir, sequences_path | cache_dir, "
                                                    "teacher_dir?, assistant_dir?}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = json.loads(Path(args.config).read_text())
    sequences = None
    if spec.get("sequences_path"):
        sequences = [json.loads(ln) for ln in Path(spec["sequences_path"]).read_text().splitlines() if ln.strip()]
    path = lambda k: Path(spec[k]) if spec.get(k) else None  # noqa: E731
    train(TrainConfig(**spec.get("train", {})), Path(spec["student_dir"]), Path(spec["out_dir"]), sequences,
          path("cache_dir"), path("teacher_dir"), path("assistant_dir"), spec.get("qat_target"))


if __name__ == "__main__":
    main()
