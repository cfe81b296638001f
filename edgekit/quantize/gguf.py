"""Quantizing a GGUF with llama.cpp's own quantizer, and importance matrices made in PyTorch.

:func:`quantize_gguf` calls ``llama_model_quantize`` through llama-cpp-python,
so the file holds exactly what ``llama-quantize`` would write, then reads it
back and reports, tensor by tensor, the type :mod:`edgekit.quantize.schemes`
asked for against the type llama.cpp used (K-quants fall back to legacy types
when a row is not a multiple of 256 -- most of SmolLM2's rows are 576 long).

:func:`compute_imatrix` is llama.cpp's importance matrix (``llama-imatrix``)
computed with forward hooks: for every linear layer, the mean over calibration
tokens of each input column's squared activation. llama.cpp's quantizer weighs
each weight's rounding error by it, so columns that see large activations are
kept more precisely. Entries are keyed by the GGUF name of the weight they
guide; a tied LM head is ``token_embd.weight``, the name of the tensor the
quantizer looks up (there is no ``output.weight`` in a tied GGUF).

How the matrix reaches llama.cpp (src/llama-quant.cpp, ``llama_model_quantize_impl``):
``params.imatrix`` points at an array of ``llama_model_imatrix_data {name, data,
size}`` that ends with an entry whose ``name`` is NULL; ``size`` is the number
of floats, which must equal the tensor's row length (``ne[0]``, times ``ne[2]``
for stacked experts) or the quantizer throws.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.arch import Architecture, config_from_gguf
from edgekit.artifact import atomic_write_bytes, disk_error
from edgekit.errors import ModelError, RecipeError
from edgekit.integrity import gguf_table
from edgekit.progress import bar
from edgekit.quantize.schemes import SchemeTable, get_scheme

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# Our scheme name -> llama.cpp's LLAMA_FTYPE_* (names in llama_cpp), from each registered GGUF scheme's options.
# The float ones convert without quantizing.
FTYPES: Mapping[str, str] = SchemeTable("gguf", lambda ss: {s.name: s.options["ftype"] for s in ss
                                                         if s.options.get("ftype")})
FLOAT_TYPES = ("f32", "f16", "bf16")

# HF module path inside a Llama -> GGUF weight name (the key llama.cpp's quantizer looks an imatrix entry up by)
_LINEAR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def ftype(quant: str) -> int:
    """llama.cpp's LLAMA_FTYPE_* value for one of our GGUF scheme names; RecipeError lists the valid names."""
    import llama_cpp

    key = quant.lower()
    if key not in FTYPES:
        raise RecipeError(f"unknown GGUF quant {quant!r}: choose one of {', '.join(FTYPES)}")
    return int(getattr(llama_cpp, FTYPES[key]))


# --------------------------------------------------------------------------- quantization


