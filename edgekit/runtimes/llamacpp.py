"""llama.cpp (through llama-cpp-python): runs GGUF files.

Workaround, on purpose: with llama-cpp-python 0.3.36 on CPUs with AMX (recent Xeons), llama.cpp
repacks weights into its AMX "extra" buffer type at load time and then crashes with a segfault in
the first ``llama_decode`` (seen with the embedded teacher's Q4_1 GGUF, 1 or 2 threads). Turning
the extra buffer types off (``use_extra_bufts=False``) avoids it at no cost to correctness; other
CPUs keep llama.cpp's defaults, including the ARM repacking that makes Q4_0 fast.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edgekit import registry
from edgekit.errors import ModelError
from edgekit.integrity import check_gguf
from edgekit.arch import DEFAULT_CONTEXT
from edgekit.runtimes import LOADERS, NO_GPU, Loader, Runtime, greedy

log = logging.getLogger(__name__)


def host_has_amx() -> bool:
    """True on a CPU with AMX tiles (``amx_tile`` in /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.split(":", 1)[0].strip() == "flags" and "amx_tile" in line.split(":", 1)[1].split()
               for line in text.splitlines() if ":" in line)


@contextlib.contextmanager
def _model_params_without_extra_buffers():
    import llama_cpp
    import llama_cpp.llama as high_level

    original = llama_cpp.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


def open_llama(path: Path, n_ctx: int = DEFAULT_CONTEXT, n_threads: int | None = None, logits_all: bool = False,
               verbose: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; a bad file raises ModelError naming it.

    The GGUF's header is checked first (:func:`edgekit.integrity.check_gguf`): llama.cpp sizes its
    buffers from the header, so a truncated or hostile file must be refused before it opens it.
    """
    check_gguf(path)
    try:
        import llama_cpp
    except ImportError as e:
        raise ModelError("llama.cpp is not installed: pip install llama-cpp-python (it compiles llama.cpp)") from e
    amx = host_has_amx()
    guard = _model_params_without_extra_buffers() if amx else contextlib.nullcontext()
    if amx:
        log.debug("AMX CPU: loading %s without llama.cpp's extra buffer types (see edgekit.runtimes.llamacpp)", path)
    try:
        with guard:
            # swa_full=False: sliding-window layers (Gemma 3) cache their window + one micro-batch, not the
            # whole context -- what the planner counts; greedy output is unchanged (checked on Gemma 3 270M).
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all,
                                   verbose=verbose, swa_full=False)
    except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file: ...")
        raise ModelError(f"llama.cpp cannot load {path}: the file is corrupt, truncated or not a GGUF ({e})") from e


def last_logits(llm):
    """Logits of the last evaluated token (llama-cpp-python only fills ``scores`` when logits_all=True)."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


class LlamaSession:
    """A GGUF in llama.cpp; ``all_logits`` keeps every position's logits (for :meth:`logits`)."""

    def __init__(self, path: Path, threads: int | None = None, *, gpu: bool = False, context: int | None = None,
                 all_logits: bool = False):
        import llama_cpp

        if gpu:
            raise ModelError("llama.cpp GPU offload is not wired yet: edgekit.runtimes.llamacpp.open_llama takes no "
                             "n_gpu_layers; benchmark llama.cpp on the CPU")
        self.all_logits = all_logits
        self.llm = open_llama(path, n_ctx=context or DEFAULT_CONTEXT, n_threads=threads, logits_all=all_logits)
        if threads:  # open_llama sets n_threads only; llama-cpp-python defaults the batch threads to every CPU
            llama_cpp.llama_set_n_threads(self.llm.ctx, threads, threads)
        self.context = llama_cpp.llama_model_n_ctx_train(self.llm.model)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, ids: list[int]):
        """[len(ids), vocab] float32 logits of a fresh sequence (needs ``all_logits=True``)."""
        import numpy as np

        if not self.all_logits:
            raise ModelError("llama.cpp keeps the last position's logits only: open the session with all_logits=True")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(list(ids))
        return int(last_logits(self.llm).argmax())

    def decode(self, n: int) -> list[int]:
        out = []
        token = int(last_logits(self.llm).argmax())
        for _ in range(n):
            self.llm.eval([token])
            token = int(last_logits(self.llm).argmax())
            out.append(token)
        return out

    def generate(self, ids: list[int], n: int, eos_ids=()) -> list[int]:
        return greedy(self, ids, n, eos_ids)

    def close(self) -> None:
        self.llm.close()


def _gpu() -> str | None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return None
    return f"{NO_GPU}: this llama-cpp-python build has no GPU offload (rebuild with CMAKE_ARGS=-DGGML_CUDA=on)"


# An app bundle's example loader: it asks only for what the bundled script uses (older than edgekit's own minimum).
LOADER = Loader(LOADERS / "run_llamacpp.py", min_version="0.3.0",
                note="On Intel AMX CPUs, llama-cpp-python 0.3.36 can crash unless llama.cpp's extra buffer types "
                     "are off; `{loader}` turns them off when it sees AMX (force with `--no-extra-buffers` or "
                     "`NO_EXTRA_BUFFERS=1`).")
RUNTIME = Runtime("llama.cpp", ("gguf",), "llama_cpp", "llama-cpp-python", LlamaSession, _gpu, gpu_variant=True,
                  description="llama.cpp through llama-cpp-python", min_version="0.3.16", loader=LOADER)


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``)."""
    reg.add(registry.RUNTIME, RUNTIME.name, RUNTIME)
