"""The ``edgekit`` command: the only place that prints, parses argv or exits.

Reports go to stdout (``--json`` makes them machine-readable); logs and progress
go to stderr. An :class:`EdgekitError` becomes one line on stderr and exit code
2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.units import format_bandwidth, format_bytes, format_flops

log = logging.getLogger("edgekit")


# --------------------------------------------------------------------------- formatting


def _table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in
                         enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- commands


def cmd_devices(args) -> int:
    from edgekit.devices import list_devices

    profiles = list_devices(include_host=not args.no_host)
    if args.json:
        _emit_json([p.summary() for p in profiles])
        return 0
    rows = []
    for p in profiles:
        accel = ", ".join(f"{a.kind}: {a.name.split(' (')[0].split(',')[0][:24]}" for a in p.accelerators) or "-"
        bw = format_bandwidth(p.memory_bandwidth) + (" (measured)" if p.measured else "")
        rows.append([p.name, p.display_name.split(" (")[0], format_bytes(p.ram), format_bytes(p.memory_budget), bw,
                     f"{p.cpu.cores}c {p.cpu.arch}", format_flops(p.cpu.peak_fp32), accel, ", ".join(p.runtimes) or "-"])
    print(_table(rows, ["name", "device", "ram", "budget", "bandwidth", "cpu", "fp32 peak", "accelerators",
                        "runtimes"], right={2, 3, 4, 6}))
    return 0


def cmd_teacher(args) -> int:
    from edgekit.models import resolve_teacher

    teacher = resolve_teacher(args.teacher, trust_remote_code=args.trust_remote_code)
    info = teacher.describe()
    if args.json:
        _emit_json(info)
        return 0
    a = teacher.arch
    print(f"teacher     {teacher.name}  ({teacher.source}{', converted now' if teacher.converted else ', cache verified'})")
    print(f"origin      {teacher.origin}")
    print(f"license     {teacher.license or 'unknown (check the model card)'}")
    print(f"folder      {teacher.path}")
    if teacher.gguf:
        print(f"from GGUF   {teacher.gguf}")
    print(f"params      {_params(a.params)} ({_params(a.params_non_embedding)} outside the embedding)")
    print(f"shape       {a.layers} layers, hidden {a.hidden_size}, MLP {a.intermediate_size}, "
          f"{a.heads} heads / {a.kv_heads} kv heads of {a.head_dim}, vocab {a.vocab_size}, "
          f"{'tied' if a.tie_embeddings else 'separate'} output head, context {a.max_context}")
    print(f"chat        {'chat template present' if info['has_chat_template'] else 'no chat template'}")
    return 0


def cmd_plan(args) -> int:
    from edgekit.devices import list_devices, load_device
    from edgekit.models import resolve_teacher
    from edgekit.plan import plan
    from edgekit.quantize.schemes import get_scheme

    # Fail fast on bad names before resolving (and maybe converting) the teacher.
    get_scheme(args.format, args.quant)
    devices = [load_device(d) for d in args.device] if args.device else list_devices(include_host=True)
    teacher = resolve_teacher(args.teacher, trust_remote_code=args.trust_remote_code)
    single = len(devices) == 1
    results = []
    for dev in devices:
        try:
            results.append(plan(teacher.arch, dev, args.format, args.quant, args.context, args.target_decode_tok_s,
                                teacher.name))
        except EdgekitError as e:
            if single:
                raise
            results.append({"device": {"name": dev.name, "display_name": dev.display_name}, "error": str(e),
                            "error_type": type(e).__name__})
    if args.json:
        _emit_json(results[0] if single else results)
        return 0
    a = teacher.arch
    print(f"teacher  {teacher.name}: {_params(a.params)} params, {a.layers} layers, hidden {a.hidden_size}  |  "
          f"{args.format} {args.quant}  |  context {args.context}"
          + (f"  |  target {args.target_decode_tok_s:g} tok/s" if args.target_decode_tok_s else ""))
    print()
    if single:
        _print_plan_detail(results[0])
    else:
        _print_plan_table(results)
    return 0


def _student_label(r: dict) -> str:
    s = r["student"]
    if r["teacher_fits"]:
        return f"teacher as is ({s['layers']}L x {s['hidden_size']})"
    return f"{s['layers']}L x {s['hidden_size']}, mlp {s['intermediate_size']}, {s['heads']}/{s['kv_heads']} heads"


def _print_plan_table(results: list[dict]) -> None:
    rows, problems = [], []
    for r in results:
        if "error" in r:
            rows.append([r["device"]["name"], "-", "does not fit (see below)", "-", "-", "-", "-", "-"])
            problems.append(f"  {r['device']['name']}: {r['error']}")
            continue
        m = r["memory"]
        rows.append([
            r["device"]["name"], format_bytes(r["budget_bytes"]), _student_label(r), _params(r["student"]["params"]),
            format_bytes(m["total_bytes"]), f"{100 * m['total_bytes'] / r['budget_bytes']:.0f}%",
            f"{r['predicted_decode_tok_s']:.1f}", f"{r['predicted_prefill_tok_s']:.0f}",
        ])
    print(_table(rows, ["device", "budget", "student", "params", "memory", "of budget", "decode tok/s*",
                        "prefill tok/s*"], right={1, 3, 4, 5, 6, 7}))
    if problems:
        print("\nno plan:")
        print("\n".join(problems))
    ok = [r for r in results if "error" not in r]
    if ok:
        print("\n* predicted, not measured. Assumptions:")
        for line in ok[0]["prediction"]["assumptions"]:
            print(f"  - {line}")
        print("  memory = weights + KV cache + compute buffer + runtime overhead + 10% margin "
              "(`edgekit plan --device NAME` shows each term)")


def _print_plan_detail(r: dict) -> None:
    s, m = r["student"], r["memory"]
    print(f"device   {r['device']['display_name']} ({r['device']['name']}), runtime {r['runtime']}, "
          f"budget {format_bytes(r['budget_bytes'])}")
    verdict = "the teacher fits as is" if r["teacher_fits"] else f"student at {s['fraction_of_teacher']:.0%} of the teacher"
    print(f"student  {_student_label(r)} -> {_params(s['params'])} params ({verdict})")
    print(f"         {r['bits_per_weight']:.2f} bits per weight at {r['quant']}")
    print()
    terms = [
        ["weights", format_bytes(m["weights_bytes"]), "every tensor at the scheme's stored size (scales included)"],
        ["KV cache", format_bytes(m["kv_cache_bytes"]), f"K and V for {r['context']} tokens"],
        ["compute buffer", format_bytes(m["compute_buffer_bytes"]), "activations of one prompt micro-batch"],
        ["runtime overhead", format_bytes(m["runtime_overhead_bytes"]), "process, library, tokenizer tables"],
        ["= predicted RSS", format_bytes(m["predicted_rss_bytes"]), ""],
        ["safety margin", format_bytes(m["safety_margin_bytes"]), "10%"],
        ["= total", format_bytes(m["total_bytes"]),
         f"{100 * m['total_bytes'] / r['budget_bytes']:.0f}% of budget, {format_bytes(r['headroom_bytes'])} left"],
    ]
    print(_table(terms, ["memory", "bytes", "what"], right={1}))
    print()
    print(f"decode   {r['predicted_decode_tok_s']:.1f} tok/s (predicted; {r['decode_bound']}-bound, "
          f"{format_bytes(r['bytes_read_per_token'])} read per token)")
    print(f"prefill  {r['predicted_prefill_tok_s']:.0f} tok/s (predicted; compute-bound)")
    for line in r["prediction"]["assumptions"]:
        print(f"         - {line}")
    for w in r["warnings"]:
        print(f"note     {w}")


def _parse_duration(text: str) -> float:
    from edgekit.errors import ConfigError

    units = {"s": 1, "m": 60, "min": 60, "h": 3600}
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|min|h)?\s*", text or "")
    if not m:
        raise ConfigError(f"cannot read time budget {text!r}: write e.g. 90s, 20m or 1.5h")
    return float(m.group(1)) * units[m.group(2) or "s"]


def _distill_config(args):
    import yaml
    from pydantic import ValidationError

    from edgekit.distill.pipeline import DistillConfig
    from edgekit.errors import ConfigError

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
    if not raw["student"].get("device") and not raw["student"].get("layers"):
        raw["student"]["device"] = "pi-zero-2w"
    if args.data:
        raw["data"]["sources"] = args.data
    if args.synthetic_prompts:
        raw["data"]["synthetic_prompts"] = args.synthetic_prompts
    if args.steps:
        raw["train"].update(steps=args.steps, time_budget_s=None)
    if args.time_budget:
        raw["train"].update(time_budget_s=_parse_duration(args.time_budget), steps=None)
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
    from edgekit.distill.evaluate import to_markdown
    from edgekit.distill.pipeline import run

    summary = run(_distill_config(args), trust_remote_code=args.trust_remote_code)
    if args.json:
        _emit_json(summary)
        return 0
    s, t = summary["student"], summary["teacher"]
    print(f"teacher  {t['name']}: {_params(t['params'])} params")
    print(f"student  {s['layers']}L x {s['hidden_size']}, mlp {s['intermediate_size']}, {s['heads']}/{s['kv_heads']} "
          f"heads -> {_params(s['params'])} params ({s['fraction_of_teacher']:.0%} of the teacher, {s['init']} init)")
    tr = summary["training"]
    print(f"trained  {tr['steps']} steps, {tr['tokens_seen']} tokens in {tr['wall_s']:.0f}s "
          f"({tr['tokens_per_s']:.0f} tok/s)")
    if summary["cache"]:
        c = summary["cache"]
        print(f"cache    {c['mode']} k={c['k']}: {format_bytes(c['bytes'])}, {c['bytes_per_token']:.0f} bytes/token")
    print()
    print(to_markdown(summary["evaluation"]))
    print()
    for k, v in summary["artifacts"].items():
        if v:
            print(f"{k:<10} {v}")
    return 0


def cmd_eval(args) -> int:
    import json as _json

    from transformers import AutoTokenizer

    from edgekit.distill import data as data_stage
    from edgekit.distill.evaluate import evaluate, to_markdown
    from edgekit.models import resolve_teacher

    from edgekit.errors import ConfigError

    examples = data_stage.check_sources([Path(args.data)], key="--data")  # before any model is resolved
    model = resolve_teacher(args.model, trust_remote_code=args.trust_remote_code)
    teacher = resolve_teacher(args.against, trust_remote_code=args.trust_remote_code)
    for m in (model, teacher):
        if args.max_seq_len > m.arch.max_context:
            raise ConfigError(f"--max-seq-len {args.max_seq_len} is longer than {m.name} was trained for "
                              f"({m.arch.max_context} positions, max_position_embeddings in {m.path / 'config.json'}); "
                              f"pass --max-seq-len {m.arch.max_context} or less")
    tok = AutoTokenizer.from_pretrained(str(teacher.path))
    seqs = data_stage.tokenize_examples(examples, tok, args.max_seq_len)[:args.max_sequences]
    report = evaluate({model.name: model.path}, teacher.path, seqs, args.prompt or [], args.max_new_tokens)
    if args.json:
        print(_json.dumps(report, indent=2))
    else:
        print(to_markdown(report))
    return 0


def _export_config(args, require_quant: bool):
    from pydantic import ValidationError

    from edgekit.errors import ConfigError, RecipeError
    from edgekit.export.pipeline import ExportConfig

    if require_quant and not args.quant:
        raise RecipeError("edgekit quantize needs --quant (e.g. q4_k_m for gguf, int4 for onnx); "
                          "`edgekit export` without --quant writes the float model")
    raw = {"model": args.model, "format": args.format, "quant": args.quant, "calibrate": args.calibrate,
           "calibration": args.calibration or [], "threads": args.threads, "context": args.context,
           "trust_remote_code": args.trust_remote_code}
    if args.calibration_tokens:
        raw["calibration_tokens"] = args.calibration_tokens
    try:
        return ExportConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'options'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"export options: {problems}") from e


def _print_export(result: dict) -> None:
    m = result["manifest"]
    metrics = m["metrics"]
    verb = "reused" if result["reused"] else f"exported in {metrics.get('seconds', 0):.0f}s"
    print(f"{m['label']}  {m['source_model']['name']}  {verb}")
    print(f"file     {result['path']}/{m['model_file']}  ({format_bytes(metrics['size_bytes'])}, "
          f"{metrics['bits_per_weight']:.2f} bits/weight)")
    for fb in metrics.get("fallbacks") or []:
        print(f"fallback {fb['summary'] if isinstance(fb, dict) else fb}")
    if metrics.get("imatrix"):
        print(f"imatrix  {result['path']}/imatrix.safetensors")
    print(f"manifest {result['path']}/manifest.json")


def cmd_export(args, require_quant: bool = False) -> int:
    from edgekit.export.pipeline import run

    result = run(_export_config(args, require_quant))
    if args.json:
        _emit_json({"path": result["path"], "reused": result["reused"], **{k: result["manifest"].get(k) for k in (
            "label", "format", "quant", "calibrated", "model_file", "metrics", "config", "inputs")}})
    else:
        _print_export(result)
    return 0


def cmd_quantize(args) -> int:
    return cmd_export(args, require_quant=True)


def cmd_fidelity(args) -> int:
    from edgekit.models import resolve_teacher
    from edgekit.quantize.report import run, to_markdown

    reference = args.reference
    if reference is None:  # the model the first export was made from
        from edgekit.artifact import read_manifest

        reference = read_manifest(args.artifacts[0])["config"]["model_path"]
    ref = resolve_teacher(reference, trust_remote_code=args.trust_remote_code)
    report = run(ref.path, args.artifacts, texts=args.text, max_tokens=args.max_tokens, threads=args.threads)
    if args.json:
        _emit_json(report)
        return 0
    print(to_markdown(report))
    print(f"report   {report['path']}/report.md")
    return 0


def _fidelity_reports(paths: list[Path] | None) -> list[dict]:
    from edgekit.errors import ConfigError

    reports = []
    for p in paths or []:
        p = Path(p) / "report.json" if Path(p).is_dir() else Path(p)
        try:
            reports.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read fidelity report {p}: {e}; pass a fidelity-<id> folder or its "
                              "report.json (made by `edgekit fidelity`)") from e
    return reports


def _report_inputs(args, results: dict):
    """Devices to project onto and the architecture of the benchmarked model (from its source config)."""
    from edgekit.arch import Architecture
    from edgekit.devices import list_devices, load_device

    devices = [load_device(d) for d in args.device] if args.device else list_devices()
    arch = None
    for run in results["runs"]:
        src = run.get("artifact")
        if not src:
            continue
        src = Path(src)
        cfg = src / "config.json"
        if not cfg.is_file() and (src / "manifest.json").is_file():
            from edgekit.artifact import read_manifest

            cfg = Path(read_manifest(src).get("config", {}).get("model_path", "")) / "config.json"
        if cfg.is_file():
            arch = Architecture.from_hf_config(json.loads(cfg.read_text()), str(cfg))
            break
    return devices, arch


def cmd_bench(args) -> int:
    import time as _time

    from edgekit import artifact
    from edgekit.bench.measure import run_benchmark
    from edgekit.bench.report import to_markdown, write_report

    runtimes = [r for spec in args.runtimes or [] for r in spec.split(",") if r] or None
    # rows finished by an interrupted run of the same command are taken from its journal, not re-measured
    key = artifact.content_id([str(Path(a).resolve()) for a in args.artifacts], runtimes, args.repeats, args.warmup,
                              args.threads, args.prompt_lengths, args.decode_tokens, args.remote)
    journal = artifact.home() / "artifacts" / f".bench-{key}.journal.jsonl"
    results = run_benchmark(args.artifacts, runtimes, repeats=args.repeats, warmup=args.warmup,
                            threads=args.threads, prompt_lengths=tuple(args.prompt_lengths),
                            decode_tokens=args.decode_tokens, remote=args.remote, journal=journal)
    devices, arch = _report_inputs(args, results)
    out = args.out or artifact.home() / "artifacts" / (
        "bench-" + artifact.content_id([str(a) for a in args.artifacts], _time.time()))
    out.mkdir(parents=True, exist_ok=True)
    paths = write_report(results, out, _fidelity_reports(args.fidelity), devices=devices, arch=arch)
    journal.unlink(missing_ok=True)
    if args.json:
        _emit_json(json.loads(paths["json"].read_text()))
        return 0
    print(paths["markdown"].read_text() if paths.get("markdown") else to_markdown(results, []))
    for kind, p in paths.items():
        print(f"{kind:<9}{p}")
    return 0


def cmd_report(args) -> int:
    from edgekit.bench.report import write_report
    from edgekit.errors import ConfigError

    try:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {args.results}: {e}; pass the results.json `edgekit bench` wrote") from e
    try:
        devices, arch = _report_inputs(args, results)
        out = args.out or Path(args.results).parent
        out.mkdir(parents=True, exist_ok=True)
        paths = write_report(results, out, _fidelity_reports(args.fidelity), devices=devices, arch=arch)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{args.results} is not an edgekit benchmark result: {e}") from e
    if args.html:
        import shutil

        shutil.copyfile(paths["html"], args.html)
        paths["html"] = args.html
    for kind, p in paths.items():
        print(f"{kind:<9}{p}")
    return 0


def cmd_validate(args) -> int:
    from edgekit.recipe import validate_recipe

    results = {str(path): validate_recipe(Path(path)) for path in args.recipes}
    if args.json:
        _emit_json(results)
    else:
        for path, problems in results.items():
            print(f"{path}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
            for p in problems:
                print(f"  - {p}")
    return 2 if any(results.values()) else 0


def cmd_run(args) -> int:
    from edgekit.run import run

    record = run(Path(args.recipe), trust_remote_code=args.trust_remote_code)
    if args.json:
        _emit_json(record)
        return 0
    rows = [[st["stage"], "reused" if st["reused"] else "built", f"{st['seconds']:.0f}s", st["path"] or ""]
            for st in record["stages"]]
    print(_table(rows, ["stage", "", "time", "artifact"], right={2}))
    print(f"\n{record['name']} for {record['device']}: finished in {record['seconds']:.0f}s")
    for st in record["stages"]:
        if st["stage"] == "bench" and st.get("report"):
            print(f"report   {st['report']}")
        if st["stage"] == "bench" and not st.get("report") and st["path"]:
            print(f"report   {st['path']}/report.html")
        if st["stage"].startswith("package"):
            print(f"bundle   {st['path']}" + (f"  ({st['tarball']})" if st.get("tarball") else ""))
    return 0


def cmd_runs(args) -> int:
    from edgekit.run import list_artifacts

    rows = list_artifacts()
    if args.json:
        _emit_json(rows)
        return 0
    print(_table([[r["id"], r["stage"], r["created"], format_bytes(r["bytes"]), r["label"]] for r in rows],
                 ["artifact", "stage", "created", "size", "label"], right={3}))
    return 0


def cmd_show(args) -> int:
    from edgekit.artifact import read_manifest
    from edgekit.run import find_artifact

    _emit_json(read_manifest(find_artifact(args.id)))
    return 0


def cmd_package(args) -> int:
    from edgekit.package import package
    from edgekit.run import find_artifact

    from edgekit.artifact import read_manifest
    from edgekit.errors import ConfigError

    folder = find_artifact(args.artifact)
    fmt = read_manifest(folder).get("format")
    if args.format and fmt != args.format:
        raise ConfigError(f"{folder} is a {fmt} export, not {args.format}; package an export of that format "
                          f"(edgekit export MODEL --format {args.format}) or drop --format")
    fidelity = _fidelity_reports(args.fidelity)
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    result = package(folder, device=args.device, context=args.context, fidelity=fidelity[0] if fidelity else None,
                     bench=bench)
    if args.json:
        _emit_json(result)
        return 0
    for key in ("folder", "path", "tarball"):
        if result.get(key):
            print(f"{key:<9}{result[key]}")
    return 0


def cmd_verify(args) -> int:
    from edgekit.package import verify

    from edgekit.units import parse_bytes

    report = verify(Path(args.bundle), max_bytes=parse_bytes(args.max_size))
    if args.json:
        _emit_json(report)
    else:
        print(f"{args.bundle}: ok, {len(report.get('files', []))} files verified")
    return 0


def cmd_doctor(args) -> int:
    from edgekit.doctor import run_checks

    checks = run_checks(deep=args.deep)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        _emit_json([c.to_dict() for c in checks])
        return 1 if failed else 0
    label = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    print(_table([[label[c.status], c.name, c.detail] for c in checks], ["", "check", "detail"]))
    problems = [c for c in checks if c.status != "ok"]
    if problems:
        print()
    for c in problems:
        print(f"{label[c.status]} {c.name}: {c.detail}\n     fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in label}
    print(f"\n{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} problems")
    return 1 if failed else 0


# --------------------------------------------------------------------------- argv


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")

    p = argparse.ArgumentParser(prog="edgekit", parents=[common],
                                description="Distil, quantize, export, benchmark and package LLMs for small devices.")
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("devices", parents=[common], help="list device profiles (and this host)")
    d.add_argument("--json", action="store_true")
    d.add_argument("--no-host", action="store_true", help="skip detecting/measuring this machine")
    d.set_defaults(func=cmd_devices)

    def teacher_args(sp):
        sp.add_argument("--teacher", default="default",
                        help="'default' (embedded SmolLM2-135M-Instruct), an HF folder, a .gguf file or a hub id")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="DANGEROUS: allow a model folder's own Python code to run")

    t = sub.add_parser("teacher", parents=[common], help="resolve (convert if needed) and describe the teacher")
    teacher_args(t)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_teacher)

    pl = sub.add_parser("plan", parents=[common], help="size a student for each device's memory budget")
    teacher_args(pl)
    pl.add_argument("--device", action="append", help="device name, YAML path or 'host' (repeatable; default: all)")
    pl.add_argument("--format", default="gguf", help="gguf | onnx | executorch (default gguf)")
    pl.add_argument("--quant", default="q4_k_m", help="quant scheme of the format (default q4_k_m)")
    pl.add_argument("--context", type=int, default=2048, help="tokens of context to budget for (default 2048)")
    pl.add_argument("--target-decode-tok-s", type=float, default=None, help="minimum predicted decode speed")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    ds = sub.add_parser("distill", parents=[common], help="plan, prune, generate data, distil and evaluate a student")
    ds.add_argument("config", nargs="?", help="YAML with teacher/student/data/cache/train/eval sections (optional)")
    ds.add_argument("--teacher", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ds.add_argument("--trust-remote-code", action="store_true", help="DANGEROUS: allow a model's own Python code")
    ds.add_argument("--device", help="size the student for this device (default pi-zero-2w)")
    ds.add_argument("--quant", help="quant the planner sizes for")
    ds.add_argument("--context", type=int, help="context the planner sizes for")
    ds.add_argument("--init", choices=["minitron", "random"], help="student initialisation")
    ds.add_argument("--data", action="append", help="user data: JSONL, .txt/.md, or a datasets folder (repeatable)")
    ds.add_argument("--synthetic-prompts", type=int, help="prompts the teacher writes when there is no --data")
    ds.add_argument("--steps", type=int, help="optimizer steps")
    ds.add_argument("--time-budget", help="train for a wall-clock budget instead: 90s, 20m, 1h")
    ds.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl"])
    ds.add_argument("--temperature", type=float)
    ds.add_argument("--ce-weight", type=float, help="weight of hard-label cross-entropy next to the KD loss")
    ds.add_argument("--cache", choices=["topk", "sampled", "none"], help="teacher-logit cache mode; none: online")
    ds.add_argument("--compare-ce", action="store_true", help="also train a CE-only student for the same budget")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", parents=[common], help="perplexity, KL and top-1 agreement of a model vs a teacher")
    ev.add_argument("model", help="HF folder (e.g. a distilled student), .gguf, hub id or 'default'")
    ev.add_argument("--against", default="default", help="the teacher (default: the embedded one)")
    ev.add_argument("--data", required=True, help="held-out JSONL (e.g. heldout.jsonl of a data artifact)")
    ev.add_argument("--prompt", action="append", help="also generate greedily for this prompt (repeatable)")
    ev.add_argument("--max-sequences", type=int, default=200)
    ev.add_argument("--max-seq-len", type=int, default=512)
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--trust-remote-code", action="store_true")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    def export_args(sp, quant_help):
        sp.add_argument("model", nargs="?", default="default",
                        help="'default' (embedded teacher), a distilled student's folder, an HF folder, .gguf or hub id")
        sp.add_argument("--format", default="gguf", choices=["gguf", "onnx", "executorch"])
        sp.add_argument("--quant", help=quant_help)
        sp.add_argument("--context", type=int,
                        help="executorch: positions of the static KV cache (default 2048, at most the model's)")
        sp.add_argument("--calibrate", action="store_true",
                        help="calibrated 4-bit: importance matrix (gguf) or activation-aware int4 (onnx)")
        sp.add_argument("--calibration", action="append", type=Path, help="calibration text (JSONL/txt; repeatable)")
        sp.add_argument("--calibration-tokens", type=int, help="at most this many calibration tokens (default 30000)")
        sp.add_argument("--threads", type=int)
        sp.add_argument("--trust-remote-code", action="store_true", help="DANGEROUS: allow a model's own Python code")
        sp.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", parents=[common],
                        help="convert a model to GGUF, ONNX or ExecuTorch (float or quantized)")
    export_args(ex, "gguf: f32 | f16 (default) | bf16 | q8_0 | q4_k_m ...; onnx: fp32 (default) | int8 | int4 | "
                    "int4-b128; executorch: fp32 (default) | 8da8w | 8da4w")
    ex.set_defaults(func=cmd_export)
    qu = sub.add_parser("quantize", parents=[common],
                        help="quantize a model: llama.cpp (gguf), onnxruntime (onnx) or torchao (executorch)")
    export_args(qu, "required: q8_0 | q4_0 | q4_1 | q5_k_m | q4_k_m ... (gguf); int8 | int4 | int4-b128 (onnx); "
                    "8da8w | 8da4w (executorch)")
    qu.set_defaults(func=cmd_quantize)

    fi = sub.add_parser("fidelity", parents=[common],
                        help="ppl, KL and top-1 of exports vs the full-precision PyTorch model; greedy parity")
    fi.add_argument("artifacts", nargs="+", type=Path, help="export artifact folders")
    fi.add_argument("--reference", help="full-precision model (default: the one the first export came from)")
    fi.add_argument("--text", action="append", type=Path, help="held-out text (JSONL/txt; default: bundled set)")
    fi.add_argument("--max-tokens", type=int, default=16_384)
    fi.add_argument("--threads", type=int)
    fi.add_argument("--trust-remote-code", action="store_true")
    fi.add_argument("--json", action="store_true")
    fi.set_defaults(func=cmd_fidelity)

    be = sub.add_parser("bench", parents=[common],
                        help="measure exports on every installed runtime; project to devices; JSON/MD/HTML report")
    be.add_argument("artifacts", nargs="+", type=Path, help="export artifact folders (or HF folders for PyTorch)")
    be.add_argument("--runtimes", action="append", help="comma-separated subset: llama.cpp,onnxruntime,"
                    "onnxruntime-genai,executorch,pytorch (default: all that can run each format)")
    be.add_argument("--device", action="append", help="project onto this device (repeatable; default: all profiles)")
    be.add_argument("--repeats", type=int, default=5)
    be.add_argument("--warmup", type=int, default=1)
    be.add_argument("--threads", type=int, help="threads per runtime (default: physical cores)")
    be.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512])
    be.add_argument("--decode-tokens", type=int, default=128)
    be.add_argument("--fidelity", action="append", type=Path, help="fidelity report(s) to join quality columns from")
    be.add_argument("--remote", help="user@host: run the same worker over ssh (artifacts at the same paths there)")
    be.add_argument("--out", type=Path, help="report folder (default: $EDGEKIT_HOME/artifacts/bench-<id>)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    re_ = sub.add_parser("report", parents=[common], help="re-render a benchmark's Markdown/HTML report")
    re_.add_argument("results", type=Path, help="results.json written by `edgekit bench`")
    re_.add_argument("--html", type=Path, help="also copy the HTML report here")
    re_.add_argument("--fidelity", action="append", type=Path)
    re_.add_argument("--device", action="append")
    re_.add_argument("--out", type=Path, help="folder for results.json/report.md/report.html (default: beside it)")
    re_.set_defaults(func=cmd_report)

    va = sub.add_parser("validate", parents=[common], help="check recipes without running them (every problem)")
    va.add_argument("recipes", nargs="+")
    va.add_argument("--json", action="store_true")
    va.set_defaults(func=cmd_validate)

    ru = sub.add_parser("run", parents=[common], help="run a recipe: distill, export, fidelity, bench, package")
    ru.add_argument("recipe")
    ru.add_argument("--trust-remote-code", action="store_true", help="DANGEROUS: allow a model's own Python code")
    ru.add_argument("--json", action="store_true")
    ru.set_defaults(func=cmd_run)

    rs = sub.add_parser("runs", parents=[common], help="list the artifacts in the store")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", parents=[common], help="print an artifact's manifest")
    sh.add_argument("id", help="artifact id (e.g. export-1a2b…), a unique prefix, or a folder")
    sh.set_defaults(func=cmd_show)

    pk = sub.add_parser("package", parents=[common], help="bundle an export for an app (folder + .tar.gz)")
    pk.add_argument("artifact", help="export artifact id or folder")
    pk.add_argument("--format", choices=["gguf", "onnx", "executorch"],
                    help="the export's format (checked; the artifact decides)")
    pk.add_argument("--device", help="device the bundle is built for (memory fit in the manifest)")
    pk.add_argument("--context", type=int, default=2048)
    pk.add_argument("--fidelity", action="append", type=Path, help="fidelity report to take quality figures from")
    pk.add_argument("--bench", help="results.json of `edgekit bench` to take speed figures from")
    pk.add_argument("--json", action="store_true")
    pk.set_defaults(func=cmd_package)

    ve = sub.add_parser("verify", parents=[common], help="check a bundle (folder or .tar.gz): hashes, safe paths")
    ve.add_argument("bundle")
    ve.add_argument("--max-size", default="64GiB",
                    help="refuse an archive whose members add up to more than this (default 64GiB)")
    ve.add_argument("--json", action="store_true")
    ve.set_defaults(func=cmd_verify)

    dr = sub.add_parser("doctor", parents=[common], help="check the installation and the cache, and say what to fix",
                        description="Check Python, every runtime edgekit imports (versions against requirements.lock), "
                                    "the embedded teacher and its converted cache, the artifact store, leftovers of "
                                    "killed runs, disk space, EDGEKIT_HOME, running jobs and the CPU. Exit code 0 when "
                                    "no check failed (warnings included), 1 when any check failed.")
    dr.add_argument("--deep", action="store_true",
                    help="re-hash the teacher cache and every artifact, and import each runtime's full entry points "
                         "(slower; by default file sizes are compared with the manifests)")
    dr.add_argument("--json", action="store_true", help="a list of {name, status, detail, fix}")
    dr.set_defaults(func=cmd_doctor)
    return p


# Commands that write into the artifact store (converting the teacher counts); they take the store lock.
WRITERS = {"teacher", "distill", "eval", "export", "quantize", "fidelity", "bench", "run", "package"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read by transformers at import
        for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock", "gguf", "optimum", "onnxruntime",
                      "torchao", "executorch", "torch", "torch.utils._pytree"):  # torch resets its root logger
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")
    from edgekit import progress

    progress.set_enabled(not args.quiet)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command in WRITERS:  # one writer per artifact store; the second waits and says for whom
            from edgekit import artifact

            with artifact.locked(artifact.STORE_LOCK):
                return args.func(args)
        return args.func(args)
    except EdgekitError as e:
        if args.debug:
            raise
        print(f"edgekit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk inside a library's own writer (safetensors, onnx, llama.cpp ...)
        from edgekit import artifact

        if args.debug or e.errno not in artifact.DISK_FULL:
            raise
        print(f"edgekit: error: {artifact.disk_error(e, Path(e.filename or artifact.home()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgekit: interrupted; finished artifacts are kept, re-run to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `edgekit plan | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
