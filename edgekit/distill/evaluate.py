"""Evaluation of a student against its teacher on held-out sequences.

For every model: perplexity on the held-out targets (labels != -100), forward KL from the
teacher's next-token distribution, top-1 agreement with the teacher's argmax, and greedy
generations side by side with the teacher's for a few prompts. The teacher itself is
evaluated the same way (KL 0, agreement 1) so every table has its reference row.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edgekit import metrics
from edgekit.chat import apply_chat_template
from edgekit.distill.batch import collate
from edgekit.progress import bar
from edgekit.runtimes.pytorch import load_model

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
    if tally.n == 0:
        raise ValueError("no held-out target tokens to evaluate (all labels are -100)")
    r = tally.result()
    return {"tokens": r["tokens"], "perplexity": r["perplexity"], "cross_entropy": r["cross_entropy"],
            "kl_to_teacher": r["kl_mean"], "top1_agreement": r["top1_agreement"]}


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
             max_new_tokens: int = 48, batch_size: int = 8) -> dict:
    """Score every model in ``models`` (name -> HF folder) and the teacher; side-by-side generations."""
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
    side_by_side = [{"prompt": p, **{name: g[i] for name, g in gens.items() if g}} for i, p in enumerate(prompts)]
    return {"models": rows, "generations": side_by_side, "heldout_sequences": len(sequences)}


def to_markdown(report: dict) -> str:
    lines = ["| model | params | held-out ppl | KL to teacher | top-1 agreement |", "|---|---:|---:|---:|---:|"]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} | "
                     f"{100 * r['top1_agreement']:.1f}% |")
    for g in report["generations"]:
        lines.append("")
        lines.append(f"**{g['prompt']}**")
        for name, text in g.items():
            if name != "prompt":
                lines.append(f"- *{name}*: {text[:300]!r}")
    return "\n".join(lines)
