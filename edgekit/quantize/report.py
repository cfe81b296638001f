"""Fidelity: what each export costs in quality against the full-precision PyTorch model.

For every export artifact (each run by the first installed runtime the registry has for its
format that gives every position's logits: GGUF in llama.cpp, ONNX in our onnxruntime loop,
ExecuTorch programs in ExecuTorch's runtime) and the same held-out texts, one pass computes
(:mod:`edgekit.metrics`), token by token against the PyTorch fp32 reference, on the answer tokens of
held-out chats (the user's turn is given to a deployed model, not predicted by it): the export's
perplexity, the mean KL divergence KL(reference || export) and its 99th percentile, and top-1
agreement (the same argmax) -- the measures llama.cpp's ``--kl-divergence`` tool reports. A 64-token
greedy generation from a fixed chat prompt is run in every runtime and compared
token for token (pure argmax, no stopping at end-of-turn, so sequences are
comparable). Results: one JSON and one Markdown table, in a ``fidelity-<id>``
artifact folder.

The held-out texts default to ``edgekit/resources/heldout.jsonl``: 112 answers the
embedded teacher wrote to synthetic prompts (see resources/README.md), which are
the distribution a distilled student serves.

Given the ``teacher`` a student was distilled from, what a user ships is scored against
what it was meant to copy: one more forward pass of the teacher per held-out sequence gives
its log-probabilities, and every row (the float student and each export) also gets its KL
divergence KL(teacher || model) and top-1 agreement with the teacher's argmax, beside the
teacher's own perplexity. Teacher, float student and each export then answer the five fixed
questions (:data:`edgekit.chat.QUESTIONS`) greedily through the chat template, stopping at
the end of the turn; the answers go side by side into the report.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

from edgekit import artifact, metrics, runtimes
from edgekit.chat import (
    ANSWER_TOKENS,
    QUESTIONS,
    apply_chat_template,
    end_of_turn_ids,
    labelled_sequences,
    question_ids,
)
from edgekit.errors import ModelError
from edgekit.integrity import check_model_path
from edgekit.progress import bar
from edgekit.quantize.config import FidelityConfig
from edgekit.sources import load_examples

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_HELDOUT = RESOURCES / "heldout.jsonl"
GREEDY_PROMPT = "Explain in a few sentences why the sky is blue."
GREEDY_TOKENS = 64
MAX_TOKENS = FidelityConfig().max_tokens  # held-out tokens scored when not given: the fidelity config's default
TEACHER_LABEL = "teacher"
SCORED = "answers"  # which held-out tokens are scored: a chat's answer tokens (every token of plain text)
STUDENT_LABEL = "student (fp32)"  # the reference, in what is scored against the teacher: the float student


def heldout_scored(tokenizer, paths: list[Path] | None, max_tokens: int, max_len: int
                   ) -> list[tuple[list[int], list[bool]]]:
    """Held-out texts as ``(ids, scored)``: token ids (chat template applied, cut to ``max_len``) and, per next-token
    target ``ids[1:]``, whether it is scored -- the assistant's tokens of a chat (what a deployed model writes; the
    user's prompt is given, not predicted), every token of plain text. ``max_tokens`` scored targets in all."""
    seqs, total = [], 0
    for ids, labels in labelled_sequences(load_examples(paths or [DEFAULT_HELDOUT]), tokenizer):
        ids, scored = ids[:max_len], [label != -100 for label in labels[1:max_len]]
        if total + sum(scored) > max_tokens:  # cut at the target that reaches the budget
            n = next(i for i, c in enumerate(itertools.accumulate(scored)) if c >= max_tokens - total)
            ids, scored = ids[:n + 2], scored[:n + 1]
        if len(ids) >= 2 and any(scored):
            seqs.append((ids, scored))
            total += sum(scored)
        if total >= max_tokens:
            break
    if not seqs:
        raise ModelError("no held-out text to score: the files give no sequence with an answer (or text) of 1 or "
                         "more tokens after its first")
    return seqs


def heldout_sequences(tokenizer, paths: list[Path] | None, max_tokens: int, max_len: int) -> list[list[int]]:
    """Token ids of the held-out texts (:func:`heldout_scored`, without the marks)."""
    return [ids for ids, _ in heldout_scored(tokenizer, paths, max_tokens, max_len)]


