"""The model in the browser against the same runtime native on the same machine: `web` bundles in headless Chromium.

Exports the model as GGUF (default q4_k_m with an importance matrix) and as ONNX (default int4), reusing earlier
exports, bundles each with the `web` layout and opens the bundle's own page (served by its serve.py, driven by
web/drive.mjs through puppeteer-core and Debian's Chromium) once per repeat and thread count: the GGUF in llama.cpp
compiled to WebAssembly (wllama), the ONNX model in transformers.js on onnxruntime-web's WebAssembly backend. The same
prompt then runs natively (llama-cpp-python; onnxruntime through edgekit's session) at the same thread counts. Per
row: load time (download into the tab + load), time to first token, prefill and decode tok/s (wllama's from
llama.cpp's own timings; transformers.js's from the page's clock: prefill = prompt / first token, decode = the
tokens after the first over the time after it), WebAssembly threads used, and whether SIMD and cross-origin isolation
(threads) were on. Median of --repeats. Prints a Markdown table and writes benchmarks/out/browser.json.

    python benchmarks/browser.py [--model default] [--formats gguf,onnx] [--quant q4_k_m] [--onnx-quant int4]
                                 [--threads 1,2] [--repeats 3] [--prompt-tokens 128] [--decode-tokens 64]

Needs `make web` (npm packages) and Chromium (apt install chromium).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.devices import cpu_name  # noqa: E402
from web import page  # noqa: E402


def _prompt(tokenize, n: int) -> str:
    """A held-out chat's text cut to about ``n`` tokens (the same text for both runtimes)."""
    text = (ROOT / "edgekit" / "resources" / "heldout.jsonl").read_text().splitlines()
    words = " ".join(json.loads(line).get("text") or " ".join(m["content"] for m in json.loads(line)["messages"])
                     for line in text[:20]).split()
    out = []
    for w in words:
        out.append(w)
        if len(tokenize(" ".join(out))) >= n:
            break
    return " ".join(out)


