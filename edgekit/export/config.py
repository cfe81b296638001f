"""What the export stage runs, and every default it has. Torch-free, so the recipe and the CLI build it too.

``format`` names a registered exporter (:mod:`edgekit.export.exporter`, kind ``"exporter"`` of
:mod:`edgekit.registry`) and ``quant`` one of that format's registered schemes, so a plugin's format is
checked and exported exactly like the built-ins.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgekit import registry
from edgekit.arch import DEFAULT_CONTEXT
from edgekit.errors import RecipeError
from edgekit.export.exporter import Exporter
from edgekit.quantize.auto import parse_target
from edgekit.quantize.schemes import get_scheme, schemes

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_CALIBRATION = RESOURCES / "calibration.jsonl"


def exporter(fmt: str) -> Exporter:
    """The registered exporter of ``fmt``; RecipeError naming the registered formats otherwise."""
    return registry.get(registry.EXPORTER, fmt, error=RecipeError, what="format")


class ExportConfig(BaseModel):
    """What to export and how; every default lives here."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="'default' (embedded teacher), a folder, a .gguf, or a hub id")
    format: str = Field("gguf", description="a registered format with an exporter (gguf, onnx, executorch, "
                                            "or a plugin's)")
    quant: str | None = Field(None, description="scheme name; default: the format exporter's (f16 for gguf, "
                                                "fp32 for onnx and executorch)")
    calibrate: bool = Field(False, description="calibrated 4-bit: imatrix for gguf, activation-aware scaling (then "
                                               "GPTQ rounding) for onnx int4, scaling for executorch 8da4w")
    calibration: list[Path] = Field(default_factory=list,
                                    description="calibration text files (JSONL/txt); default: the bundled set")
    calibration_tokens: int = Field(30_000, gt=0, description="at most this many calibration tokens")
    target: str | None = Field(None, description="quant auto only: the file's size ('90MB') or bits per weight "
                                                 "('4.8bpw') the per-tensor mix must fit; default: the size of "
                                                 "the format's reference mix (gguf q4_k_m)")
    context: int | None = Field(None, ge=8, description="executorch only: positions of the static KV cache "
                                                         f"(default {DEFAULT_CONTEXT}, at most the model's)")
    threads: int | None = Field(None, gt=0)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        ex = exporter(self.format)
        if self.quant is None:
            self.quant = ex.default_quant
        quant = self.quant.lower()
        self.quant = quant
        if quant in ex.calibrated_names:  # a calibrated variant's own name (onnx int4-awq) is the flag
            self.quant, self.calibrate = ex.calibrated_names[quant], True
        scheme = get_scheme(self.format, self.quant)  # raises RecipeError listing the valid names
        if self.context is not None and not ex.static_context:
            static = [e.format for e in registry.items(registry.EXPORTER).values() if e.static_context]
            raise RecipeError(f"context sizes the static KV cache of an {' or '.join(static) or 'static'} export; "
                              f"{self.format} models grow their cache at run time: drop --context")
        if ex.check is not None:
            ex.check(self)
        auto = bool(scheme.options.get("auto"))
        if self.target is not None:
            if not auto:
                able = [s.name for s in schemes(self.format) if s.options.get("auto")]
                raise RecipeError(f"target sizes a per-tensor mix (quant {' or '.join(able) or 'auto'}); {self.format} "
                                  f"{self.quant} has fixed types: drop --target"
                                  + (f" or use --quant {able[0]}" if able else ""))
            parse_target(self.target)  # RecipeError naming the accepted forms, before any work
        if auto:
            self.calibrate = True  # the sensitivity is measured on calibration text, which also guides rounding
        if self.calibrate and not scheme.calibrate:
            able = [s.name for s in schemes(self.format) if s.calibrate]
            if not able:
                raise RecipeError(f"calibrate is not available for {self.format} exports; drop --calibrate")
            raise RecipeError(f"calibrate is available for {self.format} {', '.join(able)} only, not {self.quant}; "
                              f"drop --calibrate or use --quant {able[0]}")
        return self

    @property
    def exporter_quant(self) -> str:
        """The name the format's exporter is called with."""
        return exporter(self.format).exporter_quant(self.quant, self.calibrate)

    @property
    def label(self) -> str:
        if get_scheme(self.format, self.quant).options.get("auto"):  # always calibrated; the target tells mixes apart
            return f"{self.format}-{self.quant}" + (f"-{self.target.replace(' ', '')}" if self.target else "")
        return f"{self.format}-{self.quant}" + ("-calibrated" if self.calibrate else "")