def quantize_gguf(src: Path, dst: Path, quant: str, *, imatrix: dict[str, np.ndarray] | None = None,
                  nthreads: int | None = None, warn_requant: bool = True) -> dict:
    """Quantize ``src`` (a float GGUF, usually f32) to ``dst`` with llama.cpp; returns the report.

    The report lists every tensor's requested and used type, groups the
    fallbacks with their reason, and gives size and bits per weight (all
    tensor bytes x 8 / all parameters, norms included).
    """
    import llama_cpp


    src, dst = Path(src), Path(dst)
    key = quant.lower()
    code = ftype(key)  # RecipeError for unknown names, before any work
    source = read_gguf(src)
    shapes = {t["name"]: t["shape"] for t in source["tensors"]}
    requant = [t["name"] for t in source["tensors"] if t["type"] not in FLOAT_TYPES]
    if requant and warn_requant:
        log.warning("%s is already quantized (%s is %s); requantizing compounds the rounding error -- quantize "
                    "from an f32 export when you can", src, requant[0],
                    next(t["type"] for t in source["tensors"] if t["name"] == requant[0]))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = int(nthreads or 0)  # <= 0: llama.cpp uses every hardware thread
    params.allow_requantize = bool(requant)
    keep_alive, n_imatrix = None, 0
    if imatrix:
        checked = _check_imatrix(imatrix, shapes, src)
        n_imatrix = len(checked)
        keep_alive = _imatrix_array(checked)  # the array and the buffers it points into live until the call returns
        params.imatrix = ctypes.cast(keep_alive[0], ctypes.POINTER(llama_cpp.llama_model_imatrix_data))

    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with _llama_log(len(shapes), f"quantizing {src.name} to {key}") as lines:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()] or lines[-1:]
            why = errors[-1].strip() if errors else f"return code {rc}"
            raise ModelError(f"llama.cpp could not quantize {src} to {key}: {why}; check that {src} is a complete "
                             "float GGUF (re-export it) and that the disk has room")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        raise disk_error(e, dst, src.stat().st_size) from e
    finally:
        tmp.unlink(missing_ok=True)
        del keep_alive
    seconds = time.perf_counter() - t0

    written = read_gguf(dst)
    arch = arch_from_gguf(written)
    scheme = {t.name: t for t in get_scheme("gguf", key).tensors(arch)}
    rows, guarded = [], []
    for t in written["tensors"]:
        planned = scheme.get(t["name"])
        requested = (planned.requested or planned.dtype).lower() if planned else t["type"]
        if imatrix and _imatrix_guard(key, t["name"], arch.layers):
            requested = _IMATRIX_GUARD[key]
            guarded.append(t["name"])
        rows.append({"name": t["name"], "shape": t["shape"], "requested": requested, "used": t["type"],
                     "nbytes": t["nbytes"]})
    notes = []
    if guarded:
        notes.append(f"with an importance matrix llama.cpp keeps ffn_down of the first {len(guarded)} layers at "
                     f"{_IMATRIX_GUARD[key]} instead of {key} (a guard in llama_tensor_get_type); "
                     "edgekit.quantize.schemes does not model it, so predicted_weight_bytes is lower")
    fallbacks = _fallbacks(rows)
    total = sum(t["nbytes"] for t in written["tensors"])
    report = {
        "path": str(dst), "source": str(src), "quant": key, "ftype": FTYPES[key],
        "size_bytes": written["size_bytes"], "weight_bytes": total, "params": written["params"],
        "bits_per_weight": 8 * total / written["params"],
        "predicted_weight_bytes": sum(t.nbytes for t in scheme.values()),
        "imatrix": bool(imatrix), "imatrix_tensors": n_imatrix,
        "requantized": bool(requant), "seconds": round(seconds, 2),
        "fallbacks": fallbacks, "notes": notes, "tensors": rows,
    }
    if fallbacks:
        n = sum(f["tensors"] for f in fallbacks)
        log.warning("%s at %s: %d of %d tensors could not use the requested type: %s", src.name, key, n, len(rows),
                    "; ".join(f["summary"] for f in fallbacks))
    log.info("quantized %s -> %s (%s): %.1f MB, %.2f bits/weight%s", src, dst, key, report["size_bytes"] / 1e6,
             report["bits_per_weight"], ", with an importance matrix" if imatrix else "")
    return report


def arch_from_gguf(info: dict) -> Architecture:
    """An :class:`Architecture` from :func:`~edgekit.export.gguf.read_gguf`'s metadata and tensor table."""
    md, a = info["metadata"], info["arch"]
    names = {t["name"]: t for t in info["tensors"]}
    try:
        vocab = int(names["token_embd.weight"]["shape"][1])
        cfg = config_from_gguf({**md, "general.architecture": a}, names, vocab, str(info["path"]))
        return Architecture.from_hf_config(cfg, f"{info['path']} (GGUF header)")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{info['path']} lacks the {a} metadata edgekit needs ({e}); re-export it with "
                         "edgekit.export.gguf") from e


_K_QUANTS = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
# llama_tensor_get_type: with an imatrix, Q4_0 / Q5_0 give ffn_down in the first n_layer/8 layers Q4_1 / Q5_1.
_IMATRIX_GUARD = {"q4_0": "q4_1", "q5_0": "q5_1"}
_FFN_DOWN = re.compile(r"^blk\.(\d+)\.ffn_down\.weight$")


def _imatrix_guard(quant: str, name: str, layers: int) -> bool:
    m = _FFN_DOWN.match(name)
    return quant in _IMATRIX_GUARD and m is not None and int(m.group(1)) < layers // 8