def native(model: Path, fmt: str, prompt: str, decode: int, threads: int, repeats: int) -> dict:
    """The same runtime natively on the same prompt: llama.cpp (llama-cpp-python) for a GGUF file, onnxruntime
    (edgekit's session, the export's own graph) for an ONNX folder; load, prefill and decode, medians."""
    from edgekit.runtimes.llamacpp import LlamaSession
    from edgekit.runtimes.onnxruntime import OrtSession

    t0 = time.perf_counter()
    s = LlamaSession(model, threads, context=1024) if fmt == "gguf" else OrtSession(model, threads, context=1024)
    load = time.perf_counter() - t0
    ids = s.llm.tokenize(prompt.encode(), add_bos=True, special=True) if fmt == "gguf" else s.tokenize(prompt)
    pre, dec, ttft = [], [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        s.prefill(ids)
        t1 = time.perf_counter()
        s.decode(decode)
        t2 = time.perf_counter()
        pre.append(len(ids) / (t1 - t0))
        dec.append(decode / (t2 - t1))
        ttft.append(1000 * (t1 - t0))
    s.close()
    return {"runtime": f"{'llama.cpp' if fmt == 'gguf' else 'onnxruntime'} (native)", "threads": threads,
            "load_ms": 1000 * load, "ttft_ms": statistics.median(ttft[1:]), "prefill_tok_s": statistics.median(pre[1:]),
            "decode_tok_s": statistics.median(dec[1:]), "prompt_tokens": len(ids), "simd": "native",
            "isolated": None}


def browser(bundle: Path, prompt: str, decode: int, threads: int, repeats: int, fmt: str = "gguf") -> dict:
    runs = [page.open_page(bundle, prompt, decode, threads=threads, ignore_eos=True) for _ in range(repeats)]
    t = [r["timings"] for r in runs]
    if fmt == "onnx":  # the page's own clock: no runtime-side timings in transformers.js
        for r in runs:
            r["timings"]["prompt_per_second"] = r["timings"]["prompt_n"] / (r["ttft_ms"] / 1000)
    return {"runtime": "wllama (chromium)" if fmt == "gguf" else "onnxruntime-web (chromium)",
            "threads": runs[0]["threads"], "multithread": runs[0]["multithread"],
            "load_ms": statistics.median(r["load_ms"] for r in runs),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
            "prefill_tok_s": statistics.median(x["prompt_per_second"] for x in t),
            "decode_tok_s": statistics.median(x["predicted_per_second"] for x in t),
            "prompt_tokens": t[0]["prompt_n"], "decoded": t[0]["predicted_n"], "simd": runs[0]["simd"],
            "isolated": runs[0]["cross_origin_isolated"], "browser": runs[0]["browser"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--formats", default="gguf,onnx")
    ap.add_argument("--quant", default="q4_k_m", help="the GGUF quant")
    ap.add_argument("--onnx-quant", default="int4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "browser.json"))
    args = ap.parse_args()
    if page.missing():
        sys.exit(f"benchmarks/browser.py needs {', '.join(page.missing())}")

    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.package import package
    from edgekit.package.web import WLLAMA_VERSION
    from edgekit.runtimes.llamacpp import open_llama
    from edgekit.runtimes.onnxruntime_web import TRANSFORMERS_JS_VERSION

    formats = args.formats.split(",")
    quants = {"gguf": args.quant, "onnx": args.onnx_quant}
    exports = {f: run(ExportConfig(model=args.model, format=f, quant=quants[f], calibrate=f == "gguf"))
               for f in formats}
    bundles = {fmt: Path(package(Path(e["path"]), layout="web", context=1024)["path"]) for fmt, e in exports.items()}
    gguf = Path(exports["gguf"]["path"]) / exports["gguf"]["manifest"]["model_file"] if "gguf" in exports else None
    if gguf is not None:  # the prompt: the same text for every runtime, ~prompt_tokens of the GGUF's tokenizer
        llm = open_llama(gguf, n_ctx=64)
        prompt = _prompt(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), args.prompt_tokens)
        llm.close()
    else:
        from edgekit.runtimes.onnxruntime import OrtSession

        s = OrtSession(Path(exports["onnx"]["path"]), 1)
        prompt = _prompt(s.tokenize, args.prompt_tokens)
        s.close()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:  # one at a time: nothing else on the CPU
        for fmt in formats:
            row = browser(bundles[fmt], prompt, args.decode_tokens, threads, args.repeats, fmt)
            rows.append({**row, "format": fmt})
            model = gguf if fmt == "gguf" else Path(exports["onnx"]["path"])
            rows.append({**native(model, fmt, prompt, args.decode_tokens, threads, args.repeats), "format": fmt})
    sizes = {f: sum(p.stat().st_size for p in bundles[f].rglob("model*")) / 1e6 for f in formats}
    print(f"\n{args.model}: " + "; ".join(f"{e['manifest']['label']} {sizes[f]:.1f} MB" for f, e in exports.items())
          + f"; {rows[0]['prompt_tokens']}-token prompt, {args.decode_tokens} decoded; {cpu_name()}; "
          f"{rows[0].get('browser')}, @wllama/wllama {WLLAMA_VERSION}, @huggingface/transformers "
          f"{TRANSFORMERS_JS_VERSION}\n")
    print("| runtime | format | threads | load | first token | prefill tok/s | decode tok/s | SIMD | isolated "
          "(threads) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['format']} | {r['threads']} | {r['load_ms'] / 1000:.2f} s | "
              f"{r['ttft_ms']:.0f} ms | "
              f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['simd']} | "
              f"{'-' if r['isolated'] is None else r['isolated']} |")
    for t in sorted({r["threads"] for r in rows}):
        for fmt in formats:
            b = next((r for r in rows if r["threads"] == t and r["format"] == fmt and "chromium" in r["runtime"]), None)
            n = next((r for r in rows if r["threads"] == t and r["format"] == fmt and "native" in r["runtime"]), None)
            if b and n:
                print(f"- {fmt}, {t} thread(s): {b['runtime']} decode {b['decode_tok_s'] / n['decode_tok_s']:.2f}x "
                      f"native, prefill {b['prefill_tok_s'] / n['prefill_tok_s']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "command": " ".join(sys.argv),
                               "exports": {f: e["path"] for f, e in exports.items()}, "rows": rows}, indent=2) + "\n")

if __name__ == "__main__":
    main()
