"""What the export stage needs from a format's exporter: one :class:`Exporter`, registered by name.

Each exporter module registers one through its own entry point in the ``edgekit`` group (kind
``"exporter"``, keyed by the format name), exactly as a third-party format does::

    def register(reg):
        reg.add("format", "tflite", TFLITE)                     # edgekit.quantize.schemes.Format
        reg.add("scheme", "tflite/int8", INT8)                  # edgekit.quantize.schemes.Scheme
        reg.add("exporter", "tflite", Exporter("tflite", export_tflite, version=1, default_quant="int8"))

:mod:`edgekit.export.pipeline` owns the stage (ids, reuse, the temporary folder, the manifest) and
calls ``export(cfg, model, folder, texts)``, which writes the model into ``folder`` and returns the
summary recorded as the manifest's metrics. Which quants exist and whether ``calibrate`` applies to
each is the registered schemes' word, not the exporter's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Exporter:
    format: str
    # export(cfg: ExportConfig, model: ResolvedModel, folder: Path, texts: list[str] | None) -> summary dict with
    # at least "model_file" (relative to folder), "size_bytes" and "bits_per_weight"
    export: Callable[..., dict[str, Any]] = field(repr=False)
    version: int  # bump when the output changes for the same config, so older artifacts are not reused
    default_quant: str
    static_context: bool = False  # the export fixes its positions up front: the config's `context` applies
    # other quant names the config accepts -> the scheme they mean with calibrate on (onnx: int4-awq -> int4)
    calibrated_names: Mapping[str, str] = field(default_factory=dict)
    # extra checks of an ExportConfig (raise RecipeError with the fix); called before the generic ones
    check: Callable[[Any], None] | None = field(default=None, repr=False)
    # bytes written at the peak for (quant, params); default: an fp32 working copy beside the result
    space: Callable[[str, int], int] | None = field(default=None, repr=False)
    description: str = ""

    def exporter_quant(self, quant: str, calibrate: bool) -> str:
        """The quant name the exporter's own functions take (its calibrated variant's name, if it has one)."""
        if calibrate:
            return next((k for k, v in self.calibrated_names.items() if v == quant), quant)
        return quant
