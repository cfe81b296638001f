"""The export stage: one model in, one runtime-ready artifact folder out.

``run(cfg)`` resolves the model (the embedded teacher, a distilled student's
artifact folder, any HF Llama folder, a ``.gguf`` or a hub id), converts it to
the requested format and quantization, and writes
``$EDGEKIT_HOME/artifacts/export-<id>/`` with ``manifest.json``. The id hashes
the resolved config and the model's identity, so asking twice for the same
export reuses the folder, and a changed model or key never reuses stale output.

- GGUF: the float model is written with ``gguf``'s writer (f32 as the quantizer's
  source), then llama.cpp's own quantizer makes the requested type. ``calibrate``
  computes an importance matrix from calibration text first (llama.cpp's imatrix).
- ONNX: optimum exports the decoder with its KV cache; onnxruntime's quantization
  tools make int8 / int4; ``calibrate`` picks the activation-aware int4 variant.
- ExecuTorch: ``torch.export`` of a static-KV-cache decoder, torchao weight quantization
  (8da8w / 8da4w) and ExecuTorch's XNNPACK lowering, for ``context`` positions.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from edgekit import artifact
from edgekit.errors import RecipeError
from edgekit.export.config import DEFAULT_CALIBRATION, GGUF_FLOATS, ExportConfig

log = logging.getLogger(__name__)

# Bump when an exporter's output changes for the same config, so older artifacts are not reused.
EXPORTER_VERSION = {"gguf": 1, "onnx": 3, "executorch": 2}


def calibration_texts(paths: list[Path], tokenizer, max_tokens: int) -> list[str]:
    """Rendered calibration texts (chat examples through the chat template), up to ``max_tokens`` tokens."""
    from edgekit.distill.data import load_examples, render_text

    examples = load_examples(paths or [DEFAULT_CALIBRATION], key="--calibration")
    texts, total = [], 0
    for e in examples:
        if "messages" in e and e["messages"][-1]["role"] != "assistant":
            continue
        text = render_text(e, tokenizer)
        texts.append(text)
        total += len(tokenizer(text, add_special_tokens=False).input_ids)
        if total >= max_tokens:
            break
    if not texts:
        raise RecipeError(f"no calibration text in {', '.join(map(str, paths))}: give JSONL/txt files with "
                          "'text' records or finished chats")
    return texts


def _files(path: Path) -> list[Path]:
    """A calibration source's files: itself, or every file under a folder in sorted order."""
    return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


def artifact_dir(cfg: ExportConfig, model_id: str) -> Path:
    key = cfg.model_dump(mode="json", exclude={"model", "threads", "trust_remote_code"})
    key["exporter"] = EXPORTER_VERSION[cfg.format]
    if key.get("context") is None:  # only executorch has one; keeps gguf/onnx ids as they were
        key.pop("context", None)
    key["calibration"] = [artifact.sha256_file(f) for p in (cfg.calibration or [DEFAULT_CALIBRATION])
                          for f in _files(Path(p))] if cfg.calibrate else []
    return artifact.home() / "artifacts" / f"export-{artifact.content_id('export', key, model_id)}"


def space_needed(cfg: ExportConfig, params: int) -> int:
    """A generous estimate of the bytes an export writes at its peak (intermediate files included).

    GGUF floats write the file once; quantized GGUF first writes an f32 GGUF for the quantizer;
    ONNX and ExecuTorch hold an fp32 copy of the weights next to the result while they work.
    """
    bytes_per_weight = {"f32": 4.0, "f16": 2.0, "bf16": 2.0}
    if cfg.format == "gguf":
        peak = params * bytes_per_weight.get(cfg.quant, 4.0 + 1.1)
    else:
        peak = params * 8.0
    return int(peak * 1.1) + (1 << 20)  # + tokenizer, config and manifest


