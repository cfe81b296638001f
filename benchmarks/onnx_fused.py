"""The fused ONNX graph against onnxruntime-genai's own model builder and llama.cpp, side by side in one run.

For each ``--model`` (default: the embedded teacher; a teacher spec or a student folder) this exports,
through edgekit's export stage, GGUF q4_k_m and ONNX int4, plain and calibrated (``--calibrate``: AWQ +
GPTQ), both edgekit's fused graph, and -- when ``--builder-python`` names a Python that can run
``onnxruntime_genai.models.builder`` (it needs transformers 5, so it lives in its own environment) --
the builder's own int4 graph of the same HF folder (``-p int4 -e cpu``). Then:

- speed: each (folder, runtime) in its own ``edgekit.bench.worker`` subprocess (2 threads by default): prefill
  tok/s at a 128-token prompt, decode tok/s over 128 greedy tokens after it, peak RSS; ``--rounds`` rounds that
  visit the rows in turn (so drift on a shared host hits every row alike), ``--repeats`` runs per visit, median
  over all;
- quality: mean KL and top-1 agreement against PyTorch fp32 on edgekit's held-out chats (answer tokens), the
  same tokens for every row;
- the graphs: node counts and the ops that do the work.

    python benchmarks/onnx_fused.py [--model default --model FOLDER ...] [--builder-python PYTHON] [--threads 2]

Prints a Markdown table per model and writes benchmarks/out/onnx_fused.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "onnx_fused"
EXPORTS = [("gguf", "q4_k_m", False), ("onnx", "int4", False), ("onnx", "int4", True)]  # (format, quant, calibrate)


def _builder(python: str, model: Path, out: Path) -> tuple[Path, float]:
    """onnxruntime-genai's builder int4 CPU graph of ``model`` (in ``out``) and the seconds it took; RuntimeError
    with the builder's last error line when it fails. transformers 5 refuses a tokenizer_config with
    ``add_prefix_space: null``, so the builder reads a copy without null entries (the bundles issue fixes the
    files themselves)."""
    folder = out / "builder-int4"
    if (folder / "genai_config.json").is_file():
        return folder, 0.0
    src = out / "builder-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(model, src)
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    t = time.perf_counter()
    done = subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(folder), "-p",
                           "int4", "-e", "cpu", "-c", str(out / "builder-cache")], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    # the export-artifact manifest edgekit's bench worker reads to know the folder's format
    (folder / "manifest.json").write_text(json.dumps({
        "stage": "export", "format": "onnx", "quant": "int4", "label": "builder-int4", "files": {},
        "config": {"model_path": str(model)}, "tool": "onnxruntime_genai.models.builder -p int4 -e cpu"}))
    return folder, seconds


def _graph(folder: Path) -> dict:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    return {"nodes": sum(ops.values()), "ops": dict(ops.most_common(6))}


def _measure(folder: Path, runtime: str, threads: int, repeats: int) -> dict:
    spec = {"artifact": str(folder), "runtime": runtime, "threads": threads, "repeats": repeats, "warmup": 1,
            "prompt_lengths": [128], "decode_tokens": 128, "decode_prompt_tokens": 128}
    out = subprocess.run([sys.executable, "-m", "edgekit.bench.worker", "--spec", "-"], input=json.dumps(spec),
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["status"] != "ok":
        raise SystemExit(f"{folder} on {runtime}: {result['reason']}")
    return result


def _quality(reference: Path, rows: list[dict], max_tokens: int, threads: int) -> None:
    """Mean KL and top-1 of each row's folder against PyTorch fp32, on the held-out answer tokens."""
    from transformers import AutoTokenizer

    from edgekit import metrics, runtimes
    from edgekit.quantize.report import heldout_scored

    tok = AutoTokenizer.from_pretrained(str(reference))
    seqs = heldout_scored(tok, None, max_tokens, 512)
    ref = runtimes.get_runtime("pytorch").session(reference, threads)
    folders = {r["folder"]: r for r in rows}
    sessions = {}
    for folder, r in folders.items():
        name = "llama.cpp" if r["format"] == "gguf" else "onnxruntime"
        sessions[folder] = runtimes.get_runtime(name).session(Path(folder), threads, context=600,
                                                                 all_logits=True)
    tallies = {f: metrics.Tally() for f in folders}
    for ids, scored in seqs:
        ref_logits = ref.logits(ids)
        ref_logp = metrics.log_softmax(ref_logits[:-1])
        for f, s in sessions.items():
            tallies[f].add(ref_logp, s.logits(ids)[:-1], ids[1:], scored)
    for r in rows:  # a folder measured on two runtimes is scored once
        q = tallies[r["folder"]].result()
        r.update(kl=q["kl_mean"], top1=q["top1_agreement"], tokens=q["tokens"])
    for s in sessions.values():
        s.close()
    ref.close()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".gguf", ".onnx", ".data"))


