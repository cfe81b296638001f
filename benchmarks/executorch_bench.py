"""ExecuTorch beside llama.cpp and onnxruntime: the embedded teacher's fidelity and speed in one run.

Exports SmolLM2-135M-Instruct (reusing earlier exports) to ExecuTorch fp32 / 8da8w / 8da4w / 8da4w calibrated (XNNPACK,
static KV cache of --context positions), GGUF q4_k_m and ONNX int4, then

1. fidelity (edgekit.quantize.report) of every export against PyTorch fp32 on --max-tokens held-out
   tokens: perplexity, mean KL, top-1 agreement, 64-token greedy parity;
2. speed (edgekit.bench.measure.run_benchmark): each (export, runtime) in its own subprocess on
   --threads threads; load, time to first token, prefill and decode tok/s, peak RSS; median of
   --repeats runs after a warm-up;

prints both tables and checks the issue #8 targets:

  ExecuTorch 4-bit (8da4w) mean KL vs PyTorch <= 0.10;
  ExecuTorch 8da4w decode >= 0.8x llama.cpp q4_k_m decode on this host.

Writes benchmarks/out/executorch/{fidelity.json, fidelity.md, results.json, report.md, report.html, summary.json}.

    python benchmarks/executorch_bench.py [--repeats 5] [--threads 2] [--max-tokens 16384] [--context 2048]
                                          [--et-quants fp32,8da8w,8da4w,8da4w-calibrated]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgekit.arch import DEFAULT_CONTEXT
from edgekit.quantize.config import FidelityConfig

ROOT = Path(__file__).resolve().parent.parent
ET_QUANTS = "fp32,8da8w,8da4w,8da4w-calibrated"
OTHERS = [("gguf", "q4_k_m"), ("onnx", "int4")]
# What this comparison measures (longer than `edgekit bench`'s defaults, which a recipe's quick bench uses).
PROMPT_LENGTHS = (128, 512)
DECODE_TOKENS = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=FidelityConfig().max_tokens,
                    help="held-out tokens scored for fidelity")
    ap.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="ExecuTorch static KV cache positions")
    ap.add_argument("--et-quants", default=ET_QUANTS, help=f"ExecuTorch exports to make (default {ET_QUANTS})")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "executorch"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("gguf", "transformers", "onnxruntime", "torch", "executorch", "torchao"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from edgekit.bench.measure import run_benchmark
    from edgekit.bench.report import write_report
    from edgekit.devices import list_devices
    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.models import resolve_teacher
    from edgekit.quantize import report as fidelity_report

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_teacher("default")
    paths, export_s = [], {}
    exports = [("executorch", q) for q in args.et_quants.split(",") if q] + OTHERS
    for fmt, quant in exports:
        t = time.perf_counter()
        calibrate = quant.endswith("-calibrated")
        quant = quant.removesuffix("-calibrated")
        r = run(ExportConfig(model="default", format=fmt, quant=quant, calibrate=calibrate,
                             context=args.context if fmt == "executorch" else None))
        paths.append(Path(r["path"]))
        export_s[f"{fmt}-{quant}"] = r["manifest"]["metrics"].get("seconds") if not r["reused"] else "reused"
        print(f"{fmt}-{quant}: {r['path']} ({'reused' if r['reused'] else f'{time.perf_counter() - t:.0f}s'})",
              file=sys.stderr)

    fid = None
    if not args.skip_fidelity:
        fid = fidelity_report.run(teacher.path, paths, max_tokens=args.max_tokens, threads=args.threads)
        (out / "fidelity.json").write_text(json.dumps(fid, indent=2, default=str) + "\n")
        (out / "fidelity.md").write_text(fidelity_report.to_markdown(fid))
        print(fidelity_report.to_markdown(fid))

    results = run_benchmark(paths, None, repeats=args.repeats, warmup=1, threads=args.threads,
                            prompt_lengths=PROMPT_LENGTHS, decode_tokens=DECODE_TOKENS)
    written = write_report(results, out, [fid] if fid else [], devices=list_devices(), arch=teacher.arch,
                           title="SmolLM2-135M-Instruct: ExecuTorch beside llama.cpp and onnxruntime")
    print(written["markdown"].read_text())

    ok = [r for r in results["runs"] if r["status"] == "ok"]
    decode = {(r["label"], r["runtime"]): r["metrics"]["decode_tok_s"]["median"] for r in ok}
    checks = []
    if fid:
        for r in fid["rows"]:
            if str(r.get("label")).startswith("executorch-8da4w"):
                checks.append({"target": f"{r['label']} mean KL vs PyTorch <= 0.10", "value": r["kl_mean"],
                               "met": r["kl_mean"] <= 0.10})
    q4 = decode.get(("gguf-q4_k_m", "llama.cpp"))
    for (label, runtime), mine in decode.items():
        if q4 and label.startswith("executorch-8da4w"):
            checks.append({"target": f"{label} decode >= 0.8x llama.cpp q4_k_m decode", "value": mine / q4,
                           "met": mine / q4 >= 0.8})
    print("| target | measured | met |\n|---|---:|---|")
    for c in checks:
        print(f"| {c['target']} | {c['value']:.3f} | {'yes' if c['met'] else 'NO'} |")
    summary = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "checks": checks,
               "export_seconds": export_s, "decode_tok_s": {f"{k[0]} on {k[1]}": v for k, v in decode.items()},
               "files": {k: str(v) for k, v in written.items()}, "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
