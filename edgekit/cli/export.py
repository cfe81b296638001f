"""``edgekit export`` and ``edgekit quantize``: one model in, one runtime-ready artifact out."""

from __future__ import annotations

from pathlib import Path

from edgekit.arch import DEFAULT_CONTEXT
from edgekit.cli.options import config_from, default
from edgekit.cli.output import emit_json
from edgekit.errors import RecipeError
from edgekit.export import pipeline
from edgekit.export.config import ExportConfig
from edgekit.units import format_bytes


def add_commands(sub, common) -> None:
    def export_args(sp, quant_help):
        sp.add_argument("model", nargs="?",
                        help="'default' (embedded teacher), a distilled student's folder, an HF folder, .gguf or hub id")
        sp.add_argument("--format", help="a registered format: gguf, onnx, executorch or a plugin's (`edgekit doctor` "
                                         f"lists them); default {default(ExportConfig, 'format')}")
        sp.add_argument("--quant", help=quant_help)
        sp.add_argument("--context", type=int,
                        help=f"executorch: positions of the static KV cache (default {DEFAULT_CONTEXT}, at most the "
                             "model's)")
        sp.add_argument("--calibrate", action="store_true",
                        help="calibrated 4-bit: importance matrix (gguf) or AWQ scaling + GPTQ rounding int4 (onnx)")
        sp.add_argument("--target", help="with --quant auto: the weights' size ('90MB') or bits per weight "
                                         "('4.8bpw') to fit with the least measured KL; default: the size of "
                                         "gguf q4_k_m / onnx int4 / executorch 8da4w")
        sp.add_argument("--calibration", action="append", type=Path, help="calibration text (JSONL/txt; repeatable)")
        sp.add_argument("--calibration-tokens", type=int, help="at most this many calibration tokens (default "
                                                               f"{default(ExportConfig, 'calibration_tokens')})")
        sp.add_argument("--threads", type=int)
        sp.add_argument("--trust-remote-code", action="store_true", help="DANGEROUS: allow a model's own Python code")
        sp.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", parents=[common],
                        help="convert a model to GGUF, ONNX or ExecuTorch (float or quantized)")
    export_args(ex, "gguf: f32 | f16 (default) | bf16 | q8_0 | q4_k_m ...; onnx: fp32 (default) | int8 | int4 | "
                    "int4-b128; executorch: fp32 (default) | 8da8w | 8da4w; auto (every format): types per "
                    "tensor for --target")
    ex.set_defaults(func=cmd_export)
    qu = sub.add_parser("quantize", parents=[common],
                        help="quantize a model: llama.cpp (gguf), onnxruntime (onnx) or torchao (executorch)")
    export_args(qu, "required: q8_0 | q4_0 | q4_1 | q5_k_m | q4_k_m ... (gguf); int8 | int4 | int4-b128 (onnx); "
                    "8da8w | 8da4w (executorch)")
    qu.set_defaults(func=cmd_quantize)


def _export_config(args, require_quant: bool) -> ExportConfig:
    if require_quant and not args.quant:
        raise RecipeError("edgekit quantize needs --quant (e.g. q4_k_m for gguf, int4 for onnx); "
                          "`edgekit export` without --quant writes the float model")
    return config_from(ExportConfig, "export options", model=args.model, format=args.format, quant=args.quant,
                       calibrate=args.calibrate, target=args.target, calibration=args.calibration,
                       calibration_tokens=args.calibration_tokens,
                       threads=args.threads, context=args.context, trust_remote_code=args.trust_remote_code)


def _print_export(result: dict) -> None:
    m = result["manifest"]
    metrics = m["metrics"]
    verb = "reused" if result["reused"] else f"exported in {metrics.get('seconds', 0):.0f}s"
    print(f"{m['label']}  {m['source_model']['name']}  {verb}")
    print(f"file     {result['path']}/{m['model_file']}  ({format_bytes(metrics['size_bytes'])}, "
          f"{metrics['bits_per_weight']:.2f} bits/weight)")
    for fb in metrics.get("fallbacks") or []:
        print(f"fallback {fb['summary'] if isinstance(fb, dict) else fb}")
    if metrics.get("auto"):
        a = metrics["auto"]
        print(f"auto     {', '.join(f'{n} {t}' for t, n in a['types'].items())} (predicted KL {a['predicted_kl']:.4f}, "
              f"budget {format_bytes(a['budget_bytes'])})")
    if metrics.get("imatrix"):
        print(f"imatrix  {result['path']}/imatrix.safetensors")
    print(f"manifest {result['path']}/manifest.json")


def cmd_export(args, require_quant: bool = False) -> int:
    result = pipeline.run(_export_config(args, require_quant))
    if args.json:
        emit_json({"path": result["path"], "reused": result["reused"], **{k: result["manifest"].get(k) for k in (
            "label", "format", "quant", "calibrated", "model_file", "metrics", "config", "inputs")}})
    else:
        _print_export(result)
    return 0


def cmd_quantize(args) -> int:
    return cmd_export(args, require_quant=True)
