"""ggml's own row quantizer, called on one tensor at a time (what ``llama_model_quantize`` runs per tensor).

``llama_model_quantize`` picks one type per tensor from an ftype's fixed rules; its per-tensor override
(``tensor_types``) is a C++ ``std::vector`` that no C binding can fill. So a mix chosen tensor by tensor
(:mod:`edgekit.quantize.auto`) calls the function the quantizer itself calls for each tensor,
``ggml_quantize_chunk`` from the ggml library that llama-cpp-python ships (libggml-base), with the same
importance-matrix column weights. The bytes are therefore llama.cpp's, not a re-implementation: a test
checks them against ``llama_model_quantize``'s output tensor by tensor. Reading them back uses gguf-py's
dequantizers (:func:`dequantize`).

Rows are quantized independently (blocks run along a row, ggml's ``ne[0]``), so a tensor is split into
row chunks quantized on several threads; ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import ModelError

if TYPE_CHECKING:
    import numpy as np

_CHUNK_ROWS = 256  # rows per call: small enough to spread a 576 x 576 matrix over two threads


@functools.cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    folder = Path(llama_cpp.__file__).resolve().parent / "lib"
    names = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libllama.so", "libllama.dylib", "llama.dll")
    for name in names:
        if (folder / name).exists():
            lib = ctypes.CDLL(str(folder / name))
            if hasattr(lib, "ggml_quantize_chunk"):
                break
    else:
        raise ModelError(f"no ggml library with ggml_quantize_chunk under {folder}: llama-cpp-python is installed "
                         "without its shared libraries; reinstall it (pip install --force-reinstall "
                         "llama-cpp-python)")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def _type(dtype: str):
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType[dtype]
    except KeyError:
        raise ModelError(f"unknown ggml type {dtype!r}") from None
    return qtype, GGML_QUANT_SIZES[qtype]


def row_bytes(dtype: str, row: int) -> int:
    """Bytes of one ``row``-long row of ``dtype``."""
    _, (block, size) = _type(dtype)
    if row % block:
        raise ModelError(f"a row of {row} is not a multiple of {dtype}'s block of {block}")
    return row // block * size


def quantize(w: np.ndarray, dtype: str, imatrix: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """``w`` (float32 ``[rows, row]``) quantized to ``dtype`` by ggml: the raw bytes, ``uint8 [rows, row_bytes]``.

    ``imatrix`` (one float per column, llama.cpp's importance matrix entry) weighs each column's rounding
    error, as ``llama-quantize --imatrix`` does."""
    import numpy as np

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ModelError(f"ggml quantizes matrices; got shape {w.shape}")
    rows, row = w.shape
    qtype, _ = _type(dtype)
    nbytes = row_bytes(dtype, row)
    lib = _lib()
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (row,):
            raise ModelError(f"importance matrix entry has {imat.size} values for rows of {row}")
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ModelError(f"{dtype} needs an importance matrix (calibrate)")
    lib.ggml_quantize_init(int(qtype))
    out = np.empty((rows, nbytes), dtype=np.uint8)

    def run(start: int) -> int:
        n = min(_CHUNK_ROWS, rows - start)
        # ggml_quantize_chunk(type, src, dst, start element, nrows, n_per_row, imatrix): dst advances by
        # start / n_per_row rows of the type's row size, so each call writes its own rows of `out`.
        return lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, start * row, n, row,
                                       None if imat is None else imat.ctypes.data)

    starts = range(0, rows, _CHUNK_ROWS)
    workers = max(1, min(threads or os.cpu_count() or 1, len(starts)))
    if workers == 1:
        written = sum(run(s) for s in starts)
    else:
        with ThreadPoolExecutor(workers) as pool:
            written = sum(pool.map(run, starts))
    if written != out.nbytes:
        raise ModelError(f"ggml wrote {written} bytes quantizing {rows} x {row} to {dtype}, expected {out.nbytes}")
    return out


def dequantize(raw: np.ndarray, dtype: str, row: int) -> np.ndarray:
    """The float32 ``[rows, row]`` values ggml computes with for ``raw`` (gguf-py's dequantizer)."""
    import numpy as np
    from gguf.quants import dequantize as _dequantize

    qtype, _ = _type(dtype)
    return np.asarray(_dequantize(raw, qtype), dtype=np.float32).reshape(-1, row)


def roundtrip(w: np.ndarray, dtype: str, imatrix: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """``w`` as the runtime sees it after quantizing to ``dtype``."""
    return dequantize(quantize(w, dtype, imatrix, threads), dtype, w.shape[1])
