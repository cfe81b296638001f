"""Opening a GGUF in llama.cpp (through llama-cpp-python) the way edgekit measures it.

Workaround, on purpose: with llama-cpp-python 0.3.36 on CPUs with AMX (recent
Xeons), llama.cpp repacks weights into its AMX "extra" buffer type at load time
and then crashes with a segfault in the first ``llama_decode`` (seen with the
embedded teacher's Q4_1 GGUF, 1 or 2 threads). Turning the extra buffer types
off (``use_extra_bufts=False``) avoids it at no cost to correctness; other CPUs
keep llama.cpp's defaults, including the ARM repacking that makes Q4_0 fast.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from edgekit.errors import ModelError

log = logging.getLogger(__name__)


def host_has_amx() -> bool:
    from edgekit.devices import cpu_flags

    return "amx" in cpu_flags()


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


def open_llama(path: Path, n_ctx: int = 2048, n_threads: int | None = None, logits_all: bool = False,
               verbose: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; a bad file raises ModelError naming it.

    The GGUF's header is checked first (:func:`edgekit.integrity.check_gguf`): llama.cpp sizes its
    buffers from the header, so a truncated or hostile file must be refused before it opens it.
    """
    from edgekit.integrity import check_gguf

    check_gguf(path)
    try:
        import llama_cpp
    except ImportError as e:
        raise ModelError("llama.cpp is not installed: pip install llama-cpp-python (it compiles llama.cpp)") from e
    amx = host_has_amx()
    guard = _model_params_without_extra_buffers() if amx else contextlib.nullcontext()
    if amx:
        log.debug("AMX CPU: loading %s without llama.cpp's extra buffer types (see edgekit.bench.llamacpp)", path)
    try:
        with guard:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all,
                                   verbose=verbose)
    except ValueError as e:  # llama-cpp-python raises ValueError("Failed to load model from file: ...")
        raise ModelError(f"llama.cpp cannot load {path}: the file is corrupt, truncated or not a GGUF ({e})") from e


def last_logits(llm):
    """Logits of the last evaluated token (llama-cpp-python only fills ``scores`` when logits_all=True)."""
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()
