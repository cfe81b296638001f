"""Which student shape recovers fastest? The quick recipe's distillation with other students, same data, same minutes.

Runs the real distillation (edgekit.distill.pipeline) of a recipe (default recipes/quick.yaml) once per shape,
with only the student replaced: the data and the logit cache are built once and reused, so every shape trains
on the same teacher-written chats for the same wall-clock budget (the recipe's time_budget, or --minutes). The
distillation's own evaluation scores each student against the teacher on the data stage's held-out chats, on
the answer tokens: perplexity, KL(teacher || student) and top-1 agreement with the teacher's argmax.

    python benchmarks/student_shapes.py [--recipe recipes/quick.yaml] [--minutes 4] \
        [--lr 5e-4] [--prompts 192] [--no-reconstruct] [--shape planner] [--shape 22x512x1280:6/3] ...

A shape is ``LAYERSxHIDDENxMLP:HEADS/KV_HEADS``, or ``planner`` (what the recipe's device and speed target
give). Prints a Markdown table, writes benchmarks/out/student_shapes.json. Each shape costs its training
minutes plus pruning (~30 s) and evaluation (~20 s) on a 2-core CPU; the first run adds the data and cache.
Run on a quiet machine: the training budget is wall-clock, so a busy CPU means fewer steps.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = re.compile(r"(\d+)x(\d+)x(\d+):(\d+)/(\d+)")


def parse_shape(text: str) -> dict | None:
    if text == "planner":
        return None
    m = SHAPE.fullmatch(text)
    if not m:
        raise SystemExit(f"--shape {text!r}: write LAYERSxHIDDENxMLP:HEADS/KV_HEADS (e.g. 22x512x1280:6/3) or planner")
    layers, hidden, mlp, heads, kv = map(int, m.groups())
    return {"layers": layers, "hidden_size": hidden, "intermediate_size": mlp, "heads": heads, "kv_heads": kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quick.yaml"))
    ap.add_argument("--shape", action="append", default=None, help="repeatable; default: planner")
    ap.add_argument("--minutes", type=float, default=None, help="training budget (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    ap.add_argument("--prompts", type=int, default=None, help="synthetic prompts (default: the recipe's)")
    ap.add_argument("--no-reconstruct", action="store_true",
                    help="prune without refitting the cut layers (distill.student.reconstruct: false)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "student_shapes.json"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from edgekit.devices import cpu_name
    from edgekit.distill import pipeline
    from edgekit.recipe import load_recipe

    base = load_recipe(args.recipe).distill_config()
    train = {k: v for k, v in (("time_budget_s", args.minutes and args.minutes * 60), ("lr", args.lr)) if v}
    if train:
        base = base.model_copy(update={"train": base.train.model_copy(update=train)})
    if args.prompts:
        base = base.model_copy(update={"data": base.data.model_copy(update={"synthetic_prompts": args.prompts})})
    if args.no_reconstruct:
        base = base.model_copy(update={"student": base.student.model_copy(update={"reconstruct": False})})
    rows = []
    for text in args.shape or ["planner"]:
        shape = parse_shape(text)
        cfg = base if shape is None else base.model_copy(
            update={"student": base.student.model_copy(update={"device": None, "target_decode_tok_s": None, **shape})})
        t0 = time.perf_counter()
        summary = pipeline.run(cfg).result
        student = summary["student"]
        scores = summary["evaluation"]["models"]
        mine = next(v for k, v in scores.items() if k.startswith("student"))
        rows.append({"shape": text, "reconstruct": cfg.student.reconstruct, "layers": student["layers"],
                     "hidden_size": student["hidden_size"],
                     "intermediate_size": student["intermediate_size"], "heads": student["heads"],
                     "kv_heads": student["kv_heads"], "params": student["params"],
                     "fraction_of_teacher": student["fraction_of_teacher"],
                     "steps": summary["training"]["steps"], "tokens_seen": summary["training"]["tokens_seen"],
                     "train_seconds": summary["training"]["wall_s"], "perplexity": mine["perplexity"],
                     "kl_to_teacher": mine["kl_to_teacher"], "top1_vs_teacher": mine["top1_agreement"],
                     "answer_tokens": mine["tokens"], "teacher_perplexity": scores["teacher"]["perplexity"],
                     "wall_s": round(time.perf_counter() - t0, 1)})

    print(f"\nrecipe {args.recipe}, {base.data.synthetic_prompts} synthetic prompts, "
          f"{base.train.time_budget_s or base.train.steps} "
          f"{'s' if base.train.time_budget_s else 'steps'} of training, lr {base.train.lr}; {cpu_name()}\n")
    print("| shape | params | of teacher | steps | ppl (teacher) | KL to teacher | top-1 vs teacher |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']}x{r['hidden_size']}x{r['intermediate_size']}, {r['heads']}/{r['kv_heads']} heads"
              f"{' (planner)' if r['shape'] == 'planner' else ''} | {r['params'] / 1e6:.1f}M | "
              f"{100 * r['fraction_of_teacher']:.0f}% | {r['steps']} | {r['perplexity']:.2f} "
              f"({r['teacher_perplexity']:.2f}) | {r['kl_to_teacher']:.3f} | {100 * r['top1_vs_teacher']:.1f}% |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": args.recipe, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
                               "lr": base.train.lr, "time_budget_s": base.train.time_budget_s,
                               "synthetic_prompts": base.data.synthetic_prompts, "rows": rows},
                              indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
