"""Where does decode time go? llama.cpp's fixed cost per token, and onnxruntime int4's time per operator.

1. llama.cpp: fits  seconds/token = fixed + bytes read per token / effective bandwidth  over the GGUF rows of
   benchmarks/out/runtimes/results.json (f16, q8_0, q4_k_m of the same model: only the bytes differ), so the
   per-token cost that does not scale with the weights (graph build, thread barriers of 2 threads x ~300 ops,
   logits copy) is separated from the bandwidth-bound part.
2. onnxruntime: runs the int4 export with onnxruntime's own profiler (SessionOptions.enable_profiling) for a
   128-token prompt and --tokens decode steps, and sums kernel time per operator type over the decode steps,
   next to the wall time of session.run (the rest: feeding inputs, allocating outputs, the KV-cache copy).

    python benchmarks/profile_decode.py [--tokens 64] [--threads 2]

Prints two tables and writes benchmarks/out/profile_decode.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def llama_cpp_fit(results: dict, arch) -> dict:
    from edgekit.bench.project import bytes_per_token

    rows = [r for r in results["runs"] if r["runtime"] == "llama.cpp" and r["status"] == "ok"]
    x = np.array([bytes_per_token(r, arch) for r in rows], dtype=float)
    y = np.array([1 / r["metrics"]["decode_tok_s"]["median"] for r in rows])
    slope, fixed = np.polyfit(x, y, 1)
    out = {"fixed_ms": 1e3 * fixed, "effective_bandwidth_gb_s": 1e-9 / slope,
           "host_bandwidth_gb_s": results["host"]["memory_bandwidth_bytes_s"] / 1e9, "rows": []}
    for r, b, t in zip(rows, x, y):
        out["rows"].append({"label": r["label"], "bytes_per_token_mb": b / 1e6, "ms_per_token": 1e3 * t,
                            "fixed_share": fixed / t, "roofline_ms": 1e3 * b / results["host"]["memory_bandwidth_bytes_s"]})
    return out


def ort_profile(folder: Path, tokens: int, threads: int) -> dict:
    import onnxruntime as ort

    from edgekit.runtimes.onnxruntime import OrtSession

    lm = OrtSession(folder, threads=threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(ROOT / "benchmarks" / "out" / "ort_profile")
    lm.session = ort.InferenceSession(str(lm.path), options, providers=["CPUExecutionProvider"])
    ids = list(range(1000, 1128))
    logits, past = lm.forward(ids)
    tok, pos = int(logits[-1].argmax()), len(ids)
    lm.forward([tok], past, pos)  # warm-up step
    mark = time.perf_counter()
    walls = []
    for _ in range(tokens):
        t = time.perf_counter()
        logits, past = lm.forward([tok], past, pos)
        walls.append(time.perf_counter() - t)
        tok, pos = int(logits[-1].argmax()), pos + 1
    profile = Path(lm.session.end_profiling())
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-tokens:]  # the measured decode steps
    start = min(e["ts"] for e in last)
    per_op = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= start and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"]
    kernel_us = sum(per_op.values())
    run_us = sum(e["dur"] for e in last)
    wall = sum(walls)
    del mark
    profile.unlink()
    return {"tokens": tokens, "wall_ms_per_token": 1e3 * wall / tokens, "run_ms_per_token": run_us / 1e3 / tokens,
            "kernel_ms_per_token": kernel_us / 1e3 / tokens,
            "ops": sorted(({"op": k, "ms_per_token": v / 1e3 / tokens, "share_of_wall": v / 1e6 / wall}
                           for k, v in per_op.items()), key=lambda o: -o["ms_per_token"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "out" / "runtimes" / "results.json"))
    args = ap.parse_args()

    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.models import resolve_teacher

    arch = resolve_teacher("default").arch
    results = json.loads(Path(args.results).read_text())
    fit = llama_cpp_fit(results, arch)
    print(f"llama.cpp decode: {fit['fixed_ms']:.2f} ms fixed per token + bytes at "
          f"{fit['effective_bandwidth_gb_s']:.1f} GB/s (host measured {fit['host_bandwidth_gb_s']:.1f} GB/s)\n")
    print("| export | MB read/token | ms/token | roofline ms | fixed share |\n|---|---:|---:|---:|---:|")
    for r in fit["rows"]:
        print(f"| {r['label']} | {r['bytes_per_token_mb']:.0f} | {r['ms_per_token']:.2f} | {r['roofline_ms']:.2f} | "
              f"{100 * r['fixed_share']:.0f}% |")

    folder = Path(run(ExportConfig(model="default", format="onnx", quant="int4"))["path"])
    prof = ort_profile(folder, args.tokens, args.threads)
    print(f"\nonnxruntime int4 decode: {prof['wall_ms_per_token']:.2f} ms/token wall, "
          f"{prof['run_ms_per_token']:.2f} inside session.run, {prof['kernel_ms_per_token']:.2f} in kernels\n")
    print("| operator | ms/token | share of wall |\n|---|---:|---:|")
    for o in prof["ops"][:12]:
        print(f"| {o['op']} | {o['ms_per_token']:.3f} | {100 * o['share_of_wall']:.1f}% |")
    out = ROOT / "benchmarks" / "out" / "profile_decode.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                               "llama_cpp": fit, "onnxruntime_int4": prof}, indent=2) + "\n")


if __name__ == "__main__":
    main()
