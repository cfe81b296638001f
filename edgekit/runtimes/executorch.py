"""ExecuTorch's Python runtime on an exported folder (``model.pte`` + ``executorch_config.json``), XNNPACK on the CPU.

:class:`EtSession` loads the program through ``executorch.runtime`` (with the LLM and quantized
kernels registered, and the flatbuffer verified on load), and steps it: the program keeps its K/V
cache inside, so a call is ``forward(tokens, input_pos) -> last-position logits`` and a new sequence
simply starts again at position 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgekit import integrity, registry
from edgekit.errors import ModelError, one_line
from edgekit.runtimes import LOADERS, NO_GPU, GenerationStats, Loader, Runtime, hf_tokenizer

MODEL_FILE = "model.pte"
ET_CONFIG = "executorch_config.json"


def _runtime():
    """ExecuTorch's runtime with the kernels edgekit's programs use registered (imports are the registration)."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  llama::custom_sdpa / update_cache
        import executorch.kernels.quantized  # noqa: F401  quantized_decomposed::embedding_byte
        from executorch.runtime import Runtime as EtRuntime, Verification
    except ImportError as e:
        raise ModelError(f"ExecuTorch is not installed ({e}); pip install 'edgekit[executorch]'") from e
    return EtRuntime.get(), Verification


def set_threads(threads: int | None) -> None:
    """Size ExecuTorch's (process-wide) thread pool, which XNNPACK uses."""
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))


