"""The long fuzz run: many cases per parser, each parser in its own process, both cores busy.

    python benchmarks/fuzz.py [--cases 1000000] [--targets recipe,gguf,...] [--jobs 2] [--seed 1]

Runs tests/fuzz's targets (recipe and device YAML, JSONL/text data, chat templates, GGUF / safetensors / ONNX
headers, ExecuTorch .pte heads, bundle tarballs and manifests, units, CLI arguments) with the same rule as the test
suite's short runs: every case ends accepted or with edgekit's own error, under a second, writing nothing beside its
input. Each process also caps its address space (--memory, default 4 GiB over what it holds at start), so an
allocation out of proportion to the input is a MemoryError, i.e. a crash. Prints a Markdown table, writes benchmarks/out/fuzz.json
and every finding's input to benchmarks/out/fuzz/<target>/; a finding belongs in tests/robust/corpus/fuzz/ with
its fix.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.devices import cpu_name  # noqa: E402


def _one(job: tuple[str, int, int, int]) -> dict:
    name, cases, seed, memory = job
    from tests.fuzz.harness import fuzz
    from tests.fuzz.targets import TARGETS

    with tempfile.TemporaryDirectory(prefix=f"edgekit-fuzz-{name}-") as tmp:
        os.environ["EDGEKIT_HOME"] = str(Path(tmp) / "store")
        os.chdir(tmp)
        if memory:
            with open("/proc/self/statm") as f:
                held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (held + memory, held + memory))
        report = fuzz(TARGETS[name], cases, seed, Path(tmp) / "case", keep=50)
    out = ROOT / "benchmarks" / "out" / "fuzz" / name
    findings = [(kind, f) for kind in ("crashes", "slow", "wrote") for f in getattr(report, kind)]
    if findings:
        out.mkdir(parents=True, exist_ok=True)
        for kind, f in findings:
            (out / f"{kind}-seed{seed}-case{f['case']}.bin").write_bytes(f["input"])
    return {**report.summary(), "findings": [{"kind": k, **{x: v for x, v in f.items() if x != "input"},
                                              "input": repr(f["input"][:300])} for k, f in findings]}


def main() -> None:
    from tests.fuzz.targets import TARGETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1_000_000, help="cases per parser")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--memory", default="4GiB", help="address space each process may add while fuzzing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "fuzz.json"))
    args = ap.parse_args()
    from edgekit.units import parse_bytes

    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        sys.exit(f"unknown fuzz target {unknown[0]!r}: choose from {', '.join(TARGETS)}")
    t0 = time.perf_counter()
    jobs = [(n, args.cases, args.seed, parse_bytes(args.memory)) for n in names]
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:  # a fresh process (and limit) each
        rows = []
        for row in pool.imap_unordered(_one, jobs):
            rows.append(row)
            print(f"{row['target']}: {row['cases']} cases, {row['crashes']} crashes, {row['slow']} slow, "
                  f"{row['wrote']} wrote, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: names.index(r["target"]))
    print(f"\n{args.cases} cases per parser, seed {args.seed}, {args.jobs} processes; {cpu_name()}\n")
    print("| parser | cases | accepted | refused | crashes | over 1 s | wrote a file | slowest case | cases/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']} | {r['cases']:,} | {r['accepted']:,} | {r['refused']:,} | {r['crashes']} | {r['slow']} | "
              f"{r['wrote']} | {r['max_case_seconds'] * 1000:.1f} ms | {r['cases'] / max(r['seconds'], 1e-9):,.0f} |")
    ok = all(r["crashes"] == r["slow"] == r["wrote"] == 0 for r in rows)
    print(f"\ntarget (0 tracebacks, 0 cases over 1 s): {'met' if ok else 'MISSED'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "command": " ".join(sys.argv),
                               "rows": rows, "ok": ok, "wall_s": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
