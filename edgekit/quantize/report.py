"""Fidelity: what each export costs in quality against the full-precision PyTorch model.

For every export artifact (each run by the first installed runtime the registry has for its
format that gives every position's logits: GGUF in llama.cpp, ONNX in our onnxruntime loop,
ExecuTorch programs in ExecuTorch's runtime) and the same held-out texts, one pass computes
(:mod:`edgekit.metrics`), token by token against the PyTorch fp32 reference: the export's
perplexity, the mean KL divergence KL(reference || export) and its 99th percentile, and top-1
agreement (the same argmax) -- the measures llama.cpp's ``--kl-divergence`` tool reports. A 64-token
greedy generation from a fixed chat prompt is run in every runtime and compared
token for token (pure argmax, no stopping at end-of-turn, so sequences are
comparable). Results: one JSON and one Markdown table, in a ``fidelity-<id>``
artifact folder.

The held-out texts default to ``edgekit/resources/heldout.jsonl``: 112 answers the
embedded teacher wrote to synthetic prompts (see resources/README.md), which are
the distribution a distilled student serves.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgekit import artifact, metrics, runtimes
from edgekit.chat import apply_chat_template, render_text
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


def open_export(folder: Path, n_ctx: int, threads: int | None = None) -> tuple[runtimes.Session, dict]:
    """A session on an export artifact folder, in the first installed runtime that scores its format, and its manifest.

    The ``.pte`` returns last-position logits only, so ExecuTorch's full-sequence logits take one program
    call per token.
    """
    folder = Path(folder)
    manifest = artifact.read_manifest(folder)
    if manifest.get("stage") != "export":
        raise ModelError(f"{folder} is a {manifest.get('stage')!r} artifact, not an export; pass folders made by "
                         "`edgekit export` / `edgekit quantize`")
    runtime = runtimes.for_format(manifest["format"], full_logits=True)
    return runtime.session(folder, threads, context=n_ctx, all_logits=True), manifest


def heldout_sequences(tokenizer, paths: list[Path] | None, max_tokens: int, max_len: int) -> list[list[int]]:
    """Token ids of the held-out texts (chat template applied), each cut to ``max_len``, ``max_tokens`` in all."""

    seqs, total = [], 0
    for e in load_examples(paths or [DEFAULT_HELDOUT]):
        ids = tokenizer(render_text(e, tokenizer), add_special_tokens=False).input_ids[:max_len]
        ids = ids[: max(0, max_tokens - total)] if total + len(ids) > max_tokens else ids
        if len(ids) >= 2:
            seqs.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    if not seqs:
        raise ModelError("no held-out text to score: the files give no sequence of 2 or more tokens")
    return seqs


def greedy_prompt(tokenizer, prompt: str = GREEDY_PROMPT) -> list[int]:
    if getattr(tokenizer, "chat_template", None):

        text = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def fidelity(reference: Path, exports: list[Path], *, texts: list[Path] | None = None, max_tokens: int = MAX_TOKENS,
             max_len: int = 512, greedy_tokens: int = GREEDY_TOKENS, threads: int | None = None) -> dict:
    """Score every export against the PyTorch fp32 ``reference`` HF folder on the same held-out tokens."""
    from transformers import AutoTokenizer

    for p in exports:  # headers only: a corrupt or hostile export is refused before the reference model loads
        for f in sorted(Path(p).iterdir()) if Path(p).is_dir() else []:
            if f.suffix in (".gguf", ".onnx", ".pte"):
                check_model_path(f)
    tok = AutoTokenizer.from_pretrained(str(reference))
    seqs = heldout_sequences(tok, texts, max_tokens, max_len)
    prompt = greedy_prompt(tok)
    n_ctx = max(max_len, len(prompt) + greedy_tokens) + 16
    sessions: list[tuple[runtimes.Session, dict]] = []
    ref = runtimes.get_runtime("pytorch").session(Path(reference), threads)
    tallies = {"reference": metrics.Tally(), **{str(p): metrics.Tally() for p in exports}}
    t0 = time.perf_counter()
    try:
        for p in exports:
            sessions.append(open_export(Path(p), n_ctx, threads))
        with bar(total=sum(map(len, seqs)), desc="fidelity", unit="tok") as progress:
            for ids in seqs:
                targets = ids[1:]
                ref_logits = ref.logits(ids)
                ref_logp = metrics.log_softmax(ref_logits[:-1])
                tallies["reference"].add(ref_logp, ref_logits, targets)
                for p, (session, _) in zip(exports, sessions):
                    tallies[str(p)].add(ref_logp, session.logits(ids)[:-1], targets)
                progress.update(len(ids))
        ref_greedy = ref.generate(prompt, greedy_tokens, eos_ids=())
        rows = [{"label": "pytorch-fp32 (reference)", "format": "pytorch", "quant": "fp32", "path": str(reference),
                 "size_bytes": _folder_weight_bytes(Path(reference)), "bits_per_weight": 32.0,
                 **tallies["reference"].result(), "greedy_match": greedy_tokens}]
        for p, (session, manifest) in zip(exports, sessions):
            out = session.generate(prompt, greedy_tokens, eos_ids=())  # pure argmax: no stopping at end-of-turn
            same = next((i for i, (a, b) in enumerate(zip(out, ref_greedy)) if a != b), len(ref_greedy))
            sizes = manifest.get("metrics", {})
            rows.append({"label": manifest.get("label"), "format": manifest["format"], "quant": manifest["quant"],
                         "calibrated": manifest.get("calibrated", False), "path": str(p),
                         "artifact": Path(p).name, "size_bytes": sizes.get("size_bytes"),
                         "bits_per_weight": sizes.get("bits_per_weight"), **tallies[str(p)].result(),
                         "greedy_match": same, "greedy_text": tok.decode(out)})
    finally:
        for session, _ in sessions:
            session.close()
        ref.close()
    ref_ppl = rows[0]["perplexity"]
    for r in rows:
        r["ppl_delta_pct"] = 100 * (r["perplexity"] / ref_ppl - 1)
    return {"schema": "edgekit.fidelity/1", "reference": str(reference), "tokens": sum(len(s) - 1 for s in seqs),
            "sequences": len(seqs), "texts": [str(p) for p in (texts or [DEFAULT_HELDOUT])],
            "greedy_prompt": GREEDY_PROMPT, "greedy_tokens": greedy_tokens, "reference_greedy": tok.decode(ref_greedy),
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def _folder_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def to_markdown(report: dict) -> str:
    lines = [f"Fidelity against {report['reference']} on {report['tokens']} held-out tokens "
             f"({report['sequences']} sequences); greedy: {report['greedy_tokens']} tokens of pure argmax.", "",
             "| export | size | bits/weight | ppl | Δppl | mean KL | KL p99 | top-1 | greedy match |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        size = f"{r['size_bytes'] / 1e6:.1f} MB" if r.get("size_bytes") else "-"
        bpw = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "-"
        lines.append(f"| {r['label']} | {size} | {bpw} | {r['perplexity']:.3f} | {r['ppl_delta_pct']:+.2f}% | "
                     f"{r['kl_mean']:.4f} | {r['kl_p99']:.4f} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['greedy_match']}/{report['greedy_tokens']} |")
    return "\n".join(lines) + "\n"


def run(reference: Path, exports: list[Path], *, texts: list[Path] | None = None, max_tokens: int = MAX_TOKENS,
        threads: int | None = None) -> artifact.Artifact:
    """The fidelity stage: reuse or write ``fidelity-<id>/`` with report.json and report.md; the report is
    the artifact's ``result``."""
    ids = {"reference": artifact.folder_id(Path(reference)),
           "exports": [artifact.content_id(artifact.read_manifest(Path(p))["files"]) for p in exports],
           "texts": [artifact.sha256_file(Path(t)) for t in (texts or [DEFAULT_HELDOUT])], "max_tokens": max_tokens}
    with artifact.stage("fidelity", {"max_tokens": max_tokens, "threads": threads}, ids, key=(ids,)) as st:
        if st.reused:
            st.result = json.loads((st.path / "report.json").read_text())
            return st.artifact
        report = fidelity(Path(reference), [Path(p) for p in exports], texts=texts, max_tokens=max_tokens,
                          threads=threads)
        artifact.atomic_write_text(st.tmp / "report.json", json.dumps(report, indent=2) + "\n")
        artifact.atomic_write_text(st.tmp / "report.md", to_markdown(report))
        st.metrics = {r.get("artifact", "reference"): {k: r[k] for k in ("kl_mean", "top1_agreement", "perplexity")}
                      for r in report["rows"]}
        st.result = report
    return st.artifact
