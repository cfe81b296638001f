"""``edgekit distill`` and ``edgekit eval``: train a student, score a model against a teacher."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import yaml
from pydantic import ValidationError

from edgekit import artifact, models
from edgekit.cli.options import default
from edgekit.cli.output import emit_json, params
from edgekit.distill import evaluate, pipeline
from edgekit.distill.config import LOSSES, CacheConfig, DataConfig, DistillConfig, EvalSpec, StudentSpec
from edgekit.distill.tokenize import tokenize_examples
from edgekit.errors import ConfigError
from edgekit.sources import check_sources
from edgekit.units import UnitError, format_bytes, parse_duration


def add_commands(sub, common) -> None:
    ds = sub.add_parser("distill", parents=[common], help="plan, prune, generate data, distil and evaluate a student")
    ds.add_argument("config", nargs="?", help="YAML with teacher/student/data/cache/train/eval sections (optional)")
    ds.add_argument("--teacher", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ds.add_argument("--trust-remote-code", action="store_true", help="DANGEROUS: allow a model's own Python code")
    ds.add_argument("--device", help=f"size the student for this device (default {default(StudentSpec, 'device')})")
    ds.add_argument("--quant", help="quant the planner sizes for")
    ds.add_argument("--context", type=int, help="context the planner sizes for")
    ds.add_argument("--init", choices=typing.get_args(StudentSpec.model_fields["init"].annotation),
                    help="student initialisation")
    ds.add_argument("--data", action="append", help="user data: JSONL, .txt/.md, or a datasets folder (repeatable)")
    ds.add_argument("--synthetic-prompts", type=int, help="prompts the teacher writes when there is no --data")
    ds.add_argument("--steps", type=int, help="optimizer steps")
    ds.add_argument("--time-budget", help="train for a wall-clock budget instead: 90s, 20m, 1h")
    ds.add_argument("--loss", choices=LOSSES)
    ds.add_argument("--temperature", type=float)
    ds.add_argument("--ce-weight", type=float, help="weight of hard-label cross-entropy next to the KD loss")
    ds.add_argument("--cache", choices=[*typing.get_args(CacheConfig.model_fields["mode"].annotation), "none"],
                    help="teacher-logit cache mode; none: online")
    ds.add_argument("--compare-ce", action="store_true", help="also train a CE-only student for the same budget")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", parents=[common], help="perplexity, KL and top-1 agreement of a model vs a teacher")
    ev.add_argument("model", help="HF folder (e.g. a distilled student), .gguf, hub id or 'default'")
    ev.add_argument("--against", default="default", help="the teacher (default: the embedded one)")
    ev.add_argument("--data", required=True, help="held-out JSONL (e.g. heldout.jsonl of a data artifact); prompts "
                    "without an answer are answered by the teacher first (cached in the artifact store)")
    ev.add_argument("--export", action="append", type=Path, default=[],
                    help="also score this export artifact folder against the teacher (repeatable)")
    ev.add_argument("--prompt", action="append", help="also generate greedily for this prompt (repeatable)")
    ev.add_argument("--max-sequences", type=int, default=default(EvalSpec, "max_sequences"))
    ev.add_argument("--max-seq-len", type=int, default=default(DataConfig, "max_seq_len"))
    ev.add_argument("--max-new-tokens", type=int, default=default(EvalSpec, "max_new_tokens"))
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)


def _time_budget(text: str) -> float:
    """--time-budget in seconds, read by the one duration parser (a unit is required, as in recipes)."""
    try:
        return parse_duration(text)
    except UnitError as err:
        raise ConfigError(f"cannot read time budget {text!r}: write e.g. 90s, 20m or 1.5h") from err


def _distill_config(args):
    raw: dict = {}
    if args.config:
        try:
            raw = yaml.safe_load(open(args.config, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {args.config}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{args.config} must be a YAML mapping")
    raw.setdefault("student", {})
    raw.setdefault("data", {})
    raw.setdefault("train", {})
    if args.teacher:
        raw["teacher"] = args.teacher
    if args.device:
        raw["student"]["device"] = args.device
    for key in ("quant", "context", "init"):
        if getattr(args, key) is not None:
            raw["student"][key] = getattr(args, key)
    if args.data:
        raw["data"]["sources"] = args.data
    if args.synthetic_prompts:
        raw["data"]["synthetic_prompts"] = args.synthetic_prompts
    if args.steps:
        raw["train"].update(steps=args.steps, time_budget_s=None)
    if args.time_budget:
        raw["train"].update(time_budget_s=_time_budget(args.time_budget), steps=None)
    for key in ("loss", "temperature", "ce_weight"):
        if getattr(args, key) is not None:
            raw["train"][key] = getattr(args, key)
    if args.cache == "none":
        raw["cache"] = None
    elif args.cache:
        raw["cache"] = {**(raw.get("cache") or {}), "mode": args.cache}
    if args.compare_ce:
        raw.setdefault("eval", {})["baselines"] = ["teacher", "ce"]
    try:
        return DistillConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{args.config or 'distill options'}: {problems}") from e


def cmd_distill(args) -> int:
    summary = pipeline.run(_distill_config(args), trust_remote_code=args.trust_remote_code)
    if args.json:
        emit_json(summary)
        return 0
    s, t = summary["student"], summary["teacher"]
    print(f"teacher  {t['name']}: {params(t['params'])} params")
    print(f"student  {s['layers']}L x {s['hidden_size']}, mlp {s['intermediate_size']}, {s['heads']}/{s['kv_heads']} "
          f"heads -> {params(s['params'])} params ({s['fraction_of_teacher']:.0%} of the teacher, {s['init']} init)")
    tr = summary["training"]
    print(f"trained  {tr['steps']} steps, {tr['tokens_seen']} tokens in {tr['wall_s']:.0f}s "
          f"({tr['tokens_per_s']:.0f} tok/s)")
    if summary["cache"]:
        c = summary["cache"]
        print(f"cache    {c['mode']} k={c['k']}: {format_bytes(c['bytes'])}, {c['bytes_per_token']:.0f} bytes/token")
    print()
    print(evaluate.to_markdown(summary["evaluation"]))
    print()
    for k, v in summary["artifacts"].items():
        if v:
            print(f"{k:<10} {v}")
    return 0


def cmd_eval(args) -> int:
    from transformers import AutoTokenizer

    examples = check_sources([Path(args.data)], key="--data")  # before any model is resolved
    for p in args.export:
        if not (Path(p) / artifact.MANIFEST).is_file():
            raise ConfigError(f"--export {p} is not an export artifact folder (no manifest.json); pass a folder made "
                              "by `edgekit export` / `edgekit quantize`")
    model = models.resolve_teacher(args.model, trust_remote_code=args.trust_remote_code)
    teacher = models.resolve_teacher(args.against, trust_remote_code=args.trust_remote_code)
    for m in (model, teacher):
        if args.max_seq_len > m.arch.max_context:
            raise ConfigError(f"--max-seq-len {args.max_seq_len} is longer than {m.name} was trained for "
                              f"({m.arch.max_context} positions, max_position_embeddings in {m.path / 'config.json'}); "
                              f"pass --max-seq-len {m.arch.max_context} or less")
    examples = evaluate.answered(examples, [Path(args.data)], teacher.path,
                                 artifact.content_id(str(teacher.path), teacher.files), args.max_seq_len)
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    seqs = tokenize_examples(examples, tok, args.max_seq_len)[:args.max_sequences]
    if not evaluate.has_targets(seqs):
        raise ConfigError(f"--data {args.data} gives nothing to score: no example has an answer or text of 2 or more "
                          "tokens after the first; add assistant answers, prompts for the teacher, or longer text")
    report = evaluate.evaluate({model.name: model.path}, teacher.path, seqs, args.prompt or [], args.max_new_tokens,
                               exports=args.export)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(evaluate.to_markdown(report))
    return 0