class EtSession:
    """A ``model.pte`` from ``edgekit export --format executorch``, batch 1."""

    def __init__(self, folder: Path, threads: int | None = None, *, check_config: bool = True,
                 pte: Path | None = None, gpu: bool = False, context: int | None = None, all_logits: bool = False):
        import numpy as np
        import torch

        if gpu:
            raise ModelError("edgekit's ExecuTorch programs are lowered to XNNPACK (CPU); a GPU needs a Vulkan, "
                             "MPS or Core ML export, which edgekit does not write yet")
        self.np, self.torch = np, torch
        self.folder = folder = Path(folder)
        self.path = Path(pte) if pte else folder / MODEL_FILE
        self.config = {}
        config_path = folder / ET_CONFIG
        if config_path.is_file():
            try:
                self.config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ModelError(f"{config_path} is not readable JSON ({e}); export the folder again") from e
        elif check_config:
            raise ModelError(f"{folder} has no {ET_CONFIG}; pass a folder written by `edgekit export --format "
                             "executorch`")
        if not self.path.is_file():
            raise ModelError(f"{self.path} is missing; export again (edgekit export --format executorch)")
        integrity.check_pte(self.path)  # the fast pre-check; the runtime then verifies the whole flatbuffer
        runtime, verification = _runtime()
        set_threads(threads)
        try:
            program = runtime.load_program(self.path, verification=verification.InternalConsistency)
            self.method = program.load_method("forward")
        except Exception as e:  # the runtime raises RuntimeError / ValueError with its own message
            raise ModelError(f"ExecuTorch cannot load {self.path} ({one_line(e)}); the file is truncated, "
                             "corrupt or needs kernels this runtime lacks: export it again") from e
        self._program = program
        self.context = int(self.config.get("context") or _constant(program, "get_max_seq_len") or 0) or None
        self.eos_ids = tuple(self.config.get("eos_token_id") or ())
        self.pos = 0
        self.stats = GenerationStats()
        self._tokenize = None
        self._token = None

    def tokenize(self, text: str) -> list[int]:
        if self._tokenize is None:
            self._tokenize = hf_tokenizer(self.folder)
        return self._tokenize(text)

    def forward(self, ids: list[int], pos: int):
        """Logits [vocab] of the last of ``ids`` placed at positions ``pos..pos+len(ids)-1``."""
        if self.context and pos + len(ids) > self.context:
            raise ModelError(f"{len(ids)} tokens at position {pos} pass the program's context of {self.context}; "
                             "shorten the prompt or export with a larger context")
        t = self.torch
        out = self.method.execute([t.tensor([list(ids)], dtype=t.long), t.tensor([pos], dtype=t.long)])[0]
        self.pos = pos + len(ids)
        return out.reshape(-1).numpy()

    def prefill_logits(self, ids: list[int]):
        """Start a new sequence with ``ids``; logits of its last position."""
        return self.forward(list(ids), 0)

    def logits(self, ids: list[int]):
        """[T, vocab] logits of every position, one program call per token (the program returns the last only)."""
        rows = [self.forward([tok], i) for i, tok in enumerate(ids)]
        return self.np.stack(rows).astype(self.np.float32, copy=False)

    def prefill(self, ids: list[int]) -> int:
        self._token = int(self.prefill_logits(list(ids)).argmax())
        return self._token

    def decode(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            self._token = int(self.forward([self._token], self.pos).argmax())
            out.append(self._token)
        return out

    def generate(self, ids: list[int], n: int, eos_ids=None) -> list[int]:
        """Up to ``n`` greedy tokens after ``ids``; stops at ``eos_ids`` (default: the export's). Timings in ``stats``."""
        stop = set(self.eos_ids if eos_ids is None else eos_ids)
        self.stats = GenerationStats(prompt_tokens=len(ids))
        out: list[int] = []
        t0 = time.perf_counter()
        logits = self.prefill_logits(ids)
        self.stats.prefill_s = time.perf_counter() - t0
        while len(out) < n:
            out.append(int(logits.argmax()))
            if out[-1] in stop or len(out) == n:
                break
            t = time.perf_counter()
            logits = self.forward([out[-1]], self.pos)
            self.stats.decode_s.append(time.perf_counter() - t)
        self.stats.new_tokens = len(out)
        return out

    def close(self) -> None:
        self.method = None
        self._program = None


def _constant(program, name: str):
    """A metadata method's value (e.g. get_max_seq_len), or None when the program has none."""
    try:
        if name not in program.method_names:
            return None
        return program.load_method(name).execute([])[0]
    except Exception:  # an optional fact: missing or odd metadata is not an error here
        return None


def _gpu() -> str | None:
    return f"{NO_GPU}: edgekit lowers ExecuTorch programs to XNNPACK, a CPU backend"


# An app bundle's example loader, and the program's config it reads beside model.pte.
LOADER = Loader(LOADERS / "run_executorch.py", files=("executorch_config.json",),
                note="`{loader}` also needs `tokenizers` and `jinja2` (`pip install tokenizers jinja2`). The program "
                     "holds a static K/V cache of {context} positions and returns the last position's logits; "
                     "ExecuTorch's C++ LLM runner can drive it on a phone as it is (it carries the runner's "
                     "metadata). It needs the XNNPACK backend and ExecuTorch's LLM custom ops (`llama::custom_sdpa`, "
                     "`llama::update_cache`) and quantized kernels linked in; see executorch_config.json's `kernels`. "
                     "tokenizer.json is in the form that runner's tokenizer reads (checked with the runner the "
                     "`executorch` pip package ships, `executorch.extension.llm.runner.TextLLMRunner`, after "
                     "importing `executorch.extension.llm.custom_ops.custom_ops` and `executorch.kernels.quantized`)."
                     "\n\nOn a device: ExecuTorch's `llama_main --model_path=model.pte --tokenizer_path=tokenizer.json "
                     "--prompt=\"...\" --temperature=0` (built from ExecuTorch's examples/models/llama), on Android "
                     "`new LlmModule(\"model.pte\", \"tokenizer.json\", 0.0f)` (the `executorch-android` AAR), on "
                     "iOS the ExecuTorchLLM Swift package's `TextRunner(modelPath:tokenizerPath:)`. The prompt is "
                     "the chat template's rendering (chat_template.jinja); generation stops at the program's eos ids.")
RUNTIME = Runtime("executorch", ("executorch",), "executorch", "executorch", EtSession, _gpu,
                  description="ExecuTorch's Python runtime (XNNPACK delegate, portable + LLM kernels)",
                  min_version="1.5.1", loader=LOADER)


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    reg.add(registry.RUNTIME, RUNTIME.name, RUNTIME)
