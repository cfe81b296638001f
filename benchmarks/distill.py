"""Does distillation beat plain fine-tuning? KD vs CE-only students of the embedded teacher at equal wall time.

Runs the real pipeline (edgekit.distill.pipeline) on SmolLM2-135M-Instruct:
  data     Magpie prompts written by the teacher + its responses (synthetic; no user data)
  student  pruned from the teacher (Minitron-style) to <= 50 % of its parameters
  KD       forward KL against a top-k teacher-logit cache, for --minutes of wall-clock training
  CE       the same student init, cross-entropy on the same teacher-written text, same wall time
  eval     held-out perplexity, KL to the teacher, top-1 agreement; greedy answers side by side
Then measures training throughput with the teacher online (no cache) for comparison.

    python benchmarks/distill.py [--minutes 20] [--prompts 1200]

Prints Markdown and writes benchmarks/out/distill.json. Takes about 2 x minutes + 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget for each student")
    ap.add_argument("--prompts", type=int, default=1200, help="synthetic prompts to generate")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--k", type=int, default=32, help="top-k logits cached per position")
    ap.add_argument("--online-steps", type=int, default=30, help="steps of the online-teacher throughput run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "distill.json"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from edgekit import artifact
    from edgekit.distill import train as train_stage
    from edgekit.distill.evaluate import to_markdown
    from edgekit.distill.config import DistillConfig
    from edgekit.distill.pipeline import run
    from edgekit.distill.tokenize import tokenize_examples

    cfg = DistillConfig.model_validate({
        "teacher": "default",
        "student": {"layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
                    "heads": args.heads, "kv_heads": args.kv_heads, "init": "minitron"},
        "data": {"synthetic_prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": 48,
                 "heldout_fraction": 0.1, "max_seq_len": 512},
        "cache": {"mode": "topk", "k": args.k},
        "train": {"steps": None, "time_budget_s": args.minutes * 60, "batch_size": 8, "lr": 5e-4,
                  "warmup_steps": 20, "checkpoint_every": 100, "loss": "forward_kl", "temperature": 1.0},
        "eval": {"baselines": ["teacher", "ce"], "max_sequences": 200, "max_new_tokens": 48},
    })
    t0 = time.time()
    summary = run(cfg)
    pipeline_s = time.time() - t0

    # Throughput with the teacher online (no cache), same student init and data: a short run.
    from transformers import AutoTokenizer

    data_dir = Path(summary["artifacts"]["data"])
    tok = AutoTokenizer.from_pretrained(summary["teacher"]["path"])
    examples = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines() if x.strip()]
    seqs = tokenize_examples(examples, tok, cfg.data.max_seq_len)
    online_cfg = cfg.train.model_copy(update={"steps": args.online_steps, "time_budget_s": None})
    online_dir = train_stage.train(online_cfg, Path(summary["artifacts"]["init"]),
                                   artifact.store_path("distill-online-throughput", online_cfg.model_dump(), data_dir.name),
                                   sequences=seqs, teacher_dir=Path(summary["teacher"]["path"]))
    online = artifact.read_manifest(online_dir)["metrics"]
    ce_dir = Path(summary["artifacts"]["model:student (CE only)"])
    ce = artifact.read_manifest(ce_dir)["metrics"]
    kd = summary["training"]

    rows = summary["evaluation"]["models"]
    teacher, kd_row, ce_row = rows["teacher"], rows["student (KD)"], rows["student (CE only)"]
    result = {
        "benchmark": "distill",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/distill.py " + " ".join(sys.argv[1:]),
        "student": summary["student"],
        "teacher": summary["teacher"],
        "data": summary["data"],
        "cache": summary["cache"],
        "training": {"kd_from_cache": kd, "ce_only": ce, "kd_online_short_run": online},
        "evaluation": summary["evaluation"],
        "targets": {
            "student_params_at_most_half": summary["student"]["fraction_of_teacher"] <= 0.5,
            "top1_at_least_60pct": kd_row["top1_agreement"] >= 0.60,
            "ppl_at_most_2x_teacher": kd_row["perplexity"] <= 2 * teacher["perplexity"],
            "kd_beats_ce_by_10pct_ppl": kd_row["perplexity"] <= 0.9 * ce_row["perplexity"],
            "cache_step_throughput_at_least_0.8x_ce": kd["tokens_per_s"] >= 0.8 * ce["tokens_per_s"],
        },
        "pipeline_wall_s": pipeline_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    s = summary["student"]
    print(f"student: {s['layers']} layers x {s['hidden_size']}, mlp {s['intermediate_size']}, "
          f"{s['heads']}/{s['kv_heads']} heads = {s['params'] / 1e6:.1f}M params "
          f"({100 * s['fraction_of_teacher']:.0f}% of the teacher's {summary['teacher']['params'] / 1e6:.1f}M)")
    d = summary["data"]
    print(f"data: {json.dumps(d)}")
    c = summary["cache"]
    print(f"cache: top-{c['k']}, {c['bytes'] / 1e6:.1f} MB for {c['tokens']} tokens = {c['bytes_per_token']:.0f} "
          f"bytes/token")
    print()
    print("| training | wall time | steps | tokens seen | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, m in (("KD from top-k cache", kd), ("CE only", ce), ("KD, teacher online (short run)", online)):
        print(f"| {name} | {m['wall_s']:.0f} s | {m['steps']} | {m['tokens_seen']} | {m['tokens_per_s']:.0f} |")
    print()
    print(to_markdown(summary["evaluation"]))
    print()
    for k, v in result["targets"].items():
        print(f"- {k}: {'met' if v else 'MISSED'}")
    print(f"JSON: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
