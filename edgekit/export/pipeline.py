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
- ONNX: edgekit builds the fused decoder graph (GroupQueryAttention with the KV cache in
  place) from the safetensors; onnxruntime's quantization tools make int8 / int4; ``calibrate`` picks the activation-aware int4 variant.
- ExecuTorch: ``torch.export`` of a static-KV-cache decoder, torchao weight quantization
  (8da8w / 8da4w) and ExecuTorch's XNNPACK lowering, for ``context`` positions.

Formats are not listed here: ``format`` names a registered exporter (:mod:`edgekit.export.exporter`,
kind ``"exporter"`` of :mod:`edgekit.registry`) and ``quant`` one of that format's registered schemes,
so a plugin's format exports through this same stage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edgekit import artifact
from edgekit.export.calibration import calibration_texts
from edgekit.export.config import DEFAULT_CALIBRATION, ExportConfig, exporter
from edgekit.models import resolve_teacher
from edgekit.quantize.auto import VERSION as AUTO_VERSION
from edgekit.quantize.schemes import get_scheme
from edgekit.sources import check_sources

log = logging.getLogger(__name__)


def _files(path: Path) -> list[Path]:
    """A calibration source's files: itself, or every file under a folder in sorted order."""
    return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


def export_key(cfg: ExportConfig, model_id: str) -> tuple[dict, str]:
    """What identifies an export: the settings that change its files, the exporter's version, the model."""
    key = cfg.model_dump(mode="json", exclude={"model", "threads", "trust_remote_code"})
    key["exporter"] = exporter(cfg.format).version
    if key.get("context") is None:  # only executorch has one; keeps gguf/onnx ids as they were
        key.pop("context", None)
    if key.get("target") is None:  # only quant auto has one
        key.pop("target", None)
    if get_scheme(cfg.format, cfg.quant).options.get("auto"):  # a changed choice must not reuse older mixes
        key["auto"] = AUTO_VERSION
    key["calibration"] = [artifact.sha256_file(f) for p in (cfg.calibration or [DEFAULT_CALIBRATION])
                          for f in _files(Path(p))] if cfg.calibrate else []
    return key, model_id


def artifact_dir(cfg: ExportConfig, model_id: str) -> Path:
    return artifact.store_path("export", *export_key(cfg, model_id))


def space_needed(cfg: ExportConfig, params: int) -> int:
    """A generous estimate of the bytes an export writes at its peak (intermediate files included).

    The exporter says what it writes at its peak; by default an fp32 copy of the weights next to the result.
    """
    ex = exporter(cfg.format)
    peak = ex.space(cfg.quant, params) if ex.space is not None else params * 8.0
    return int(peak * 1.1) + (1 << 20)  # + tokenizer, config and manifest


def run(cfg: ExportConfig) -> artifact.Artifact:
    """Export (reusing an intact earlier export); ``a["path"]``, ``a["reused"]``, ``a["manifest"]`` as before."""
    if cfg.calibrate and cfg.calibration:  # bad calibration files fail here, before the model is resolved
        check_sources(cfg.calibration, key="--calibration")
    model = resolve_teacher(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model_id = artifact.folder_id(model.path)
    config = {**cfg.model_dump(mode="json"), "model_path": str(model.path), "model_name": model.name}
    with artifact.stage("export", config, {"model": model_id}, key=export_key(cfg, model_id),
                        needed=space_needed(cfg, model.arch.params),
                        what=f"the {cfg.label} export of {model.name}") as st:
        if st.reused:
            return st.artifact
        t0 = time.perf_counter()
        texts = None
        if cfg.calibrate:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model.path))
            texts = calibration_texts(cfg.calibration, tok, cfg.calibration_tokens)
        summary = exporter(cfg.format).export(cfg, model, st.tmp, texts)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["params"] = model.arch.params
        st.metrics = summary
        st.extra = {"format": cfg.format, "quant": cfg.quant, "calibrated": cfg.calibrate, "label": cfg.label,
                    "model_file": summary["model_file"], "source_model": model.describe()}
    log.info("exported %s to %s in %.0fs", cfg.label, st.path, st.seconds)
    return st.artifact