def _fallbacks(rows: list[dict]) -> list[dict]:
    """Tensors whose used type differs from the requested one, grouped by (requested, used), with the reason."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["requested"] != r["used"]:
            groups.setdefault((r["requested"], r["used"]), []).append(r)
    out = []
    for (want, used), rs in groups.items():
        lengths = sorted({r["shape"][0] for r in rs})
        block = GGML_QUANT_SIZES[GGMLQuantizationType[want.upper()]][0]
        listed = ", ".join(map(str, lengths))
        if all(n % block for n in lengths):
            plural = "s" if len(lengths) > 1 else ""
            because = (f"their row length{plural} {listed} {'are' if plural else 'is'} not a multiple of {block}"
                       + (" (a K-quant super-block)" if want in _K_QUANTS else ""))
        else:
            because = (f"llama.cpp chose {used} where edgekit.quantize.schemes predicted {want} (rows {listed}); "
                       "the scheme table is out of date for this llama.cpp")
        out.append({"requested": want, "used": used, "tensors": len(rs), "row_lengths": lengths,
                    "reason": because, "summary": f"{want} -> {used}: {len(rs)} tensors, because {because}",
                    "names": [r["name"] for r in rs]})
    return sorted(out, key=lambda f: -f["tensors"])


def _check_imatrix(imatrix: dict[str, np.ndarray], shapes: dict[str, list[int]], src: Path) -> dict[str, np.ndarray]:
    """The entries that match ``src``'s tensors, as contiguous float32; mismatched sizes raise with the fix."""
    import numpy as np

    used = {}
    unknown = [k for k in imatrix if k not in shapes]
    if unknown:
        log.warning("importance matrix has %d entries for tensors %s does not have (%s); ignoring them",
                    len(unknown), src.name, ", ".join(unknown[:3]))
    for name in (k for k in imatrix if k in shapes):
        v = np.ascontiguousarray(np.asarray(imatrix[name], dtype=np.float32).reshape(-1))
        row = shapes[name][0] * (shapes[name][2] if len(shapes[name]) > 2 else 1)
        if v.size != row:
            raise ModelError(f"importance matrix entry {name} has {v.size} values but {src} has rows of {row}: "
                             "it was computed for another model; recompute it with compute_imatrix on this one")
        if not np.isfinite(v).all():
            raise ModelError(f"importance matrix entry {name} has NaN or infinite values; recompute it "
                             "(the calibration run overflowed)")
        used[name] = v
    if not used:
        raise ModelError(f"no importance matrix entry matches a tensor of {src} (expected names like "
                         "blk.0.attn_q.weight); recompute it with compute_imatrix on this model")
    return used


def _imatrix_array(entries: dict[str, np.ndarray]):
    """A NULL-terminated ``llama_model_imatrix_data[]`` plus the buffers it points into (keep all alive)."""
    import llama_cpp

    n = len(entries)
    arr = (llama_cpp.llama_model_imatrix_data * (n + 1))()
    names = [k.encode() for k in entries]
    buffers = list(entries.values())
    for i, (name, v) in enumerate(zip(names, buffers)):
        arr[i].name = name
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[n].name, arr[n].data, arr[n].size = None, None, 0  # the terminator llama-quant.cpp stops at
    return arr, names, buffers


@contextlib.contextmanager
def _llama_log(n_tensors: int, desc: str):
    """Route llama.cpp's log to ``logging`` (debug) during a call, drive a progress bar from it, keep the lines.

    llama.cpp has one process-wide log callback; llama-cpp-python's own is put back afterwards.
    """
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []
    step = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
    with bar(total=n_tensors, desc=desc, unit="tensor") as b:

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            s = text.decode("utf-8", errors="replace")
            lines.append(s)
            if step.match(s):
                b.update(1)
            if s.strip():
                log.debug("llama.cpp: %s", s.rstrip())

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# --------------------------------------------------------------------------- importance matrix


class Imatrix(dict):
    """GGUF weight name -> float32 mean squared input activation per column; ``.meta`` says how it was made."""

    def __init__(self, entries=(), meta: dict | None = None):
        super().__init__(entries)
        self.meta = dict(meta or {})


