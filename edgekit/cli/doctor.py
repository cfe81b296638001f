"""``edgekit doctor``: check the installation and the cache, and say what to fix."""

from __future__ import annotations

from edgekit.cli.output import emit_json, table
from edgekit.doctor import run_checks


def add_commands(sub, common) -> None:
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


def cmd_doctor(args) -> int:
    checks = run_checks(deep=args.deep)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        emit_json([c.to_dict() for c in checks])
        return 1 if failed else 0
    label = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    print(table([[label[c.status], c.name, c.detail] for c in checks], ["", "check", "detail"]))
    problems = [c for c in checks if c.status != "ok"]
    if problems:
        print()
    for c in problems:
        print(f"{label[c.status]} {c.name}: {c.detail}\n     fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in label}
    print(f"\n{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} problems")
    return 1 if failed else 0
