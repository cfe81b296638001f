"""Does quantization-aware distillation close the int4 gap? PTQ alone vs a QAT phase, per 4-bit export.

Runs the real pipeline (edgekit.distill.pipeline) on the embedded teacher (SmolLM2-135M-Instruct) once without
QAT (the float student), then once per target with ``qat: {target, time_budget_s}`` -- every stage before the
QAT phase is reused, so each target costs its QAT minutes. For every target it exports

  float   the float student as an f32 GGUF (its own KL to the teacher, run in llama.cpp)
  PTQ     the float student at the target's quant (post-training quantization alone)
  PTQ+    the control: the float student trained --qat-minutes more without a grid, then quantized
  QAT     the QAT student at the same quant (trained through that exporter's grid for --qat-minutes)

and scores them all with the fidelity stage against the *teacher* (KL(teacher || export), top-1, perplexity
on the bundled held-out chats). Target of issue 17: each QAT export's KL <= 1.1 x the float student's KL.

    python benchmarks/qat.py [--minutes 20] [--qat-minutes 5] [--targets gguf-q4_0 onnx-int4 ...]

Prints Markdown, writes benchmarks/out/qat.json. Takes about --minutes + targets x (--qat-minutes + exports)
plus data generation and fidelity. A smoke run: --minutes 0.2 --qat-minutes 0.2 --prompts 16 --max-tokens 512.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["gguf-q4_0", "gguf-q4_k_m", "onnx-int4", "executorch-8da4w"]
KL_RATIO = 1.1  # an int4 export's KL to the teacher may be at most this multiple of the float student's




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the float training")
    ap.add_argument("--qat-minutes", type=float, default=5.0, help="wall-clock budget of each QAT phase")
    ap.add_argument("--qat-lr", type=float, default=None, help="default: distill.qat's own default")
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--prompts", type=int, default=1200, help="synthetic prompts to generate")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None, help="held-out tokens scored (default: fidelity's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "qat.json"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from edgekit import artifact
    from edgekit.devices import cpu_name
    from edgekit.distill import train as train_stage
    from edgekit.distill.config import DistillConfig, QatConfig
    from edgekit.distill.pipeline import run as distill
    from edgekit.export.pipeline import ExportConfig
    from edgekit.export.pipeline import run as export
    from edgekit.quantize import report
    from edgekit.quantize.config import FidelityConfig
    from edgekit.quantize.fakequant import TARGETS as KNOWN

    bad = [t for t in args.targets if t not in KNOWN]
    if bad:
        sys.exit(f"unknown target {bad[0]}; choose from {', '.join(KNOWN)}")
    base = {
        "teacher": "default",
        "student": {"layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
                    "heads": args.heads, "kv_heads": args.kv_heads, "init": "minitron"},
        "data": {"synthetic_prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": 48,
                 "heldout_fraction": 0.1, "max_seq_len": 512},
        "cache": {"mode": "topk", "k": 32},
        "train": {"steps": None, "time_budget_s": args.minutes * 60, "batch_size": 8, "lr": 5e-4,
                  "warmup_steps": 20, "checkpoint_every": 100},
        "eval": {"baselines": ["teacher"], "max_sequences": 50, "max_new_tokens": 16},
    }
    t0 = time.time()
    float_run = distill(DistillConfig.model_validate(base))
    float_dir = Path(float_run["artifacts"]["student"])
    teacher = Path(float_run["teacher"]["path"])

    def exported(model: Path, fmt: str, quant: str) -> Path:
        return Path(export(ExportConfig(model=str(model), format=fmt, quant=quant, threads=args.threads))["path"])

    # The control: the float student trained for the QAT phase's extra minutes too (same settings, no grid), so
    # "QAT vs PTQ" is not "more training vs less".
    qat_base = {"target": args.targets[0], "steps": None, "time_budget_s": args.qat_minutes * 60}
    if args.qat_lr is not None:
        qat_base["lr"] = args.qat_lr
    more_cfg = QatConfig.model_validate(qat_base).train_config(DistillConfig.model_validate(base).train)
    more_dir = train_stage.train(more_cfg, float_dir, artifact.store_path(
        "distill", more_cfg.model_dump(), "more-float", float_dir.name),
        cache_dir=Path(float_run["artifacts"]["cache"]))
    qat_runs, exports = {}, {"float": exported(float_dir, "gguf", "f32"), "float+": exported(more_dir, "gguf", "f32")}
    for target in args.targets:
        fmt, quant = KNOWN[target]
        run = distill(DistillConfig.model_validate({**base, "qat": {**qat_base, "target": target}}))
        qat_runs[target] = run["qat"]
        exports[f"{target} PTQ"] = exported(float_dir, fmt, quant)
        exports[f"{target} PTQ+"] = exported(more_dir, fmt, quant)
        exports[f"{target} QAT"] = exported(Path(run["artifacts"]["student"]), fmt, quant)

    fid = report.run(teacher, list(exports.values()), max_tokens=args.max_tokens or FidelityConfig().max_tokens,
                     threads=args.threads)
    rows = {name: fid["rows"][i + 1] for i, name in enumerate(exports)}  # row 0 is the teacher itself
    float_kl = rows["float"]["kl_mean"]
    keep = ("kl_mean", "top1_agreement", "perplexity", "size_bytes")
    table = []
    for target in args.targets:
        r = {"target": target, "float_kl": float_kl, "qat_training": qat_runs[target]}
        for kind in ("PTQ", "PTQ+", "QAT"):
            row = rows[f"{target} {kind}"]
            r[kind] = {**{k: row[k] for k in keep}, "kl_ratio_to_float": row["kl_mean"] / float_kl}
        r["met"] = r["QAT"]["kl_mean"] <= KL_RATIO * float_kl
        table.append(r)

    for name in ("float", "float+"):
        f = rows[name]
        print(f"{name} student (f32 GGUF) vs teacher: KL {f['kl_mean']:.4f}, top-1 {100 * f['top1_agreement']:.1f}%, "
              f"ppl {f['perplexity']:.3f}")
    print(f"teacher ppl {fid['rows'][0]['perplexity']:.3f} on {fid['tokens']} tokens; float+ = float trained "
          f"{args.qat_minutes} more minutes without a grid (the control); ratios are KL / float KL")
    print()
    print("| target | KL PTQ | KL PTQ+ | KL QAT | ratio PTQ | ratio PTQ+ | ratio QAT | top-1 PTQ / PTQ+ / QAT | "
          f"ppl PTQ / PTQ+ / QAT | QAT KL <= {KL_RATIO}x float |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in table:
        p, m, q = r["PTQ"], r["PTQ+"], r["QAT"]
        print(f"| {r['target']} | {p['kl_mean']:.4f} | {m['kl_mean']:.4f} | {q['kl_mean']:.4f} | "
              f"{p['kl_ratio_to_float']:.2f} | {m['kl_ratio_to_float']:.2f} | {q['kl_ratio_to_float']:.2f} | "
              + " / ".join(f"{100 * x['top1_agreement']:.1f}%" for x in (p, m, q)) + " | "
              + " / ".join(f"{x['perplexity']:.2f}" for x in (p, m, q)) + f" | {'yes' if r['met'] else 'NO'} |")
    result = {"benchmark": "qat", "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/qat.py " + " ".join(sys.argv[1:]), "cpu": cpu_name(),
              "student": float_run["student"], "float_training": float_run["training"],
              "fidelity": fid, "targets": table, "wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"JSON: {out} ({time.time() - t0:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