def bench_model(model: str, args) -> dict:
    from edgekit.export.pipeline import ExportConfig, run
    from edgekit.models import resolve_teacher

    hf = Path(resolve_teacher(model).path)
    out = OUT / hf.name
    out.mkdir(parents=True, exist_ok=True)
    paths = {f"{f}-{q}{'-cal' if c else ''}": Path(run(ExportConfig(model=model, format=f, quant=q,
                                                                    calibrate=c))["path"]) for f, q, c in EXPORTS}
    rows = [{"label": "llama.cpp q4_k_m", "folder": str(paths["gguf-q4_k_m"]), "format": "gguf",
             "runtime": "llama.cpp"},
            {"label": "edgekit int4 (fused)", "folder": str(paths["onnx-int4"]), "format": "onnx",
             "runtime": "onnxruntime-genai"},
            {"label": "edgekit int4 (fused)", "folder": str(paths["onnx-int4"]), "format": "onnx",
             "runtime": "onnxruntime"},
            {"label": "edgekit int4 calibrated (AWQ + GPTQ)", "folder": str(paths["onnx-int4-cal"]), "format": "onnx",
             "runtime": "onnxruntime-genai"}]
    builder_s = builder_error = None
    if args.builder_python:
        try:
            folder, builder_s = _builder(args.builder_python, hf, out)
            rows.append({"label": "onnxruntime-genai builder int4", "folder": str(folder), "format": "onnx",
                         "runtime": "onnxruntime-genai"})
        except RuntimeError as e:  # reported beside the table: the builder cannot build this model
            builder_error = str(e)
    for r in rows:
        r["size_bytes"] = _size(Path(r["folder"]))
        if r["format"] == "onnx":
            r["graph"] = _graph(Path(r["folder"]))
    runs = {i: [] for i in range(len(rows))}
    for rnd in range(args.rounds):
        for i, r in enumerate(rows):
            runs[i].append(_measure(Path(r["folder"]), r["runtime"], args.threads, args.repeats))
            print(f"  {hf.name} round {rnd + 1}: {r['label']} on {r['runtime']}: "
                  f"{statistics.median(runs[i][-1]['decode_tok_s']):.1f} tok/s", file=sys.stderr, flush=True)
    for i, r in enumerate(rows):
        decode = [v for m in runs[i] for v in m["decode_tok_s"]]
        prefill = [v for m in runs[i] for v in m["prefill_tok_s"]["128"]]
        r.update(decode_tok_s=statistics.median(decode), decode_min=min(decode), decode_max=max(decode),
                 prefill_tok_s=statistics.median(prefill), peak_rss_bytes=max(m["peak_rss_bytes"] for m in runs[i]),
                 version=runs[i][0]["version"])
    _quality(hf, rows, args.max_tokens, args.threads)
    llama = rows[0]
    for r in rows:
        r["decode_vs_llamacpp"] = r["decode_tok_s"] / llama["decode_tok_s"]
        r["rss_vs_llamacpp"] = r["peak_rss_bytes"] / llama["peak_rss_bytes"]
    return {"model": model, "hf_folder": str(hf), "builder_s": builder_s, "builder_error": builder_error,
            "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [f"### {result['model']}", "",
             "| graph | runtime | size | nodes | prefill tok/s @128 | decode tok/s | × llama.cpp | peak RSS | "
             "mean KL | top-1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        nodes = r["graph"]["nodes"] if "graph" in r else "–"
        lines.append(f"| {r['label']} | {r['runtime']} | {r['size_bytes'] / 1e6:.1f} MB | {nodes} | "
                     f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} ({r['decode_min']:.1f}–{r['decode_max']:.1f})"
                     f" | {r['decode_vs_llamacpp']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} MB | {r['kl']:.3f} | "
                     f"{100 * r['top1']:.1f} % |")
    if result.get("builder_error"):
        lines.append(f"\nonnxruntime-genai's builder failed on this model: `{result['builder_error']}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a teacher spec or a distilled student's folder (repeatable; "
                                                     "default: the embedded teacher)")
    ap.add_argument("--builder-python", help="a Python with onnxruntime-genai and transformers 5 (the builder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out answer tokens scored")
    args = ap.parse_args()
    import platform

    import psutil

    results = [bench_model(model, args) for model in args.model or ["default"]]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
              "cores": psutil.cpu_count(logical=False), "threads": args.threads, "rounds": args.rounds,
              "repeats": args.repeats, "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT.parent / "onnx_fused.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['date']}, {cpu}, {args.threads} threads, {args.rounds} rounds x {args.repeats} repeats\n")
    for r in results:
        print(to_markdown(r) + "\n")


if __name__ == "__main__":
    main()
