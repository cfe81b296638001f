"""What does each quantization cost? Every GGUF and ONNX export of the embedded teacher, scored against PyTorch.

Exports SmolLM2-135M-Instruct through the real stages (edgekit.export.pipeline):
  GGUF  f16, q8_0, q4_0, q4_1, q5_k_m, q4_k_m (llama.cpp's quantizer) and q4_k_m with an importance matrix
  ONNX  fp32, int8 (dynamic), int4 (MatMulNBits block 32 and 128, RTN) and calibrated (activation-aware) int4
then runs the fidelity stage (edgekit.quantize.report) on the bundled held-out chats: perplexity, mean/p99 KL
and top-1 agreement against the PyTorch fp32 model, file size, bits per weight, and a 64-token greedy
generation compared token by token.

    python benchmarks/quant_fidelity.py [--max-tokens 16384] [--threads 2] [--model default|FOLDER]

Prints Markdown, checks the targets of issue #5, writes benchmarks/out/quant_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgekit.quantize.config import FidelityConfig

ROOT = Path(__file__).resolve().parent.parent

GGUF = ["f16", "q8_0", "q4_0", "q4_1", "q5_k_m", "q4_k_m"]
ONNX = ["fp32", "int8", "int4", "int4-b128"]
TARGETS = {  # label prefix -> (max mean KL, min top-1)
    "8-bit": (0.01, 0.97),
    "4-bit": (0.10, 0.85),
}


def _class(row: dict) -> str | None:
    q = row["quant"]
    if q in ("q8_0", "int8"):
        return "8-bit"
    if q.startswith(("q4", "int4")):
        return "4-bit"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=FidelityConfig().max_tokens, help="held-out tokens scored")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--model", default="default",
                    help="model to export (default: the embedded teacher; e.g. a distilled student's folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "quant_fidelity.json"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.models import resolve_teacher
    from edgekit.quantize import report

    t0 = time.perf_counter()
    jobs = [{"format": "gguf", "quant": q} for q in GGUF] + [{"format": "gguf", "quant": "q4_k_m", "calibrate": True}]
    if not args.skip_onnx:
        jobs += [{"format": "onnx", "quant": q} for q in ONNX] + [{"format": "onnx", "quant": "int4", "calibrate": True}]
    exports, timings = [], {}
    for job in jobs:
        cfg = ExportConfig.model_validate({"model": args.model, "threads": args.threads, **job})
        r = run(cfg)
        exports.append(Path(r["path"]))
        timings[cfg.label] = r["manifest"]["metrics"].get("seconds")
        print(f"{cfg.label:<28} {r['path']} ({'reused' if r['reused'] else 'built'})", file=sys.stderr)

    model = resolve_teacher(args.model)
    rep = report.run(model.path, exports, max_tokens=args.max_tokens, threads=args.threads)
    md = report.to_markdown(rep)
    print(md)

    checks = []
    for row in rep["rows"]:
        cls = _class(row)
        if cls:
            kl_max, top1_min = TARGETS[cls]
            ok = row["kl_mean"] <= kl_max and row["top1_agreement"] >= top1_min
            checks.append({"label": row["label"], "class": cls, "kl_mean": row["kl_mean"],
                           "top1": row["top1_agreement"], "target": f"KL <= {kl_max}, top-1 >= {top1_min:.0%}",
                           "met": ok})
    by_label = {r["label"]: r for r in rep["rows"]}
    calib = []
    for plain, cal in (("gguf-q4_k_m", "gguf-q4_k_m-calibrated"), ("onnx-int4", "onnx-int4-calibrated")):
        if plain in by_label and cal in by_label:
            a, b = by_label[plain], by_label[cal]
            calib.append({"plain": plain, "calibrated": cal, "kl_plain": a["kl_mean"], "kl_calibrated": b["kl_mean"],
                          "kl_reduction_pct": 100 * (1 - b["kl_mean"] / a["kl_mean"]),
                          "top1_plain": a["top1_agreement"], "top1_calibrated": b["top1_agreement"],
                          "better": b["kl_mean"] < a["kl_mean"]})
    print("| export | target | mean KL | top-1 | met |\n|---|---|---:|---:|---|")
    for c in checks:
        print(f"| {c['label']} | {c['target']} | {c['kl_mean']:.4f} | {100 * c['top1']:.1f}% | "
              f"{'yes' if c['met'] else 'NO'} |")
    print("\n| plain | calibrated | KL plain | KL calibrated | KL change | top-1 plain | top-1 calibrated |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for c in calib:
        print(f"| {c['plain']} | {c['calibrated']} | {c['kl_plain']:.4f} | {c['kl_calibrated']:.4f} | "
              f"{-c['kl_reduction_pct']:+.1f}% | {100 * c['top1_plain']:.1f}% | {100 * c['top1_calibrated']:.1f}% |")
    print(f"\nreference greedy: {rep['reference_greedy']!r}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                               "export_seconds": timings, "report": rep, "targets": checks, "calibration": calib,
                               "wall_s": round(time.perf_counter() - t0, 1)}, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
