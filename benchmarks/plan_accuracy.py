"""How close is the planner? Predicted vs measured peak RSS and decode speed of the teacher on this host.

For each (quant, context), the embedded teacher's GGUF (requantized with llama.cpp's
own quantizer where needed) runs in llama.cpp in a fresh subprocess with a fixed
thread count:

  speed:  a 128-token prompt, then 128 greedy decode steps (decode tok/s = 128 / their time),
          repeated, median taken;
  memory: then a prompt filling the context (minus 64) and 64 more decode steps, the
          worst case the planner budgets for; peak RSS = the process's VmHWM.

Targets (issue #3): peak RSS within +-15 %, decode within +-30 %.

    python benchmarks/plan_accuracy.py [--quants q4_1 q8_0 ...] [--contexts 1024 2048] [--threads 2]
    python benchmarks/plan_accuracy.py --teacher gemma-3-270m --quants q4_k_m q8_0   # Gemma 3 (sliding window)

Prints a Markdown table and writes benchmarks/out/plan_accuracy.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "The history of computing is a story of machines getting smaller while doing more. Early computers filled "
    "rooms and consumed vast amounts of power, yet they could only perform a few thousand operations per second. "
    "Today a phone in a pocket runs language models that answer questions, translate text and write code. "
)


def child(args) -> None:
    """Runs in its own process: load, measure speed, then fill the context, print one JSON line."""
    import resource

    from edgekit.runtimes.llamacpp import last_logits, open_llama

    t0 = time.perf_counter()
    llm = open_llama(Path(args.gguf), n_ctx=args.context, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    words = llm.tokenize(TEXT.encode(), add_bos=False)
    tokens = (words * (args.context // len(words) + 2))

    def run(prompt_len: int, steps: int) -> tuple[float, float]:
        llm.reset()
        prompt = tokens[:prompt_len]
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t
        nxt = int(last_logits(llm).argmax())
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([nxt])
            nxt = int(last_logits(llm).argmax())
        return prompt_len / prefill, steps / (time.perf_counter() - t)

    run(32, 8)  # warm-up
    speeds = [run(128, 128) for _ in range(args.repeats)]
    run(args.context - 64, 64)  # the memory worst case
    hwm = None
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    print(json.dumps({
        "load_s": load_s,
        "prefill_tok_s": statistics.median(s[0] for s in speeds),
        "decode_tok_s": statistics.median(s[1] for s in speeds),
        "decode_tok_s_all": [s[1] for s in speeds],
        "peak_rss_bytes": hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def shipped_quant(gguf: Path) -> str:
    """The quant name of a GGUF's general.file_type (LLAMA_FTYPE_MOSTLY_*)."""
    import gguf as gguf_lib
    import llama_cpp

    ftype = gguf_lib.GGUFReader(str(gguf)).fields["general.file_type"].contents()
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_MOSTLY_") and getattr(llama_cpp, name) == ftype:
            return name[len("LLAMA_FTYPE_MOSTLY_"):].lower()
    return "?"


def quantize(src: Path, quant: str, out_dir: Path) -> Path:
    import llama_cpp

    if quant == shipped_quant(src):
        return src  # the shipped file
    out = out_dir / f"teacher-{quant}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp failed to quantize to {quant}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", nargs="+", default=["q4_1", "q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="default", help="default (SmolLM2-135M) or gemma-3-270m (a PyPI package)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/plan_accuracy[-TEACHER].json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    suffix = "" if args.teacher == "default" else f"-{args.teacher}"
    args.out = args.out or str(ROOT / "benchmarks" / "out" / f"plan_accuracy{suffix}.json")

    import llama_cpp

    from edgekit.arch import Architecture
    from edgekit.devices import detect_host
    from edgekit.models import resolve_teacher
    from edgekit.plan import memory_model, predict_speed
    from edgekit.quantize.schemes import get_scheme

    teacher = resolve_teacher(args.teacher)
    arch: Architecture = teacher.arch
    host = detect_host()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            gguf = quantize(teacher.gguf, quant, Path(tmp))
            scheme = get_scheme("gguf", quant)
            for ctx in args.contexts:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", "--gguf", str(gguf), "--context", str(ctx),
                     "--threads", str(args.threads), "--repeats", str(args.repeats)],
                    capture_output=True, text=True, check=False,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"measurement failed for {quant} ctx {ctx}:\n{proc.stderr[-2000:]}")
                measured = json.loads(proc.stdout.strip().splitlines()[-1])
                mem = memory_model(arch, scheme, ctx, "llama.cpp")
                speed = predict_speed(arch, scheme, host, "llama.cpp", ctx)
                rows.append({
                    "quant": quant, "context": ctx, "file_bytes": gguf.stat().st_size,
                    "predicted": {"peak_rss_bytes": mem.predicted_rss, **mem.to_dict(),
                                  "decode_tok_s": speed["predicted_decode_tok_s"],
                                  "prefill_tok_s": speed["predicted_prefill_tok_s"]},
                    "measured": measured,
                    "rss_error": mem.predicted_rss / measured["peak_rss_bytes"] - 1,
                    "decode_error": speed["predicted_decode_tok_s"] / measured["decode_tok_s"] - 1,
                    "prefill_error": speed["predicted_prefill_tok_s"] / measured["prefill_tok_s"] - 1,
                })
                r = rows[-1]
                print(f"  {quant:7} ctx {ctx:5}: RSS {mem.predicted_rss / 2**20:6.1f} MiB predicted vs "
                      f"{measured['peak_rss_bytes'] / 2**20:6.1f} measured ({r['rss_error']:+.1%}); decode "
                      f"{speed['predicted_decode_tok_s']:6.1f} vs {measured['decode_tok_s']:6.1f} tok/s "
                      f"({r['decode_error']:+.1%})", file=sys.stderr)
    result = {
        "benchmark": "plan_accuracy",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/plan_accuracy.py " + " ".join(sys.argv[1:]),
        "host": {"cpu": host.cpu.name, "threads_used": args.threads, "bandwidth_bytes_s": host.memory_bandwidth,
                 "fp32_flops": host.cpu.peak_fp32},
        "versions": {"llama_cpp_python": llama_cpp.__version__},
        "teacher": teacher.name,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| quant | context | file | predicted RSS | measured peak RSS | error | predicted decode | "
          "measured decode | error | predicted prefill | measured prefill (128 tok) | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p, m = r["predicted"], r["measured"]
        print(f"| {r['quant']} | {r['context']} | {r['file_bytes'] / 2**20:.1f} MiB | {p['peak_rss_bytes'] / 2**20:.1f} MiB | "
              f"{m['peak_rss_bytes'] / 2**20:.1f} MiB | {r['rss_error']:+.1%} | {p['decode_tok_s']:.1f} tok/s | "
              f"{m['decode_tok_s']:.1f} tok/s | {r['decode_error']:+.1%} | {p['prefill_tok_s']:.0f} tok/s | "
              f"{m['prefill_tok_s']:.0f} tok/s | {r['prefill_error']:+.1%} |")
    worst_rss = max(abs(r["rss_error"]) for r in rows)
    worst_dec = max(abs(r["decode_error"]) for r in rows)
    print(f"\nworst RSS error {worst_rss:.1%} (target 15%), worst decode error {worst_dec:.1%} (target 30%)")
    print(f"JSON: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
