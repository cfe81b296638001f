"""What the export stage runs, and every default it has. Torch-free, so the recipe and the CLI build it too."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgekit.arch import DEFAULT_CONTEXT
from edgekit.errors import RecipeError
from edgekit.quantize.schemes import get_scheme

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
DEFAULT_CALIBRATION = RESOURCES / "calibration.jsonl"
DEFAULT_QUANT = {"gguf": "f16", "onnx": "fp32", "executorch": "fp32"}
GGUF_FLOATS = ("f32", "f16", "bf16")
# ONNX quant names the exporter understands, and what ``calibrate`` turns each into.
ONNX_CALIBRATED = {"int4": "int4-awq"}


class ExportConfig(BaseModel):
    """What to export and how; every default lives here."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description="'default' (embedded teacher), a folder, a .gguf, or a hub id")
    format: Literal["gguf", "onnx", "executorch"] = "gguf"
    quant: str | None = Field(None, description="scheme name; default f16 for gguf, fp32 for onnx and executorch")
    calibrate: bool = Field(False, description="calibrated 4-bit: imatrix for gguf, activation-aware scaling for "
                                               "onnx int4 and executorch 8da4w")
    calibration: list[Path] = Field(default_factory=list,
                                    description="calibration text files (JSONL/txt); default: the bundled set")
    calibration_tokens: int = Field(30_000, gt=0, description="at most this many calibration tokens")
    context: int | None = Field(None, ge=8, description="executorch only: positions of the static KV cache "
                                                         f"(default {DEFAULT_CONTEXT}, at most the model's)")
    threads: int | None = Field(None, gt=0)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.quant is None:
            self.quant = DEFAULT_QUANT[self.format]
        quant = self.quant.lower()
        self.quant = quant
        if self.format == "onnx" and quant in ONNX_CALIBRATED.values():
            self.quant, self.calibrate = next(k for k, v in ONNX_CALIBRATED.items() if v == quant), True
        else:
            get_scheme(self.format, quant)  # raises RecipeError listing the valid names
        if self.context is not None and self.format != "executorch":
            raise RecipeError(f"context sizes the static KV cache of an executorch export; {self.format} "
                              "models grow their cache at run time: drop --context")
        if self.calibrate and self.format == "executorch" and self.quant != "8da4w":
            raise RecipeError(f"calibrate is available for executorch 8da4w only, not {self.quant}; drop "
                              "--calibrate or use --quant 8da4w")
        if self.calibrate:
            if self.format == "gguf" and self.quant in GGUF_FLOATS:
                raise RecipeError(f"calibrate needs a quantized type, not {self.quant}: an importance matrix only "
                                  "guides quantization; pick e.g. --quant q4_k_m")
            if self.format == "onnx" and self.quant not in ONNX_CALIBRATED:
                raise RecipeError(f"calibrate is available for onnx {', '.join(ONNX_CALIBRATED)} only, not "
                                  f"{self.quant}; drop --calibrate or use --quant int4")
        return self

    @property
    def exporter_quant(self) -> str:
        """The name the format's exporter is called with."""
        if self.format == "onnx" and self.calibrate:
            return ONNX_CALIBRATED[self.quant]
        return self.quant

    @property
    def label(self) -> str:
        return f"{self.format}-{self.quant}" + ("-calibrated" if self.calibrate else "")
