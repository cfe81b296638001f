"""``edgekit fidelity``, ``edgekit bench`` and ``edgekit report``: what quantization costs, how fast it runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgekit import models
from edgekit.arch import Architecture
from edgekit.artifact import read_manifest
from edgekit.bench import stage as bench_stage
from edgekit.bench.config import BenchConfig
from edgekit.bench.report import write_report
from edgekit.cli.options import config_from, default
from edgekit.cli.output import emit_json
from edgekit.devices import list_devices, load_device
from edgekit.errors import ConfigError
from edgekit.quantize import report as fidelity_stage
from edgekit.quantize.config import FidelityConfig


def add_commands(sub, common) -> None:
    fi = sub.add_parser("fidelity", parents=[common],
                        help="ppl, KL and top-1 of exports vs the full-precision PyTorch model; greedy parity")
    fi.add_argument("artifacts", nargs="+", type=Path, help="export artifact folders")
    fi.add_argument("--reference", help="full-precision model (default: the one the first export came from)")
    fi.add_argument("--teacher", help="also score the reference and every export against this teacher (the model "
                    "the reference was distilled from: folder, hub id or 'default'), and answer fixed questions")
    fi.add_argument("--text", action="append", type=Path, help="held-out text (JSONL/txt; default: bundled set; "
                    "with --teacher, give the teacher's own held-out chats, e.g. heldout.jsonl of a data artifact)")
    fi.add_argument("--max-tokens", type=int, help=f"default {default(FidelityConfig, 'max_tokens')}")
    fi.add_argument("--threads", type=int)
    fi.add_argument("--trust-remote-code", action="store_true")
    fi.add_argument("--json", action="store_true")
    fi.set_defaults(func=cmd_fidelity)

    be = sub.add_parser("bench", parents=[common],
                        help="measure exports on every installed runtime; project to devices; JSON/MD/HTML report")
    be.add_argument("artifacts", nargs="+", type=Path, help="export artifact folders (or HF folders for PyTorch)")
    be.add_argument("--runtimes", action="append", help="comma-separated subset: llama.cpp,onnxruntime,"
                    "onnxruntime-genai,executorch,pytorch (default: all that can run each format); the browser "
                    "runtimes wllama (GGUF) and onnxruntime-web (ONNX) run only when named here")
    be.add_argument("--device", action="append", help="project onto this device (repeatable; default: all profiles)")
    be.add_argument("--repeats", type=int, help=f"default {default(BenchConfig, 'repeats')}")
    be.add_argument("--warmup", type=int, help=f"default {default(BenchConfig, 'warmup')}")
    be.add_argument("--threads", type=int, help="threads per runtime (default: physical cores)")
    be.add_argument("--prompt-lengths", type=int, nargs="+",
                    help=f"default {' '.join(map(str, default(BenchConfig, 'prompt_lengths')))}")
    be.add_argument("--decode-tokens", type=int, help=f"default {default(BenchConfig, 'decode_tokens')}")
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


def cmd_fidelity(args) -> int:
    reference = args.reference
    if reference is None:  # the model the first export was made from
        reference = read_manifest(args.artifacts[0])["config"]["model_path"]
    cfg = fidelity_config(args)
    ref = models.resolve_teacher(reference, trust_remote_code=args.trust_remote_code)
    teacher = models.resolve_teacher(args.teacher, trust_remote_code=args.trust_remote_code) if args.teacher else None
    report = fidelity_stage.run(ref.path, args.artifacts, texts=cfg.texts or None, max_tokens=cfg.max_tokens,
                                threads=args.threads, teacher=teacher.path if teacher else None)
    if args.json:
        emit_json(report)
        return 0
    print(fidelity_stage.to_markdown(report))
    print(f"report   {report['path']}/report.md")
    return 0


def fidelity_config(args) -> FidelityConfig:
    return config_from(FidelityConfig, "fidelity options", max_tokens=args.max_tokens, texts=args.text)


def bench_config(args) -> BenchConfig:
    runtimes = [r for spec in args.runtimes or [] for r in spec.split(",") if r] or None
    return config_from(BenchConfig, "bench options", runtimes=runtimes, repeats=args.repeats, warmup=args.warmup,
                       prompt_lengths=args.prompt_lengths, decode_tokens=args.decode_tokens, threads=args.threads)


def fidelity_reports(paths: list[Path] | None) -> list[dict]:
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
    devices = [load_device(d) for d in args.device] if args.device else list_devices()
    arch = None
    for run in results["runs"]:
        src = run.get("artifact")
        if not src:
            continue
        src = Path(src)
        cfg = src / "config.json"
        if not cfg.is_file() and (src / "manifest.json").is_file():
            cfg = Path(read_manifest(src).get("config", {}).get("model_path", "")) / "config.json"
        if cfg.is_file():
            arch = Architecture.from_hf_config(json.loads(cfg.read_text()), str(cfg))
            break
    return devices, arch


def cmd_bench(args) -> int:
    a = bench_stage.run(bench_config(args), args.artifacts, remote=args.remote,
                        devices=[load_device(d) for d in args.device] if args.device else list_devices(),
                        fidelity=fidelity_reports(args.fidelity), out=args.out)
    if args.json:
        emit_json(a.result)
        return 0
    print((a.path / "report.md").read_text())
    for kind, name in (("json", "results.json"), ("markdown", "report.md"), ("html", "report.html")):
        print(f"{kind:<9}{a.path / name}")
    return 0


def cmd_report(args) -> int:
    try:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {args.results}: {e}; pass the results.json `edgekit bench` wrote") from e
    try:
        devices, arch = _report_inputs(args, results)
        out = args.out or Path(args.results).parent
        out.mkdir(parents=True, exist_ok=True)
        paths = write_report(results, out, fidelity_reports(args.fidelity), devices=devices, arch=arch)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{args.results} is not an edgekit benchmark result: {e}") from e
    if args.html:
        shutil.copyfile(paths["html"], args.html)
        paths["html"] = args.html
    for kind, p in paths.items():
        print(f"{kind:<9}{p}")
    return 0
