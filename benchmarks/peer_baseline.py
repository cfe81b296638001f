"""Peer baseline: edgekit's distillation against TRL's GKDTrainer and SFTTrainer, same init, data and wall time.

One data artifact (teacher-written chats from edgekit's data stage) and one pruned student init
(edgekit's prune stage, the quick recipe's Pi 5 student unless --layers etc. are given) feed three
trainers, each for the same wall-clock budget, each scored by the same evaluator
(edgekit.distill.evaluate: held-out perplexity, KL to the teacher, top-1 agreement, on the data
stage's held-out chats):

  edgekit   forward KL against edgekit's top-k teacher-logit cache; the cache build counts inside
            the budget (the trainer gets what is left)
  TRL GKD   trl.experimental.gkd.GKDTrainer with its defaults (lmbda 0.5: half the batches are the
            student's own samples, beta 0.5 generalized JSD, temperature 0.9, 128 new tokens), the
            teacher online
  TRL SFT   trl.SFTTrainer, cross-entropy on the teacher's answers (completion tokens only)

All three: batch 8, AdamW, peak lr --lr, 10 warmup steps, cosine to the end. TRL trainers stop at
a step count; each gets ``budget / (seconds per step)`` steps, measured by a short probe run first
(not counted), and a callback also stops it when the budget runs out.

TRL is a benchmark-only dependency (not edgekit's). It needs datasets, pandas and pyarrow, which
edgekit's venv lacks; one way that leaves .venv untouched:

    python3 -m venv /tmp/trlenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/trlenv/lib/python3.11/site-packages/edgekit-venv.pth
    /tmp/trlenv/bin/pip install trl==1.16.0 "datasets>=4.7,<5" "huggingface_hub>=0.34,<1.0"
    PYTHONPATH=$PWD /tmp/trlenv/bin/python benchmarks/peer_baseline.py [--minutes 5] [--prompts 256]

Prints a Markdown table and writes benchmarks/out/peer_baseline.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent




def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _stop_at(seconds: float):
    from transformers import TrainerCallback

    class StopAtBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.t0 >= seconds:
                control.should_training_stop = True
            return control

    return StopAtBudget()


def _trl_run(kind: str, init_dir: Path, teacher_dir: Path, train: list[dict], out: Path, *, steps: int,
             budget_s: float | None, lr: float, max_len: int) -> dict:
    """Train a copy of ``init_dir`` with TRL for ``steps`` (stopping at ``budget_s``); returns timing."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(init_dir), use_safetensors=True)
    common = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=lr, lr_scheduler_type="cosine",
                  warmup_steps=min(10, max(0, steps - 1)), max_steps=steps, weight_decay=0.01, max_grad_norm=1.0,
                  logging_steps=10, save_strategy="no", report_to=[], max_length=max_len, seed=0,
                  use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    callbacks = [_stop_at(budget_s)] if budget_s else []
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in train]
        trainer = SFTTrainer(model=model, args=SFTConfig(completion_only_loss=True, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=callbacks)
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), use_safetensors=True)
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=GKDConfig(**common),
                             train_dataset=Dataset.from_list([{"messages": e["messages"]} for e in train]),
                             processing_class=tok, callbacks=callbacks)
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    return {"steps": trainer.state.global_step, "wall_s": round(wall, 1), "train_loss": result.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget per trainer")
    ap.add_argument("--prompts", type=int, default=256, help="synthetic prompts for the shared data")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="pi-5-8gb", help="the student is planned for this device (as quick.yaml)")
    ap.add_argument("--target-decode-tok-s", type=float, default=120)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--probe-steps", type=int, default=6)
    ap.add_argument("--only", default="edgekit,gkd,sft")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "peer_baseline.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from transformers import AutoTokenizer

    from edgekit import artifact
    from edgekit.devices import cpu_name
    from edgekit.distill import evaluate as eval_stage
    from edgekit.distill.config import DistillConfig
    from edgekit.distill.pipeline import run
    from edgekit.distill.tokenize import tokenize_examples

    budget = args.minutes * 60
    base = {"teacher": "default", "student": {"device": args.device, "target_decode_tok_s": args.target_decode_tok_s},
            "data": {"synthetic_prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": 32,
                     "heldout_fraction": 0.1},
            "cache": {"mode": "topk", "k": 32},
            "train": {"steps": 1, "batch_size": 8, "lr": args.lr, "warmup_steps": 10, "checkpoint_every": 1000},
            "eval": {"baselines": ["teacher"], "prompts": [], "max_sequences": 200}}
    # pass 1: data, init and cache (one training step, thrown away); the cache's build time is edgekit's to pay
    first = run(DistillConfig.model_validate(base)).result
    data_dir, init_dir = Path(first["artifacts"]["data"]), Path(first["artifacts"]["init"])
    teacher_dir = Path(first["teacher"]["path"])
    cache_s = artifact.read_manifest(Path(first["artifacts"]["cache"]))["metrics"].get("seconds", 0.0)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    train, heldout = _jsonl(data_dir / "train.jsonl"), _jsonl(data_dir / "heldout.jsonl")
    heldout_seqs = tokenize_examples(heldout, tok, 512)
    work = artifact.home() / "peer-baseline" / f"{init_dir.name}-{int(budget)}s"
    models, timing = {}, {}
    only = set(args.only.split(","))
    if "edgekit" in only:
        cfg = json.loads(json.dumps(base))
        cfg["train"] = {**cfg["train"], "steps": None, "time_budget_s": max(1.0, budget - cache_s)}
        r = run(DistillConfig.model_validate(cfg)).result
        models["edgekit (KD, top-k cache)"] = Path(r["student"]["path"])
        timing["edgekit (KD, top-k cache)"] = {**{k: r["training"].get(k) for k in ("steps", "wall_s", "tokens_seen")},
                                               "cache_s": cache_s}
    for kind, name in (("gkd", "TRL GKDTrainer (defaults)"), ("sft", "TRL SFTTrainer")):
        if kind not in only:
            continue
        probe = _trl_run(kind, init_dir, teacher_dir, train, work / f"{kind}-probe", steps=args.probe_steps,
                         budget_s=None, lr=args.lr, max_len=512)
        per_step = probe["wall_s"] / max(1, probe["steps"])
        steps = max(1, int(budget / per_step))
        logging.info("%s: %.2f s/step in the probe -> %d steps for %.0f s", name, per_step, steps, budget)
        timing[name] = {**_trl_run(kind, init_dir, teacher_dir, train, work / kind, steps=steps, budget_s=budget,
                                   lr=args.lr, max_len=512), "planned_steps": steps}
        models[name] = work / kind
    report = eval_stage.evaluate(models, teacher_dir, heldout_seqs[:200])
    result = {"benchmark": "peer_baseline", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(),
              "cores": os.cpu_count(), "command": "python benchmarks/peer_baseline.py " + " ".join(sys.argv[1:]),
              "budget_s": budget, "data": artifact.read_manifest(data_dir)["metrics"], "init": str(init_dir),
              "student": first["student"], "timing": timing, "evaluation": report}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    rows = report["models"]
    print(f"Peer baseline, {args.minutes:g} min per trainer, {result['cpu']} ({result['cores']} cores), "
          f"{result['date']}; student {first['student']['params'] / 1e6:.1f}M; {len(train)} train / "
          f"{len(heldout)} held-out chats\n")
    print("| trainer | steps | wall | held-out ppl | KL to teacher | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        t = timing.get(name, {})
        wall = (t.get("wall_s") or 0) + (t.get("cache_s") or 0)
        print(f"| {name} | {t.get('steps', '-')} | {wall:.0f} s | {r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} | "
              f"{100 * r['top1_agreement']:.1f}% |")
    ek = rows.get("edgekit (KD, top-k cache)")
    for name in ("TRL GKDTrainer (defaults)", "TRL SFTTrainer"):
        if ek and name in rows:
            gain = 1 - ek["perplexity"] / rows[name]["perplexity"]
            print(f"- edgekit vs {name}: {100 * gain:.1f}% lower held-out perplexity "
                  f"({'met' if gain >= 0.15 else 'MISSED'}: target >= 15%)")
    print(f"JSON: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
