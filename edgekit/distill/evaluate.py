"""Evaluation of a student against its teacher on held-out sequences.

For every model: perplexity on the held-out targets (labels != -100), forward KL from the
teacher's next-token distribution, top-1 agreement with the teacher's argmax, and greedy
generations side by side with the teacher's for a few prompts. The teacher itself is
evaluated the same way (KL 0, agreement 1) so every table has its reference row. Export
artifacts (GGUF, ONNX, ExecuTorch: what a user ships) are scored the same way, each in the
first installed runtime that gives every position's logits.

Held-out prompts without an answer are answered by the teacher first (:func:`answered`): the
data stage does it, so the answers are cached in the artifact store like distillation data.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgekit import artifact, metrics, runtimes
from edgekit.chat import apply_chat_template, end_of_turn_ids, question_ids
from edgekit.distill import data as data_stage
from edgekit.distill.batch import collate
from edgekit.distill.config import DataConfig
from edgekit.errors import ConfigError
from edgekit.progress import bar
from edgekit.runtimes.pytorch import load_model
from edgekit.sources import needs_response

log = logging.getLogger(__name__)


def _load(folder: Path):
    from transformers import AutoTokenizer

    model = load_model(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, AttributeError):
        tok = None
    return model, tok


def _batches(sequences: list[dict], batch_size: int):
    for b in range(0, len(sequences), batch_size):
        batch = collate(sequences[b:b + batch_size], None)
        yield batch["input_ids"], batch["labels"], batch["attention_mask"]


def score(model, teacher, sequences: list[dict], batch_size: int = 8) -> dict:
    """Held-out perplexity of ``model``, and its KL to / top-1 agreement with ``teacher`` (:mod:`edgekit.metrics`)."""
    import torch

    tally = metrics.Tally()
    with torch.no_grad(), bar(total=len(sequences), desc="evaluating", unit="seq") as progress:
        for ids, labels, mask in _batches(sequences, batch_size):
            s = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float() if teacher is not model else s
            target = labels[:, 1:]
            keep = target != -100
            if keep.any():
                tally.add(metrics.log_softmax(t[keep].numpy()), s[keep].numpy(), target[keep].numpy())
            progress.update(len(ids))
    return _result(tally)


def _result(tally: metrics.Tally) -> dict:
    if tally.n == 0:
        raise ConfigError("no held-out target tokens to evaluate: every sequence is prompt only (all labels are "
                          "-100) or shorter than 2 tokens; give held-out examples with answers or longer text")
    r = tally.result()
    return {"tokens": r["tokens"], "perplexity": r["perplexity"], "cross_entropy": r["cross_entropy"],
            "kl_to_teacher": r["kl_mean"], "top1_agreement": r["top1_agreement"]}


def has_targets(sequences: list[dict]) -> bool:
    """True when some sequence has a target token to score (a label != -100 after its first position)."""
    return any(label != -100 for s in sequences for label in s["labels"][1:])


def answered(examples: list[dict], sources: list[Path], teacher_dir: Path, teacher_id: str,
             max_seq_len: int) -> list[dict]:
    """``examples`` (read from ``sources``) with every prompt answered by the teacher.

    Prompts awaiting an answer go through the data stage (its defaults, nothing held out), so the teacher's
    answers are an artifact in the store: a rerun with the same file and teacher reuses them, and an
    interrupted one resumes. Examples without a prompt to answer are returned as they are.
    """
    if not any(needs_response(e) for e in examples):
        return examples
    cfg = DataConfig(sources=list(sources), heldout_fraction=0.0, max_seq_len=max_seq_len)
    folder = data_stage.run(cfg, teacher_dir, artifact.store_path("data", cfg.model_dump(mode="json"), teacher_id))
    return [json.loads(line) for name in ("train.jsonl", "heldout.jsonl")
            for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def score_exports(sessions: list, teacher, sequences: list[dict]) -> list[dict]:
    """:func:`score` for export sessions (one sequence at a time), the teacher's forward shared by all of them."""
    import numpy as np
    import torch

    tallies = [metrics.Tally() for _ in sessions]
    with torch.no_grad(), bar(total=len(sequences), desc="evaluating exports", unit="seq") as progress:
        for seq in sequences:
            ids, labels = seq["input_ids"], np.asarray(seq["labels"][1:])
            keep = labels != -100
            if keep.any():
                t = teacher(input_ids=torch.tensor([ids])).logits[0, :-1].float().numpy()
                t_logp = metrics.log_softmax(t[keep])
                for tally, session in zip(tallies, sessions):
                    tally.add(t_logp, np.asarray(session.logits(ids))[:-1][keep], labels[keep])
            progress.update(1)
    return [_result(t) for t in tallies]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to ``prompts`` (through the chat template when the tokenizer has one)."""
    import torch

    outs = []
    for p in prompts:
        if tokenizer.chat_template:
            ids = apply_chat_template(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt")
        else:
            ids = tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        outs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def evaluate(models: dict[str, Path], teacher_dir: Path, sequences: list[dict], prompts: list[str] = (),
             max_new_tokens: int = 48, batch_size: int = 8, exports: list[Path] = ()) -> dict:
    """Score every model in ``models`` (name -> HF folder), every export artifact in ``exports`` and the
    teacher; side-by-side generations."""
    teacher, tok = _load(teacher_dir)
    rows = {"teacher": {"path": str(teacher_dir), "params": teacher.num_parameters(),
                        **score(teacher, teacher, sequences, batch_size)}}
    gens = {"teacher": generate(teacher, tok, list(prompts), max_new_tokens) if prompts and tok else []}
    for name, folder in models.items():
        t0 = time.perf_counter()
        model, mtok = _load(folder)
        rows[name] = {"path": str(folder), "params": model.num_parameters(),
                      **score(model, teacher, sequences, batch_size)}
        gens[name] = generate(model, mtok or tok, list(prompts), max_new_tokens) if prompts and (mtok or tok) else []
        log.info("evaluated %s in %.1fs", name, time.perf_counter() - t0)
    if exports:
        rows_, gens_ = _evaluate_exports(exports, teacher, tok, sequences, list(prompts), max_new_tokens)
        rows.update(rows_)
        gens.update(gens_)
    side_by_side = [{"prompt": p, **{name: g[i] for name, g in gens.items() if g}} for i, p in enumerate(prompts)]
    return {"models": rows, "generations": side_by_side, "heldout_sequences": len(sequences)}


def _evaluate_exports(exports: list[Path], teacher, tok, sequences: list[dict], prompts: list[str],
                      max_new_tokens: int) -> tuple[dict, dict]:
    questions = [question_ids(tok, p) for p in prompts] if tok else []
    context = max([len(s["input_ids"]) for s in sequences] + [len(q) + max_new_tokens for q in questions]) + 16
    opened = []
    try:
        for p in exports:
            opened.append(runtimes.open_export(Path(p), context))
        scores = score_exports([s for s, _ in opened], teacher, sequences)
        rows, gens = {}, {}
        stop = end_of_turn_ids(tok) if tok else ()
        for p, (session, manifest), r in zip(exports, opened, scores):
            name = manifest.get("label") or Path(p).name
            rows[name] = {"path": str(p), "params": None, "format": manifest.get("format"),
                          "size_bytes": manifest.get("metrics", {}).get("size_bytes"), **r}
            gens[name] = [tok.decode(session.generate(q, max_new_tokens, eos_ids=stop),
                                     skip_special_tokens=True).strip() for q in questions]
    finally:
        for session, _ in opened:
            session.close()
    return rows, gens


def to_markdown(report: dict) -> str:
    lines = ["| model | params / size | held-out ppl | KL to teacher | top-1 agreement |", "|---|---:|---:|---:|---:|"]
    for name, r in report["models"].items():
        size = f"{r['params'] / 1e6:.1f}M" if r.get("params") else f"{(r.get('size_bytes') or 0) / 1e6:.1f} MB"
        lines.append(f"| {name} | {size} | {r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} | "
                     f"{100 * r['top1_agreement']:.1f}% |")
    for g in report["generations"]:
        lines.append("")
        lines.append(f"**{g['prompt']}**")
        for name, text in g.items():
            if name != "prompt":
                lines.append(f"- *{name}*: {text[:300]!r}")
    return "\n".join(lines)
