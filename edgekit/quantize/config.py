"""What the fidelity stage measures, and every default it has: one config for `edgekit fidelity` and a recipe's
`fidelity:`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class FidelityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16_384, ge=1, description="held-out tokens each export is scored on "
                                                         "(a chat's answer tokens; every token of plain text)")
    texts: list[Path] = Field(default_factory=list, description="held-out text files (JSONL/txt); default: the "
                                                                "data stage's held-out chats after distillation, "
                                                                "else the bundled set (resources/heldout.jsonl)")
