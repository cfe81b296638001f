"""Fidelity: what each export costs in quality against the full-precision PyTorch model.

For every export artifact (GGUF run by llama.cpp, ONNX run by our onnxruntime
loop, ExecuTorch programs run by ExecuTorch's runtime) and the same held-out texts, one pass computes, token by token against the
PyTorch fp32 reference: the export's perplexity, the mean KL divergence
KL(reference || export) and its 99th percentile, and top-1 agreement (the same
argmax) -- the measures llama.cpp's ``--kl-divergence`` tool reports. A 64-token
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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgekit import artifact
from edgekit.errors import ModelError
from edgekit.progress import bar

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_HELDOUT = RESOURCES / "heldout.jsonl"
GREEDY_PROMPT = "Explain in a few sentences why the sky is blue."
GREEDY_TOKENS = 64


@dataclass
class Runner:
    """One model behind a uniform interface: full-sequence logits and pure-argmax generation."""

    label: str
    logits: Callable[[list[int]], np.ndarray]  # [T, vocab] float32
    greedy: Callable[[list[int], int], list[int]]
    close: Callable[[], None] = lambda: None


# --------------------------------------------------------------------------- runners


def torch_runner(model_dir: Path, threads: int | None = None) -> Runner:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    def greedy(ids: list[int], n: int) -> list[int]:
        out, past, x = [], None, torch.tensor([ids])
        with torch.no_grad():
            for _ in range(n):
                r = model(x, past_key_values=past, use_cache=True)
                past, tok = r.past_key_values, int(r.logits[0, -1].argmax())
                out.append(tok)
                x = torch.tensor([[tok]])
        return out

    return Runner("pytorch-fp32", logits, greedy)


def gguf_runner(path: Path, n_ctx: int, threads: int | None = None) -> Runner:
    from edgekit.bench.llamacpp import open_llama

    llm = open_llama(path, n_ctx=n_ctx, n_threads=threads, logits_all=True)

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)

    def greedy(ids: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        return out

    return Runner("llama.cpp", logits, greedy, llm.close)


def onnx_runner(folder: Path, threads: int | None = None) -> Runner:
    from edgekit.bench.onnxruntime import OrtLM

    lm = OrtLM(folder, threads=threads)
    return Runner("onnxruntime", lm.logits, lambda ids, n: list(lm.generate(ids, n, eos_ids=(), greedy=True)))


def executorch_runner(folder: Path, threads: int | None = None) -> Runner:
    """The .pte returns last-position logits only, so full-sequence logits take one program call per token."""
    from edgekit.bench.executorch import EtLM

    lm = EtLM(folder, threads=threads)
    return Runner("executorch", lm.logits, lambda ids, n: list(lm.generate(ids, n, eos_ids=())), lm.close)


def open_export(folder: Path, n_ctx: int, threads: int | None = None) -> tuple[Runner, dict]:
    """A runner for an export artifact folder, and its manifest."""
    folder = Path(folder)
    manifest = artifact.read_manifest(folder)
    if manifest.get("stage") != "export":
        raise ModelError(f"{folder} is a {manifest.get('stage')!r} artifact, not an export; pass folders made by "
                         "`edgekit export` / `edgekit quantize`")
    fmt = manifest["format"]
    if fmt == "gguf":
        runner = gguf_runner(folder / manifest["model_file"], n_ctx, threads)
    elif fmt == "onnx":
        runner = onnx_runner(folder, threads)
    elif fmt == "executorch":
        runner = executorch_runner(folder, threads)
    else:
        raise ModelError(f"{folder}: no fidelity runner for format {fmt!r}")
    runner.label = manifest.get("label", fmt)
    return runner, manifest


# --------------------------------------------------------------------------- metrics


class _Tally:
    """Running sums for one export: NLL, KL, agreement; per-token KL kept for percentiles."""

    def __init__(self):
        self.nll = 0.0
        self.agree = 0
        self.n = 0
        self.kls: list[np.ndarray] = []

    def add(self, ref_logp: torch.Tensor, logits: np.ndarray, targets: torch.Tensor) -> None:
        logp = F.log_softmax(torch.from_numpy(logits[: len(targets)]).float(), -1)
        self.nll += float(-logp.gather(-1, targets[:, None]).sum())
        self.kls.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0).numpy())
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.n += len(targets)

    def result(self) -> dict:
        kl = np.concatenate(self.kls) if self.kls else np.zeros(1)
        return {"tokens": self.n, "perplexity": math.exp(self.nll / max(self.n, 1)), "kl_mean": float(kl.mean()),
                "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
                "top1_agreement": self.agree / max(self.n, 1)}


def heldout_sequences(tokenizer, paths: list[Path] | None, max_tokens: int, max_len: int) -> list[list[int]]:
    """Token ids of the held-out texts (chat template applied), each cut to ``max_len``, ``max_tokens`` in all."""
    from edgekit.distill.data import load_examples, render_text

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
        from edgekit.distill.data import apply_chat_template  # sandboxed; a hostile template is a ModelError

        text = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def fidelity(reference: Path, exports: list[Path], *, texts: list[Path] | None = None, max_tokens: int = 16_384,
             max_len: int = 512, greedy_tokens: int = GREEDY_TOKENS, threads: int | None = None) -> dict:
    """Score every export against the PyTorch fp32 ``reference`` HF folder on the same held-out tokens."""
    from transformers import AutoTokenizer

    from edgekit.integrity import check_model_path

    for p in exports:  # headers only: a corrupt or hostile export is refused before the reference model loads
        for f in sorted(Path(p).iterdir()) if Path(p).is_dir() else []:
            if f.suffix in (".gguf", ".onnx", ".pte"):
                check_model_path(f)
    tok = AutoTokenizer.from_pretrained(str(reference))
    seqs = heldout_sequences(tok, texts, max_tokens, max_len)
    prompt = greedy_prompt(tok)
    n_ctx = max(max_len, len(prompt) + greedy_tokens) + 16
    ref = torch_runner(reference, threads)
    runners = [open_export(Path(p), n_ctx, threads) for p in exports]
    tallies = {"reference": _Tally(), **{str(p): _Tally() for p in exports}}
    t0 = time.perf_counter()
    try:
        with bar(total=sum(map(len, seqs)), desc="fidelity", unit="tok") as progress:
            for ids in seqs:
                targets = torch.tensor(ids[1:])
                ref_logits = ref.logits(ids)
                ref_logp = F.log_softmax(torch.from_numpy(ref_logits[:-1]), -1)
                tallies["reference"].add(ref_logp, ref_logits, targets)
                for p, (runner, _) in zip(exports, runners):
                    tallies[str(p)].add(ref_logp, runner.logits(ids)[:-1], targets)
                progress.update(len(ids))
        ref_greedy = ref.greedy(prompt, greedy_tokens)
        rows = [{"label": "pytorch-fp32 (reference)", "format": "pytorch", "quant": "fp32", "path": str(reference),
                 "size_bytes": _folder_weight_bytes(Path(reference)), "bits_per_weight": 32.0,
                 **tallies["reference"].result(), "greedy_match": greedy_tokens}]
        for p, (runner, manifest) in zip(exports, runners):
            out = runner.greedy(prompt, greedy_tokens)
            same = next((i for i, (a, b) in enumerate(zip(out, ref_greedy)) if a != b), len(ref_greedy))
            metrics = manifest.get("metrics", {})
            rows.append({"label": manifest.get("label"), "format": manifest["format"], "quant": manifest["quant"],
                         "calibrated": manifest.get("calibrated", False), "path": str(p),
                         "artifact": Path(p).name, "size_bytes": metrics.get("size_bytes"),
                         "bits_per_weight": metrics.get("bits_per_weight"), **tallies[str(p)].result(),
                         "greedy_match": same, "greedy_text": tok.decode(out)})
    finally:
        for runner, _ in runners:
            runner.close()
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


def run(reference: Path, exports: list[Path], *, texts: list[Path] | None = None, max_tokens: int = 16_384,
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
