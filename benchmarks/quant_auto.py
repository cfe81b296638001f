"""Does `quant: auto` beat llama.cpp's fixed mixes at the same size? GGUF exports of real models, scored by llama.cpp.

For each model and each fixed llama.cpp mix (with an importance matrix, as a careful user would make it), the
export stage makes that mix and then `quant: auto` with the fixed file's own bits per weight as its target, so
each pair has the same size (auto's is at most the fixed one's); with `--below 0.15`, one more auto file
15 % smaller than q4_k_m is set against q4_k_m. Likewise ONNX: calibrated int4 (AWQ + GPTQ,
the _M rule's 8-bit matrices) against onnx auto (the same 4-bit rounding, 8-bit matrices chosen by
measurement); and ExecuTorch: calibrated 8da4w (the _M rule's 8da8w linears) against executorch auto. For
those two, auto's target is its default, the reference scheme's own tensor bytes (their files also hold a graph
and packing that auto does not count, so the file's bits per weight would overstate the budget). The fidelity stage (edgekit.quantize.report) scores every file in its runtime (llama.cpp,
onnxruntime) against the PyTorch float model on the bundled held-out chats: mean KL, top-1 agreement,
perplexity.

    python benchmarks/quant_auto.py [--model default] [--model gemma-3-270m] [--schemes q4_0,q4_k_s,q4_k_m]
                                    [--onnx int4] [--executorch 8da4w] [--below 0.15] [--max-tokens 16384]
                                    [--threads 2]

A model is anything `edgekit teacher` resolves (the embedded default, a .gguf, an HF folder). Prints one
Markdown table per model and writes benchmarks/out/quant_auto.json. The target: at every size, auto's KL is
below the fixed mix's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgekit.devices import cpu_name
from edgekit.quantize.config import FidelityConfig

ROOT = Path(__file__).resolve().parent.parent




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a teacher spec (repeatable; default: the embedded teacher)")
    ap.add_argument("--schemes", default="q4_0,q4_k_s,q4_k_m", help="fixed llama.cpp mixes to pair with auto")
    ap.add_argument("--onnx", default="int4", help="fixed ONNX schemes to pair with onnx auto ('' for none)")
    ap.add_argument("--executorch", default="8da4w", help="fixed ExecuTorch schemes to pair with executorch auto "
                                                          "('' for none)")
    ap.add_argument("--below", type=float, default=0.15,
                    help="also auto at this fraction below q4_k_m's size, against q4_k_m (0 for none)")
    ap.add_argument("--max-tokens", type=int, default=FidelityConfig().max_tokens, help="held-out tokens scored")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "quant_auto.json"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.models import resolve_teacher
    from edgekit.quantize import report

    t0 = time.perf_counter()
    results = []
    for spec in args.model or ["default"]:
        model = resolve_teacher(spec)
        pairs, exports, seconds = [], [], {}
        jobs = [(fmt, q) for fmt, qs in (("gguf", args.schemes), ("onnx", args.onnx), ("executorch", args.executorch))
                for q in qs.split(",") if q]
        for fmt, quant in jobs:
            fixed = run(ExportConfig(model=spec, format=fmt, quant=quant, calibrate=True, threads=args.threads))
            bpw = fixed["manifest"]["metrics"]["bits_per_weight"]
            if fmt == "gguf":  # a GGUF file is its tensors: its bits per weight is auto's target, rounded down
                target = f"{int(bpw * 1000) / 1000:.3f}bpw"
            else:
                # ONNX and .pte files hold more than the tensors auto counts (graph, packing), so their file bits per
                # weight would overstate the budget; auto's default target is the reference scheme's own tensor bytes
                target = None
            mixed = run(ExportConfig(model=spec, format=fmt, quant="auto", target=target, threads=args.threads))
            for a in (fixed, mixed):
                exports.append(Path(a["path"]))
                seconds[a["manifest"]["label"]] = a["manifest"]["metrics"].get("seconds")
            pairs.append((fixed["manifest"]["label"], mixed["manifest"]["label"], target,
                          mixed["manifest"]["metrics"]["auto"]))
            if fmt == "gguf" and quant == "q4_k_m" and args.below > 0:  # a smaller file that should lose nothing
                target = f"{int(bpw * (1 - args.below) * 1000) / 1000:.3f}bpw"
                smaller = run(ExportConfig(model=spec, format=fmt, quant="auto", target=target, threads=args.threads))
                exports.append(Path(smaller["path"]))
                seconds[smaller["manifest"]["label"]] = smaller["manifest"]["metrics"].get("seconds")
                pairs.append((fixed["manifest"]["label"], smaller["manifest"]["label"], target,
                              smaller["manifest"]["metrics"]["auto"]))
        rep = report.run(model.path, exports, max_tokens=args.max_tokens, threads=args.threads)
        rows = {r["label"]: r for r in rep["rows"]}
        table = []
        for fixed_label, auto_label, target, mix in pairs:
            f, a = rows[fixed_label], rows[auto_label]
            table.append({"fixed": fixed_label, "auto": auto_label, "target": target, "types": mix["types"],
                          "predicted_kl": mix["predicted_kl"],
                          **{f"{k}_{side}": r[k] for side, r in (("fixed", f), ("auto", a))
                             for k in ("size_bytes", "bits_per_weight", "kl_mean", "top1_agreement", "perplexity")
                             if k in r},
                          "auto_better": a["kl_mean"] < f["kl_mean"]})
        results.append({"model": spec, "name": model.name, "pairs": table, "report": rep, "export_seconds": seconds})
        print(f"\n### {model.name}\n")
        print("| fixed mix (calibrated) | bpw | KL | top-1 | auto | bpw | KL | top-1 | KL change |\n"
              "|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for t in table:
            change = 100 * (t["kl_mean_auto"] / t["kl_mean_fixed"] - 1)
            print(f"| {t['fixed']} | {t['bits_per_weight_fixed']:.2f} | {t['kl_mean_fixed']:.4f} | "
                  f"{100 * t['top1_agreement_fixed']:.1f}% | {t['auto']} | {t['bits_per_weight_auto']:.2f} | "
                  f"{t['kl_mean_auto']:.4f} | {100 * t['top1_agreement_auto']:.1f}% | {change:+.0f}% |")
        for t in table:
            print(f"- {t['auto']}: {', '.join(f'{n} {k}' for k, n in t['types'].items())}")
    met = all(t["auto_better"] for r in results for t in r["pairs"])
    print(f"\ntarget (auto's KL below the fixed mix's in every pair, the smaller auto file included): "
          f"{'met' if met else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "command": " ".join(sys.argv),
                               "results": results, "target_met": met,
                               "wall_s": round(time.perf_counter() - t0, 1)}, indent=2, default=str) + "\n")
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
