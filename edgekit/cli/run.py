"""``edgekit validate``, ``edgekit run``, ``edgekit runs`` and ``edgekit show``: recipes and the artifact store."""

from __future__ import annotations

from pathlib import Path

from edgekit import run as runner
from edgekit.artifact import read_manifest
from edgekit.cli.output import emit_json, table
from edgekit.units import format_bytes
from edgekit.validate import validate_recipe


def add_commands(sub, common) -> None:
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


def cmd_validate(args) -> int:
    results = {str(path): validate_recipe(Path(path)) for path in args.recipes}
    if args.json:
        emit_json(results)
    else:
        for path, problems in results.items():
            print(f"{path}: " + (f"{len(problems)} problem(s)" if problems else "ok"))
            for p in problems:
                print(f"  - {p}")
    return 2 if any(results.values()) else 0


def cmd_run(args) -> int:
    record = runner.run(Path(args.recipe), trust_remote_code=args.trust_remote_code)
    if args.json:
        emit_json(record)
        return 0
    rows = [[st["stage"], "reused" if st["reused"] else "built", f"{st['seconds']:.0f}s", st["path"] or ""]
            for st in record["stages"]]
    print(table(rows, ["stage", "", "time", "artifact"], right={2}))
    print(f"\n{record['name']} for {record['device']}: finished in {record['seconds']:.0f}s")
    for st in record["stages"]:
        if st["stage"] == "bench" and st.get("report"):
            print(f"report   {st['report']}")
        if st["stage"] == "bench" and not st.get("report") and st["path"]:
            print(f"report   {st['path']}/report.html")
        if st["stage"].startswith("package"):
            print(f"bundle   {st['path']}" + (f"  ({st['tarball']})" if st.get("tarball") else ""))
    if record.get("against_teacher"):
        print_against_teacher(record["against_teacher"])
    return 0


def print_against_teacher(summary: dict) -> None:
    """What ships, scored against the teacher: one row per model, then every model's answer to each question."""
    rows = [[r["model"], format_bytes(r["size_bytes"]) if r.get("size_bytes") else "-", f"{r['perplexity']:.3f}",
             f"{r['kl_to_teacher']:.4f}", f"{100 * r['top1_vs_teacher']:.1f}%"] for r in summary["rows"]]
    tokens = f"{summary['tokens']} answer tokens of " if summary.get("tokens") else ""
    print(f"\nagainst the teacher {summary['teacher']} on {tokens}held-out {', '.join(summary['texts'])}:")
    print(table(rows, ["model", "size", "ppl", "KL to teacher", "top-1 vs teacher"], right={1, 2, 3, 4}))
    for q in summary["answers"]:
        print(f"\n{q['question']}")
        for label, text in q["answers"].items():
            one_line = " ".join(text.split()) or repr(text[:40])  # only whitespace: show which
            print(f"  {label}: {one_line[:160] + ('…' if len(one_line) > 160 else '')}")


def cmd_runs(args) -> int:
    rows = runner.list_artifacts()
    if args.json:
        emit_json(rows)
        return 0
    print(table([[r["id"], r["stage"], r["created"], format_bytes(r["bytes"]), r["label"]] for r in rows],
                ["artifact", "stage", "created", "size", "label"], right={3}))
    return 0


def cmd_show(args) -> int:
    emit_json(read_manifest(runner.find_artifact(args.id)))
    return 0
