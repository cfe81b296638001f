"""``edgekit package`` and ``edgekit verify``: app bundles."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.arch import DEFAULT_CONTEXT
from edgekit.artifact import read_manifest
from edgekit.cli.bench import fidelity_reports
from edgekit.cli.output import emit_json
from edgekit.errors import ConfigError
from edgekit.package import package, verify
from edgekit.run import find_artifact
from edgekit.units import parse_bytes


def add_commands(sub, common) -> None:
    pk = sub.add_parser("package", parents=[common], help="bundle an export for an app (folder + .tar.gz)")
    pk.add_argument("artifact", nargs="+", help="export artifact id or folder; several with --layout hf (one "
                                                "repository of one model's exports, each in its own folder)")
    pk.add_argument("--format", help="the export's format (checked; the artifact decides)")
    pk.add_argument("--layout", default="app", help="bundle layout: app (model, tokenizer, Python example loader; "
                                                    "the default), ollama (GGUF + Modelfile), hf (a Hugging Face "
                                                    "model repo: float model + the export in a subfolder) or "
                                                    "ort-package (ONNX: an ONNX Runtime model package); plugins add "
                                                    "more")
    pk.add_argument("--providers", help="ort-package: execution providers beside the CPU, comma-separated (cuda, "
                                        "dml, webgpu); default: cuda when --device has an NVIDIA GPU")
    pk.add_argument("--device", help="device the bundle is built for (memory fit in the manifest)")
    pk.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
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


def cmd_package(args) -> int:
    folders = [find_artifact(a) for a in args.artifact]
    for folder in folders:
        fmt = read_manifest(folder).get("format")
        if args.format and fmt != args.format:
            raise ConfigError(f"{folder} is a {fmt} export, not {args.format}; package an export of that format "
                              f"(edgekit export MODEL --format {args.format}) or drop --format")
    fidelity = fidelity_reports(args.fidelity)
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    result = package(folders[0], also=folders[1:], device=args.device, context=args.context,
                     fidelity=fidelity[0] if fidelity else None,
                     bench=bench, layout=args.layout,
                     providers=[p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None)
    if args.json:
        emit_json(result)
        return 0
    for key in ("folder", "path", "tarball"):
        if result.get(key):
            print(f"{key:<9}{result[key]}")
    return 0


def cmd_verify(args) -> int:
    report = verify(Path(args.bundle), max_bytes=parse_bytes(args.max_size))
    if args.json:
        emit_json(report)
    else:
        print(f"{args.bundle}: ok, {len(report.get('files', []))} files verified")
    return 0