def compute_imatrix(model_dir: Path, texts: list[str], *, context: int = 512, max_tokens: int = 50_000,
                    progress: bool = True, names: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix for the HF model in ``model_dir``, from calibration ``texts``.

    The texts are tokenized (no special tokens added), joined into one stream,
    cut to ``max_tokens`` and run in ``context``-token windows through the fp32
    model. Returns an :class:`Imatrix` (a dict) whose ``meta`` holds the number
    of tokens and chunks. ``names`` maps module names to the names the entries get (the GGUF writer's own table,
    which covers fused q/k/v and gate/up matrices; an ONNX graph's weights) and limits the entries to those
    modules; without it, every linear gets its GGUF name in a Llama.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if context < 1 or max_tokens < 1:
        raise RecipeError(f"compute_imatrix needs context and max_tokens >= 1 (got {context}, {max_tokens})")
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    stream: list[int] = []
    for text in texts:
        stream.extend(tok(text, add_special_tokens=False).input_ids)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    if not stream:
        raise RecipeError("no calibration tokens: the calibration texts are empty; give some text to compute an "
                          "importance matrix from")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False).eval()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head, body = model.get_output_embeddings(), model.get_decoder()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    handles = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head and (names is None or mod_name in names):
            name = names[mod_name] if names is not None else _gguf_weight_name(mod_name, model_dir)
            handles.append(mod.register_forward_hook(lambda m, inputs, out, name=name: accumulate(name, inputs[0])))
    head_name = "token_embd.weight" if tied else "output.weight"
    chunks = [stream[i:i + context] for i in range(0, len(stream), context)]
    try:
        with torch.no_grad(), _bar(progress, len(stream), "importance matrix") as b:
            for c in chunks:
                # The head's input is the decoder's final hidden state; running the decoder alone skips the
                # vocabulary-sized logits, which are a third of the compute for a small model and unused here.
                hidden = body(input_ids=torch.tensor([c]), use_cache=False).last_hidden_state
                accumulate(head_name, hidden)
                b.update(len(c))
    finally:
        for h in handles:
            h.remove()
    out = Imatrix({k: (sums[k] / counts[k]).to(torch.float32).numpy() for k in sorted(sums)},
                  meta={"tokens": len(stream), "chunks": len(chunks), "context": context, "texts": len(texts)})
    log.info("importance matrix for %s: %d weights from %d tokens in %d chunks", model_dir, len(out), len(stream),
             len(chunks))
    return out


def _gguf_weight_name(module: str, model_dir: Path) -> str:
    m = _LAYER.match(module)
    if m and m.group(2) in _LINEAR_NAMES:
        return f"blk.{m.group(1)}.{_LINEAR_NAMES[m.group(2)]}.weight"
    raise ModelError(f"{model_dir}: linear layer {module!r} has no GGUF name in a Llama; edgekit computes "
                     "importance matrices for Llama-family models only")


def _bar(enabled: bool, total: int, desc: str):
    class _No:
        def update(self, n=1):
            pass

    return bar(total=total, desc=desc, unit="tok") if enabled else contextlib.nullcontext(_No())


def save_imatrix(path: Path, imatrix: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Write an importance matrix as safetensors (atomically); ``meta`` (plus ``imatrix.meta``) goes in the header."""
    import numpy as np
    from safetensors.numpy import save

    info = {**getattr(imatrix, "meta", {}), **(meta or {})}
    header = {"format": "edgekit-imatrix", **{k: json.dumps(v) for k, v in info.items()}}
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=header))


def load_imatrix(path: Path) -> Imatrix:
    """Read :func:`save_imatrix`'s file back (``.meta`` restored); a bad file raises ModelError naming it."""
    import numpy as np
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            entries = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    except FileNotFoundError as e:
        raise ModelError(f"{path} does not exist; compute the importance matrix first") from e
    except Exception as e:  # safetensors raises its own error type for bad headers and truncation
        raise ModelError(f"{path} is not a readable importance matrix ({e}); recompute it") from e
    if header.get("format") != "edgekit-imatrix":
        raise ModelError(f"{path} is a safetensors file but not an edgekit importance matrix; recompute it with "
                         "compute_imatrix / save_imatrix")
    meta = {}
    for k, v in header.items():
        if k != "format":
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
    return Imatrix(entries, meta)


# --------------------------------------------------------------------------- reading back


def read_gguf(path: Path) -> dict:
    """The tensor table and scalar metadata of a GGUF; a bad file raises one ModelError line naming it.

    Each tensor is ``{name, type, shape, nbytes}`` with ``type`` a lowercase ggml
    type name (``q4_k``) and ``shape`` in ggml order: ``shape[0]`` is the row length.
    Read by :func:`edgekit.integrity.gguf_table`, the same walk that checks the header.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist; export the model first")
    table = gguf_table(path)
    tensors = table["tensors"]
    return {"path": str(path), "arch": table["metadata"].get("general.architecture"),
            "size_bytes": path.stat().st_size, "n_tensors": len(tensors),
            "params": sum(math.prod(t["shape"]) for t in tensors), "tensors": tensors,
            "n_vocab": table["arrays"].get("tokenizer.ggml.tokens"), "metadata": table["metadata"]}