def greedy_prompt(tokenizer, prompt: str = GREEDY_PROMPT) -> list[int]:
    if getattr(tokenizer, "chat_template", None):

        text = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def fidelity(reference: Path, exports: list[Path], *, texts: list[Path] | None = None, max_tokens: int = MAX_TOKENS,
             max_len: int = 512, greedy_tokens: int = GREEDY_TOKENS, threads: int | None = None,
             teacher: Path | None = None) -> dict:
    """Score every export against the PyTorch fp32 ``reference`` HF folder on the same held-out tokens; with
    ``teacher`` (an HF folder), the reference and every export against the teacher too, and their answers."""
    from transformers import AutoTokenizer

    for p in exports:  # headers only: a corrupt or hostile export is refused before the reference model loads
        for f in sorted(Path(p).iterdir()) if Path(p).is_dir() else []:
            if f.suffix in (".gguf", ".onnx", ".pte"):
                check_model_path(f)
    if teacher is not None:  # refused before any model loads when the vocabularies differ
        n_teacher, n_reference = _vocab_size(teacher), _vocab_size(reference)
        if n_teacher and n_reference and n_teacher != n_reference:
            _vocab_mismatch(teacher, n_teacher, reference, n_reference)
    tok = AutoTokenizer.from_pretrained(str(reference))
    seqs = heldout_scored(tok, texts, max_tokens, max_len)
    prompt = greedy_prompt(tok)
    questions = [question_ids(tok, q) for q in QUESTIONS] if teacher is not None else []
    n_ctx = max(max_len, len(prompt) + greedy_tokens, *(len(q) + ANSWER_TOKENS for q in questions)) + 16
    sessions: list[tuple[runtimes.Session, dict]] = []
    pytorch = runtimes.get_runtime("pytorch")
    ref = pytorch.session(Path(reference), threads)
    teach = pytorch.session(Path(teacher), threads) if teacher is not None else None
    tallies = {"reference": metrics.Tally(), **{str(p): metrics.Tally() for p in exports}}
    vs_teacher = {k: metrics.Tally() for k in (TEACHER_LABEL, *tallies)} if teach is not None else {}
    t0 = time.perf_counter()
    try:
        for p in exports:
            sessions.append(runtimes.open_export(Path(p), n_ctx, threads))
        with bar(total=sum(len(ids) for ids, _ in seqs), desc="fidelity", unit="tok") as progress:
            for ids, scored in seqs:
                targets = ids[1:]
                ref_logits = ref.logits(ids)
                ref_logp = metrics.log_softmax(ref_logits[:-1])
                tallies["reference"].add(ref_logp, ref_logits, targets, scored)
                if teach is not None:
                    teacher_logp = _teacher_logp(teach, ids, ref_logits, teacher, reference)
                    vs_teacher[TEACHER_LABEL].add(teacher_logp, teacher_logp, targets, scored)
                    vs_teacher["reference"].add(teacher_logp, ref_logits, targets, scored)
                for p, (session, _) in zip(exports, sessions):
                    logits = session.logits(ids)[:-1]
                    tallies[str(p)].add(ref_logp, logits, targets, scored)
                    if teach is not None:
                        vs_teacher[str(p)].add(teacher_logp, logits, targets, scored)
                progress.update(len(ids))
        ref_greedy = ref.generate(prompt, greedy_tokens, eos_ids=())
        rows = [{"label": "pytorch-fp32 (reference)", "format": "pytorch", "quant": "fp32", "path": str(reference),
                 "size_bytes": _folder_weight_bytes(Path(reference)), "bits_per_weight": 32.0,
                 **tallies["reference"].result(), **_against_teacher(vs_teacher, "reference"),
                 "greedy_match": greedy_tokens}]
        for p, (session, manifest) in zip(exports, sessions):
            out = session.generate(prompt, greedy_tokens, eos_ids=())  # pure argmax: no stopping at end-of-turn
            same = next((i for i, (a, b) in enumerate(zip(out, ref_greedy)) if a != b), len(ref_greedy))
            sizes = manifest.get("metrics", {})
            rows.append({"label": manifest.get("label"), "format": manifest["format"], "quant": manifest["quant"],
                         "calibrated": manifest.get("calibrated", False), "path": str(p),
                         "artifact": Path(p).name, "size_bytes": sizes.get("size_bytes"),
                         "bits_per_weight": sizes.get("bits_per_weight"), **tallies[str(p)].result(),
                         **_against_teacher(vs_teacher, str(p)), "greedy_match": same, "greedy_text": tok.decode(out),
                         # quant auto: the per-tensor types its export chose (count per type)
                         **({"types": sizes["auto"]["types"]} if sizes.get("auto") else {})})
        answers = None
        if teach is not None:
            models = [(TEACHER_LABEL, teach), (STUDENT_LABEL, ref),
                      *((r["label"], s) for r, (s, _) in zip(rows[1:], sessions))]
            answers = _answers(tok, questions, models)
    finally:
        for session, _ in sessions:
            session.close()
        ref.close()
        if teach is not None:
            teach.close()
    ref_ppl = rows[0]["perplexity"]
    for r in rows:
        r["ppl_delta_pct"] = 100 * (r["perplexity"] / ref_ppl - 1)
    report = {"schema": "edgekit.fidelity/1", "reference": str(reference), "tokens": sum(sum(m) for _, m in seqs),
              "scored": SCORED,
              "sequences": len(seqs), "texts": [str(p) for p in (texts or [DEFAULT_HELDOUT])],
              "greedy_prompt": GREEDY_PROMPT, "greedy_tokens": greedy_tokens,
              "reference_greedy": tok.decode(ref_greedy),
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    if teach is not None:
        t = vs_teacher[TEACHER_LABEL].result()
        report["teacher"] = {"label": TEACHER_LABEL, "path": str(teacher), "size_bytes": _folder_weight_bytes(
            Path(teacher)), "perplexity": t["perplexity"], "cross_entropy": t["cross_entropy"],
            **_against_teacher(vs_teacher, TEACHER_LABEL)}
        report["answer_tokens"] = ANSWER_TOKENS
        report["answers"] = answers
    return report


def _teacher_logp(teach: runtimes.Session, ids: list[int], ref_logits, teacher: Path, reference: Path):
    """The teacher's log-probabilities at positions ``0..len(ids)-2``; refused when its vocabulary is not the
    model's."""
    logits = teach.logits(ids)
    if logits.shape[-1] != ref_logits.shape[-1]:
        _vocab_mismatch(teacher, logits.shape[-1], reference, ref_logits.shape[-1])
    return metrics.log_softmax(logits[:-1])


def _vocab_size(folder: Path) -> int | None:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def _vocab_mismatch(teacher: Path, n_teacher, reference: Path, n_reference):
    raise ModelError(f"the teacher {teacher} has {n_teacher} vocabulary entries but {reference} has {n_reference}, "
                     "so their next-token distributions cannot be compared; pass the teacher the model was "
                     "distilled from, or no teacher")


def _against_teacher(vs_teacher: dict[str, metrics.Tally], key: str) -> dict:
    """A row's KL to / top-1 agreement with the teacher (nothing without a teacher)."""
    if not vs_teacher:
        return {}
    r = vs_teacher[key].result()
    return {"kl_to_teacher": r["kl_mean"], "kl_to_teacher_p99": r["kl_p99"], "top1_vs_teacher": r["top1_agreement"]}


def _answers(tok, questions: list[list[int]], models: list[tuple[str, runtimes.Session]]) -> list[dict]:
    """Every model's greedy answer to each fixed question, stopping at the end of the turn: one dict per question,
    ``{"question", "answers": {label: text}}``."""
    stop = end_of_turn_ids(tok)
    out = [{"question": q, "answers": {}} for q in QUESTIONS]
    with bar(total=len(models) * len(questions), desc="answers", unit="answer") as progress:
        for label, session in models:
            for row, ids in zip(out, questions):
                row["answers"][label] = tok.decode(session.generate(ids, ANSWER_TOKENS, eos_ids=stop),
                                                   skip_special_tokens=True)
                progress.update(1)
    return out


def _folder_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def to_markdown(report: dict) -> str:
    teacher = report.get("teacher")
    lines = [f"Fidelity against {report['reference']} on {report['tokens']} held-out answer tokens "
             f"({report['sequences']} sequences); greedy: {report['greedy_tokens']} tokens of pure argmax."
             + (f" Against the teacher {teacher['path']} too (KL(teacher || model), top-1 vs the teacher's argmax)."
                if teacher else ""), "",
             "| export | size | bits/weight | ppl | Δppl | mean KL | KL p99 | top-1 | greedy match |"
             + (" KL to teacher | top-1 vs teacher |" if teacher else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if teacher else "")]
    if teacher:
        lines.append(f"| {TEACHER_LABEL} | {_mb(teacher.get('size_bytes'))} | - | {teacher['perplexity']:.3f} | "
                     f"- | - | - | - | - | {teacher['kl_to_teacher']:.4f} | {100 * teacher['top1_vs_teacher']:.1f}% |")
    for r in report["rows"]:
        bpw = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "-"
        lines.append(f"| {r['label']} | {_mb(r.get('size_bytes'))} | {bpw} | {r['perplexity']:.3f} | "
                     f"{r['ppl_delta_pct']:+.2f}% | {r['kl_mean']:.4f} | {r['kl_p99']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['greedy_match']}/{report['greedy_tokens']} |"
                     + (f" {r['kl_to_teacher']:.4f} | {100 * r['top1_vs_teacher']:.1f}% |" if teacher else ""))
    mixes = [r for r in report["rows"] if r.get("types")]
    if mixes:
        lines += ["", "Per-tensor types chosen by quant auto:", ""]
        lines += [f"- {r['label']}: {', '.join(f'{n} {t}' for t, n in r['types'].items())}" for r in mixes]
    for a in report.get("answers") or []:
        lines += ["", f"**{a['question']}**", ""]
        lines += [f"- *{label}*: {text[:300]!r}" for label, text in a["answers"].items()]
    return "\n".join(lines) + "\n"


def against_teacher(report: dict) -> list[dict]:
    """The compact rows a run ends with: teacher, float student, each export -- size, ppl, KL to and top-1 vs the
    teacher. Empty for a report made without a teacher."""
    teacher = report.get("teacher")
    if not teacher:
        return []
    rows = [teacher, {**report["rows"][0], "label": STUDENT_LABEL}, *report["rows"][1:]]
    return [{"model": r["label"], "size_bytes": r.get("size_bytes"), "perplexity": r["perplexity"],
             "kl_to_teacher": r["kl_to_teacher"], "top1_vs_teacher": r["top1_vs_teacher"]} for r in rows]


def _mb(size: int | None) -> str:
    return f"{size / 1e6:.1f} MB" if size else "-"


def run(reference: Path, exports: list[Path], *, texts: list[Path] | None = None, max_tokens: int = MAX_TOKENS,
        threads: int | None = None, teacher: Path | None = None) -> artifact.Artifact:
    """The fidelity stage: reuse or write ``fidelity-<id>/`` with report.json and report.md; the report is
    the artifact's ``result``. With ``teacher``, the id includes the teacher and the questions asked."""
    ids = {"reference": artifact.folder_id(Path(reference)),
           "exports": [artifact.content_id(artifact.read_manifest(Path(p))["files"]) for p in exports],
           "texts": [artifact.sha256_file(Path(t)) for t in (texts or [DEFAULT_HELDOUT])], "max_tokens": max_tokens,
           "scored": SCORED}
    config = {"max_tokens": max_tokens, "threads": threads, "scored": SCORED}
    if teacher is not None:  # no teacher: the same id as before teachers were scored
        ids["teacher"] = artifact.folder_id(Path(teacher))
        config.update(teacher=str(teacher), questions=list(QUESTIONS), answer_tokens=ANSWER_TOKENS)
        ids["questions"] = artifact.content_id(list(QUESTIONS), ANSWER_TOKENS)
    with artifact.stage("fidelity", config, ids, key=(ids,)) as st:
        if st.reused:
            st.result = json.loads((st.path / "report.json").read_text())
            return st.artifact
        report = fidelity(Path(reference), [Path(p) for p in exports], texts=texts, max_tokens=max_tokens,
                          threads=threads, teacher=Path(teacher) if teacher is not None else None)
        artifact.atomic_write_text(st.tmp / "report.json", json.dumps(report, indent=2) + "\n")
        artifact.atomic_write_text(st.tmp / "report.md", to_markdown(report))
        st.metrics = {r.get("artifact", "reference"): {k: r[k] for k in ("kl_mean", "top1_agreement", "perplexity",
                                                                         "kl_to_teacher", "top1_vs_teacher") if k in r}
                      for r in report["rows"]}
        st.result = report
    return st.artifact