def run(cfg: ExportConfig) -> dict:
    """Export (reusing an intact earlier export); returns ``{"path", "reused", "manifest"}``."""
    from edgekit.models import resolve_teacher

    if cfg.calibrate and cfg.calibration:  # bad calibration files fail here, before the model is resolved
        from edgekit.distill.data import check_sources

        check_sources(cfg.calibration, key="--calibration")
    model = resolve_teacher(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model_id = artifact.folder_id(model.path)
    out = artifact_dir(cfg, model_id)
    if (out / artifact.MANIFEST).is_file():
        problems = artifact.verify_manifest(out)
        if not problems:
            log.info("reusing %s", out)
            return {"path": str(out), "reused": True, "manifest": artifact.read_manifest(out)}
        log.warning("rebuilding %s: %s", out, "; ".join(problems[:3]))

    t0 = time.perf_counter()
    inputs = {"model": model_id}
    config = {**cfg.model_dump(mode="json"), "model_path": str(model.path), "model_name": model.name}
    needed = space_needed(cfg, model.arch.params)
    artifact.require_space(out, needed, f"the {cfg.label} export of {model.name}")
    with artifact.atomic_dir(out, needed) as tmp:
        texts = None
        if cfg.calibrate:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model.path))
            texts = calibration_texts(cfg.calibration, tok, cfg.calibration_tokens)
        if cfg.format == "gguf":
            summary = _export_gguf(cfg, model, tmp, texts)
        elif cfg.format == "onnx":
            summary = _export_onnx(cfg, model, tmp, texts)
        else:
            summary = _export_executorch(cfg, model, tmp, texts)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["params"] = model.arch.params
        manifest = artifact.write_manifest(
            tmp, "export", config, inputs, metrics=summary,
            extra={"format": cfg.format, "quant": cfg.quant, "calibrated": cfg.calibrate, "label": cfg.label,
                   "model_file": summary["model_file"], "source_model": model.describe()},
        )
    log.info("exported %s to %s in %.0fs", cfg.label, out, time.perf_counter() - t0)
    return {"path": str(out), "reused": False, "manifest": manifest}


def _export_gguf(cfg: ExportConfig, model, tmp: Path, texts: list[str] | None) -> dict:
    from edgekit.export.gguf import export_gguf
    from edgekit.quantize.gguf import compute_imatrix, quantize_gguf, save_imatrix

    meta = {"name": model.name, "license": model.license, "teacher": model.origin}
    final = tmp / "model.gguf"
    if cfg.quant in GGUF_FLOATS:
        written = export_gguf(model.path, final, cfg.quant, **meta)
        return {"model_file": final.name, "size_bytes": final.stat().st_size, "export": written,
                "bits_per_weight": 8 * final.stat().st_size / model.arch.params}
    source = tmp / "source-f32.gguf.tmp"  # the quantizer's input; deleted before the manifest is written
    try:
        export_gguf(model.path, source, "f32", **meta)
        imatrix = None
        if texts is not None:
            imatrix = compute_imatrix(model.path, texts, max_tokens=cfg.calibration_tokens)
            save_imatrix(tmp / "imatrix.safetensors", imatrix, {"texts": len(texts), "model": model.name})
        report = quantize_gguf(source, final, cfg.quant, imatrix=imatrix, nthreads=cfg.threads)
        artifact.fault_point("quantize.done")
        # the quantizer saw temporary paths; record what they are once the folder is renamed into place
        report.update(path=final.name, source=f"f32 GGUF of {model.path} (temporary, deleted)")
    finally:
        source.unlink(missing_ok=True)
    artifact.atomic_write_text(tmp / "quant_report.json", _json(report))
    return {"model_file": final.name, "size_bytes": final.stat().st_size,
            "bits_per_weight": report["bits_per_weight"], "fallbacks": report["fallbacks"],
            "imatrix": texts is not None}


def _export_onnx(cfg: ExportConfig, model, tmp: Path, texts: list[str] | None) -> dict:
    from edgekit.export.onnx import export_onnx

    work = tmp / "onnx"
    summary = export_onnx(model.path, work, cfg.exporter_quant, calibration_texts=texts)
    for p in work.iterdir():  # flatten: the artifact folder is the ONNX folder
        shutil.move(str(p), tmp / p.name)
    work.rmdir()
    size = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model.onnx"))
    return {"model_file": "model.onnx", "size_bytes": size, "bits_per_weight": 8 * size / model.arch.params,
            "export": summary}


def _export_executorch(cfg: ExportConfig, model, tmp: Path, texts: list[str] | None) -> dict:
    from edgekit.export.executorch import DEFAULT_CONTEXT, MODEL_FILE, export_executorch

    work = tmp / "executorch"
    summary = export_executorch(model.path, work, cfg.quant, context=cfg.context or DEFAULT_CONTEXT,
                                calibration_texts=texts)
    for p in work.iterdir():  # flatten: the artifact folder is the ExecuTorch folder
        shutil.move(str(p), tmp / p.name)
    work.rmdir()
    size = (tmp / MODEL_FILE).stat().st_size
    return {"model_file": MODEL_FILE, "size_bytes": size, "bits_per_weight": 8 * size / model.arch.params,
            "context": summary["context"], "export": summary}


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str) + "\n"
