"""Teacher data speed: the data stage's teacher answers, PyTorch ``generate`` batches vs llama.cpp slots.

The same prompts (the user turns of the bundled held-out chats), the same sampling settings
(temperature 0.7, top-p 0.9, at most --max-new-tokens, one sample per prompt, scored by the
teacher's mean log-probability) through ``edgekit.distill.synth.generate_responses`` with each
backend, in the same run on the same machine:

  pytorch     the teacher's HF folder (fp32), ``generate`` on left-padded batches of --torch-batch,
              then a scoring forward pass (what the data stage did before llama.cpp slots)
  llama.cpp   the teacher's own GGUF requantized to q8_0 (what the data stage runs: llama.cpp's tiled
              kernels take q8_0 batches; --source-too adds the source file as it is), --slots
              sequences in flight in one context (continuous batching: a finished answer's slot
              takes the next prompt at once); the score comes from the logits of each sampled
              token, so there is no second pass

Tokens/s = sampled tokens / wall time of the answering loop (the model load is not counted).
Target (issue: a student worth shipping): llama.cpp >= 4x the pytorch figure the distillation
benchmark recorded (105 tokens/s, batch 48), measured here side by side.

    python benchmarks/teacher_data.py [--teacher default] [--prompts 96] [--max-new-tokens 160]
                                      [--torch-batch 48] [--slots 8,16,32,64]

Prints a Markdown table and writes benchmarks/out/teacher_data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--torch-batch", type=int, default=48, help="PyTorch generate batch (0: skip PyTorch)")
    ap.add_argument("--slots", default="8,16,32,64", help="llama.cpp sequences in flight, comma-separated")
    ap.add_argument("--source-too", action="store_true", help="also run the source GGUF as it is (e.g. Q4_1)")
    ap.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads (default: every core)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "teacher_data.json"))
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from edgekit import models
    from edgekit.devices import cpu_name
    from edgekit.distill import data as data_stage
    from edgekit.distill.config import DataConfig
    from edgekit.distill.synth import generate_responses
    from edgekit.quantize.report import DEFAULT_HELDOUT
    from edgekit.sources import load_examples

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = models.resolve_teacher(args.teacher)
    if teacher.gguf is None:
        sys.exit(f"{args.teacher} did not come from a GGUF: llama.cpp has nothing to run")
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    prompts = [[m for m in e["messages"] if m["role"] != "assistant"][:1] for e in load_examples([DEFAULT_HELDOUT])]
    prompts = [p for p in prompts if p and p[0]["role"] == "user"][:args.prompts]
    rows = []

    scratch = Path(tempfile.mkdtemp(prefix="teacher-data-"))

    def one(backend: str, batch: int, source_gguf: bool = False) -> dict:
        cfg = DataConfig(max_new_tokens=args.max_new_tokens, batch_size=batch, backend=backend)
        # work=None: llama.cpp runs the source GGUF as it is; else the data stage's q8_0 copy (made once)
        model = data_stage._load_teacher(teacher.path, teacher.gguf, cfg, None if source_gguf else scratch)
        if args.threads and backend == "llama.cpp":
            model.threads = args.threads
        stats: Counter = Counter()
        t0 = time.perf_counter()
        try:
            kept = generate_responses(model, tok, prompts, cfg, stats=stats)
        finally:
            if backend == "llama.cpp":
                model.close()
        wall = time.perf_counter() - t0
        if backend == "llama.cpp":
            backend = f"llama.cpp ({'source GGUF' if source_gguf else 'q8_0 copy'})"
        row = {"backend": backend, "batch": batch, "prompts": len(prompts), "kept": len(kept),
               "truncated": stats["responses_truncated"], "tokens": stats["generated_tokens"],
               "seconds": round(wall, 1),
               "tokens_per_s": round(stats["generated_tokens"] / wall, 1),
               "mean_score": round(sum(e["score"] for e in kept) / max(1, len(kept)), 4)}
        print(f"{backend} x{batch}: {row['tokens']} tokens in {wall:.1f}s = {row['tokens_per_s']} tok/s",
              file=sys.stderr)
        return row

    if args.torch_batch:
        rows.append(one("pytorch", args.torch_batch))
    slot_counts = [int(s) for s in args.slots.split(",") if s]
    if args.source_too:
        rows.append(one("llama.cpp", max(slot_counts), source_gguf=True))
    for slots in slot_counts:
        rows.append(one("llama.cpp", slots))
    base = rows[0]["tokens_per_s"] if args.torch_batch else None
    result = {"benchmark": "teacher_data", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
              "cores": os.cpu_count(), "teacher": teacher.name, "max_new_tokens": args.max_new_tokens,
              "command": "python benchmarks/teacher_data.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"Teacher data, {teacher.name}, {len(prompts)} prompts, <= {args.max_new_tokens} new tokens, "
          f"T 0.7 / top-p 0.9; {result['cpu']} ({result['cores']} cores), {result['date']}\n")
    print("| backend | in flight | tokens | wall | tokens/s | vs pytorch | answers kept | truncated | mean score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['backend']} | {r['batch']} | {r['tokens']} | {r['seconds']:.0f} s | {r['tokens_per_s']:.0f} | "
              f"{ratio} | {r['kept']}/{r['prompts']} | {r['truncated']} | {r['mean_score']:.3f} |")
    print(f"JSON: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
