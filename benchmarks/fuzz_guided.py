"""Coverage-guided fuzzing of one of edgekit's parsers with atheris (libFuzzer's engine for Python code).

    pip install "atheris>=3,<4"          # or: pip install -e ".[fuzz]"
    python benchmarks/fuzz_guided.py --target gguf [--runs 200000] [--seed 1] [-- LIBFUZZER_FLAGS...]

The targets, seeds and rule are the test suite's (tests/fuzz; benchmarks/fuzz.py runs them with a plain mutation
fuzzer): every input ends accepted or with edgekit's own error, under --max-seconds, writing nothing beside its input.
Here edgekit's modules are instrumented, and libFuzzer keeps the inputs that reach new branches of them and mutates
those, starting from the target's seeds. An input that raises anything else is a crash: its bytes and traceback go
to benchmarks/out/fuzz-guided/<target>/ and the run stops there (libFuzzer's rule). A slow case or a stray file is
recorded and the run goes on. At the end (--runs inputs) it prints the counts and libFuzzer's coverage line, and
writes benchmarks/out/fuzz-guided-<target>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _Hang(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--runs", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1.0, help="a case slower than this is a finding")
    ap.add_argument("--hang-seconds", type=float, default=10.0, help="a case is stopped (and a finding) after this")
    ap.add_argument("--memory", type=int, default=4 * 2**30,
                    help="bytes of address space a case may add (Linux; 0: no cap)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args, fuzzer_flags = ap.parse_known_args()
    try:
        import atheris
    except ImportError:
        sys.exit('benchmarks/fuzz_guided.py needs atheris: pip install "atheris>=3,<4" (or pip install -e ".[fuzz]")')

    # Instrument edgekit's modules as they are imported: every edgekit import of this run happens from here to the
    # end of the warm-up below (the target's own imports, its seeds' and the warm-up run's), so none stays blind.
    instrumenting = atheris.instrument_imports(include=["edgekit"])
    instrumenting.__enter__()
    from edgekit.devices import cpu_name
    from edgekit.errors import EdgekitError
    from tests.fuzz.targets import TARGETS

    if args.target not in TARGETS:
        sys.exit(f"unknown target {args.target!r}; choose from {', '.join(TARGETS)}")
    target = TARGETS[args.target]
    work = Path(tempfile.mkdtemp(prefix=f"edgekit-guided-{target.name}-"))
    os.environ["EDGEKIT_HOME"] = str(work / "store")
    case_dir, corpus = work / "case", work / "corpus"
    case_dir.mkdir()
    corpus.mkdir()
    for name, content in target.extra.items():
        (case_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (case_dir / name).write_bytes(content)
    path = case_dir / (target.filename or f"input{target.suffix}")
    allowed = {path.name, *(Path(n).parts[0] for n in target.extra)}
    seeds = [s for s in target.seeds() if s is not None]
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    os.chdir(case_dir)
    findings_dir = Path(args.out) / "fuzz-guided" / target.name
    stats = {"target": target.name, "cases": 0, "accepted": 0, "refused": 0, "crashes": 0, "slow": 0, "wrote": 0,
             "max_case_seconds": 0.0}
    started = time.perf_counter()

    def finish(code: int) -> None:
        stats["seconds"] = round(time.perf_counter() - started, 1)
        stats["cases_per_s"] = round(stats["cases"] / max(stats["seconds"], 1e-9))
        stats["max_case_seconds"] = round(stats["max_case_seconds"], 4)
        out = Path(args.out) / f"fuzz-guided-{target.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(),
                                   "command": " ".join(sys.argv), "engine": f"atheris {atheris.__version__}"
                                   if hasattr(atheris, "__version__") else "atheris", **stats}, indent=2) + "\n")
        print(f"\n{json.dumps(stats)}\nwritten to {out}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        os._exit(code)  # libFuzzer's loop does not return to Python

    def finding(kind: str, data: bytes, detail: str) -> None:
        findings_dir.mkdir(parents=True, exist_ok=True)
        stem = findings_dir / f"{kind}-case{stats['cases']}"
        stem.with_suffix(".bin").write_bytes(data)
        stem.with_suffix(".txt").write_text(detail)

    def one(data: bytes) -> None:
        path.write_bytes(data)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.hang_seconds)
        try:
            target.run(path)
            stats["accepted"] += 1
        except EdgekitError:
            stats["refused"] += 1
        except _Hang:
            stats["slow"] += 1
            finding("hang", data, f"stopped after {args.hang_seconds} s")
        except Exception:  # noqa: BLE001 -- a crash: keep it, then stop as libFuzzer does
            stats["crashes"] += 1
            finding("crash", data, traceback.format_exc())
            stats["cases"] += 1
            print(traceback.format_exc(), file=sys.stderr)
            finish(1)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        took = time.perf_counter() - t0
        stats["max_case_seconds"] = max(stats["max_case_seconds"], took)
        if took > args.max_seconds:
            stats["slow"] += 1
            finding("slow", data, f"{took:.3f} s")
        stray = [p for p in case_dir.iterdir() if p.name not in allowed]
        if stray:
            stats["wrote"] += 1
            finding("wrote", data, ", ".join(p.name for p in stray))
            for p in stray:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        stats["cases"] += 1
        if stats["cases"] >= args.runs:
            finish(0)

    def on_alarm(signum, frame):
        raise _Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    path.write_bytes(seeds[0])
    try:  # untimed: it pays for imports and caches
        target.run(path)
    except EdgekitError:
        pass
    except Exception:  # noqa: BLE001 -- a seed that crashes is a finding like any other
        stats["crashes"] += 1
        finding("crash", seeds[0], traceback.format_exc())
        print(traceback.format_exc(), file=sys.stderr)
        finish(1)
    instrumenting.__exit__(None, None, None)
    # Memory: an address-space cap of --memory over what the process holds now, so an allocation out of proportion to
    # the input is a MemoryError (a crash above). Not libFuzzer's -rss_limit_mb: it reads ru_maxrss, which survives
    # exec, so a child of a big process (pytest after the suite) starts "over the limit". No -timeout either: the
    # SIGALRM handler above stops a hung case, and libFuzzer would warn that it cannot.
    if args.memory:
        import resource

        with open("/proc/self/statm") as f:
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + args.memory, held + args.memory))
    atheris.Setup([sys.argv[0], f"-seed={args.seed}", "-rss_limit_mb=0", *fuzzer_flags, str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
