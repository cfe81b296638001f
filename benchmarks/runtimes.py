"""Every runtime side by side: the embedded teacher's exports measured on each installed runtime.

Exports SmolLM2-135M-Instruct (reusing earlier exports) as GGUF f16 / q8_0 / q4_k_m, ONNX fp32 / int8 / int4 and
ExecuTorch fp32 / 8da4w, then runs edgekit.bench.measure.run_benchmark: each (export, runtime) in its own
subprocess with a fixed thread count -- llama.cpp for GGUF, our onnxruntime loop and onnxruntime-genai for ONNX,
ExecuTorch's runtime for .pte, PyTorch eager as the reference -- load time, time to first token at prompts of 128 and 512 tokens, prefill and decode tok/s (128
tokens), peak RSS, after a warm-up, median and spread of --repeats runs. Quality columns join in from the
fidelity report of benchmarks/quant_fidelity.py when it exists. Writes results.json, report.md and
report.html (plots, projections to every device profile) to benchmarks/out/runtimes/, renders a PNG of the
HTML with a headless browser when one is installed, and checks the issue #6 targets:

  llama.cpp decode >= 60 % of the host's bandwidth roofline;
  our ONNX int4 decode >= 0.8x llama.cpp q4_k_m decode on the same model.

    python benchmarks/runtimes.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPORTS = [("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_k_m"), ("onnx", "fp32"), ("onnx", "int8"), ("onnx", "int4"),
           ("executorch", "fp32"), ("executorch", "8da4w")]
# What this comparison measures (longer than `edgekit bench`'s defaults, which a recipe's quick bench uses).
PROMPT_LENGTHS = (128, 512)
DECODE_TOKENS = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--fidelity", default=str(ROOT / "benchmarks" / "out" / "quant_fidelity.json"),
                    help="quant_fidelity.py output to join quality from")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "runtimes"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("gguf", "transformers", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from edgekit.bench.measure import run_benchmark
    from edgekit.bench.project import roofline_fraction
    from edgekit.bench.report import write_report
    from edgekit.devices import list_devices
    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.models import resolve_teacher

    t0 = time.perf_counter()
    teacher = resolve_teacher("default")
    paths = [Path(run(ExportConfig(model="default", format=f, quant=q))["path"]) for f, q in EXPORTS]
    results = run_benchmark(paths, None, repeats=args.repeats, warmup=1, threads=args.threads,
                            prompt_lengths=PROMPT_LENGTHS, decode_tokens=DECODE_TOKENS)
    fidelity = []
    fpath = Path(args.fidelity)
    if fpath.is_file():
        fidelity = [json.loads(fpath.read_text())["report"]]
    else:
        print(f"no fidelity report at {fpath}: quality columns stay empty (run quant_fidelity.py first)",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_report(results, out, fidelity, devices=list_devices(), arch=teacher.arch,
                           title="SmolLM2-135M-Instruct on every runtime")
    print(written["markdown"].read_text())

    ok = [r for r in results["runs"] if r["status"] == "ok"]
    decode = {(r["label"], r["runtime"]): r["metrics"]["decode_tok_s"]["median"] for r in ok}
    print("| target | measured | met |\n|---|---:|---|")
    checks = []
    for r in ok:
        if r["runtime"] == "llama.cpp":
            frac = roofline_fraction(r, results["host"], teacher.arch)
            checks.append({"target": f"{r['label']} llama.cpp decode >= 60 % of bandwidth roofline",
                           "value": frac, "met": frac >= 0.60})
    q4 = decode.get(("gguf-q4_k_m", "llama.cpp"))
    for runtime in ("onnxruntime", "onnxruntime-genai"):
        mine = decode.get(("onnx-int4", runtime))
        if q4 and mine:
            checks.append({"target": f"onnx-int4 on {runtime} >= 0.8x llama.cpp q4_k_m decode",
                           "value": mine / q4, "met": mine / q4 >= 0.8})
    for c in checks:
        print(f"| {c['target']} | {c['value']:.2f} | {'yes' if c['met'] else 'NO'} |")

    png = None
    try:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "screenshot.py"), str(written["html"])],
                       check=True, timeout=180)
        png = written["html"].with_suffix(".png")
    except (subprocess.SubprocessError, OSError) as e:
        print(f"no screenshot: {e}", file=sys.stderr)
    summary = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "checks": checks,
               "files": {k: str(v) for k, v in written.items()}, "png": str(png) if png else None,
               "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
