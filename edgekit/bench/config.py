"""What a benchmark measures, and every default it has: one config for `edgekit bench` and a recipe's `bench:`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtimes: list[str] | None = Field(None, description="null: every installed runtime that runs the format")
    repeats: int = Field(3, ge=1, description="timed runs of each measurement; the report gives their median")
    warmup: int = Field(1, ge=0, description="untimed runs before them")
    prompt_lengths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [128], min_length=1,
                                                              description="prompt tokens of each prefill run")
    decode_tokens: int = Field(64, ge=1, description="tokens generated in each decode run")
    threads: int | None = Field(None, ge=1, description="null: the runtime's default")
