"""Hugging Face model folder -> GGUF file for llama.cpp, written with gguf-py's ``GGUFWriter``.

What the file holds, and why:

- Weights are read from ``*.safetensors`` only (never pickles), one tensor at a
  time, and streamed into the file: the header and tensor table are written
  first from the shapes alone, so no two full copies of the model are in memory.
- Each family of edgekit.arch.FAMILIES is written as the llama.cpp
  architecture its own converter (convert_hf_to_gguf.py) uses: llama and mistral
  as ``llama``, qwen2, qwen3, gemma3_text as ``gemma3``, phi3. Tensor names come
  from gguf-py's name map for that architecture (``token_embd``, ``blk.N.attn_q``
  ... ``output_norm``, ``output``); a tied LM head writes no ``output.weight``.
- ``llama``'s rope rotates *adjacent pairs*, HF's Llama the two *halves* of each
  head (``rotate_half``), so its ``attn_q`` / ``attn_k`` rows are reordered per head
  (row ``2i`` <- HF row ``i``, row ``2i+1`` <- HF row ``i + head_dim/2``). The other
  families use llama.cpp's NEOX rope, which rotates halves: their rows stay.
- Gemma's RMSNorm scales by ``1 + w``, llama.cpp's by ``w``: gemma3 norms are stored
  as ``w + 1``. What llama.cpp's gemma3 hard-codes (every 6th layer global, local
  rope base 10000, attention scale 1/sqrt(head_dim)) is checked, and a config
  that differs is refused in one line before anything is written.
- 1-D tensors (norm weights, biases, rope factors) stay f32 whatever ``dtype`` says,
  as llama.cpp expects; matrices are f32, f16 or bf16.
- The tokenizer goes in whole, from tokenizer.json: byte-level BPE as
  ``tokenizer.ggml.model = gpt2`` with its pre-tokenizer as a llama.cpp name
  (:data:`PRE_TOKENIZERS`) and merges; SentencePiece-style BPE with byte fallback
  (Gemma, Phi-3, Mistral) as ``llama`` with scores from the merge ranks, ``<0xNN>``
  byte tokens and ``add_space_prefix`` (:data:`SPM_SHAPES`). Both carry token types
  (normal / control for special added tokens / user-defined for the other added
  tokens), special ids, add-BOS/EOS flags and the chat template.

:func:`read_gguf` reads any GGUF's tensor table and scalar metadata back, and
turns a truncated or foreign file into one ``ModelError`` line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit import __version__, artifact, registry
from edgekit.arch import DEFAULT_CONTEXT, MODEL_TYPES
from edgekit.artifact import fault_point
from edgekit.errors import ModelError, RecipeError
from edgekit.export.exporter import Exporter
from edgekit.hf import read_json
from edgekit.integrity import check_safetensors
from edgekit.progress import bar
from edgekit.quantize import auto, ggml
from edgekit.quantize.gguf import compute_imatrix, quantize_gguf, read_gguf, save_imatrix  # noqa: F401 (read_gguf: public here too)
from edgekit.quantize.schemes import GGUF_FLOATS

log = logging.getLogger(__name__)

# dtype argument -> (GGML tensor type name, general.file_type as llama.cpp's LLAMA_FTYPE_*)
DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32)}


@dataclass(frozen=True)
class Layout:
    """How llama.cpp runs a family (edgekit.arch.FAMILIES), beyond the family's own structure."""

    permute_qk: bool = False    # llama.cpp's rope for the arch rotates adjacent pairs, HF rotates halves
    norm_shift: float = 0.0     # added to every norm weight: Gemma's RMSNorm scales by (1 + w), llama.cpp by w
    rope: tuple[str, ...] = ("default", "linear")  # rope_scaling types llama.cpp's graph for the arch reproduces


# family name -> its llama.cpp layout (facts from convert_hf_to_gguf.py and llama.cpp's graphs). Mistral is a llama
# in llama.cpp; qwen2/qwen3/gemma3/phi3 use NEOX rope (rotate halves, as HF does), so their q/k rows stay.
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(permute_qk=True, rope=("default", "linear", "llama3")),
    "mistral": Layout(permute_qk=True, rope=("default", "linear", "llama3")),
    "qwen2": Layout(),
    "qwen3": Layout(),
    "gemma3": Layout(norm_shift=1.0),
    "phi3": Layout(rope=("default", "longrope", "su")),
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved; recomputed at load
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3: every 6th layer global, the rest sliding (hard-coded there)
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's gemma3: the sliding layers' rope base (hard-coded there)

# The rule table for ``tokenizer.ggml.pre``: the shape of tokenizer.json's ``pre_tokenizer``
# (each step as :func:`_pre_step` names it) -> the llama.cpp pre-tokenizer that splits text the same way.
# Each entry is checked end to end by a test that tokenizes through llama.cpp and through tokenizers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5/3: every digit alone
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    # GPT-2's regex on bytes (and any tokenizer trained with a bare ByteLevel pre-tokenizer)
    ("ByteLevel",): "gpt-2",
    # SmolLM / SmolLM2 (StarCoder's rules): every digit alone, then GPT-2's regex
    ("Digits(individual)", "ByteLevel"): "smollm",
    # Llama 3.x: its own split regex (numbers in groups of up to 3), then bytes without a regex
    ("Split(llama3)", "ByteLevel(no regex)"): "llama-bpe",
    # Qwen2 / Qwen2.5 / Qwen3: Llama 3's regex with single digits, then bytes without a regex
    ("Split(qwen2)", "ByteLevel(no regex)"): "qwen2",
}


# --------------------------------------------------------------------------- export


def export_gguf(model_dir: Path, out: Path, dtype: str = "f16", *, name: str | None = None,
                license: str | None = None, teacher: str | None = None, progress: bool = True,
                tokenizer_pre: str | None = None, types: Mapping[str, str] | None = None,
                quantize: Callable[[str, Any, str], Any] | None = None) -> dict:
    """Write ``model_dir`` (an HF safetensors folder of a model in edgekit.arch.FAMILIES) as a GGUF at ``out``.

    ``dtype`` is f32, f16 or bf16 for the matrices (norms and biases stay f32). ``teacher``
    is recorded as the model's source (``general.base_model.0.name`` and
    ``edgekit.teacher``). ``tokenizer_pre`` overrides the detected llama.cpp
    pre-tokenizer name (byte-level BPE only). The file appears at ``out`` only when
    complete; an unsupported model or tokenizer is refused before anything is written.
    ``types`` gives every matrix its own ggml type (a per-tensor mix); ``quantize(name, f32 array, type)``
    returns its raw bytes (:func:`edgekit.quantize.ggml.quantize`, the quantizer llama.cpp runs per tensor).
    Returns a summary.
    """
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    model_dir, out = Path(model_dir), Path(out)
    if dtype not in DTYPES:
        raise ModelError(f"cannot export {model_dir} as GGUF {dtype!r}: choose one of {', '.join(DTYPES)} "
                         "(quantized types are made from an f32 export by edgekit.quantize.gguf)")
    cfg = _json(model_dir / "config.json")
    hp = _hparams(cfg, model_dir / "config.json")
    files = _safetensors_keys(model_dir)
    plan = _tensor_plan(files, hp, model_dir)
    vocab = _tokenizer(model_dir, cfg, hp["vocab_size"], tokenizer_pre)
    ggml_type, file_type = DTYPES[dtype]

    w = GGUFWriter(path=None, arch=hp["arch"])
    w.add_type("model")
    w.add_name(_llama_cpp_name(name or cfg.get("_name_or_path") or model_dir.name, vocab))
    if license:
        w.add_license(license)
    if teacher:
        w.add_base_model_count(1)
        w.add_base_model_name(0, teacher)
        w.add_string("edgekit.teacher", teacher)
    w.add_string("edgekit.version", __version__)
    if types:
        missing = [t["name"] for t in plan if len(t["shape"]) == 2 and t["name"] not in types]
        if missing or quantize is None:
            raise ModelError(f"a per-tensor GGUF mix needs a type for every matrix and a quantizer; no type for "
                             f"{', '.join(missing[:3]) or '(quantizer missing)'}")
        file_type = 1024  # LLAMA_FTYPE_GUESSED: no single ftype describes a per-tensor mix
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(file_type)
    _add_hparams(w, hp)
    _add_tokenizer(w, vocab)

    total_bytes = params = 0
    for t in plan:
        t["type"] = "F32" if len(t["shape"]) == 1 else (types[t["name"]] if types else ggml_type)
        if t["type"] in ("F32", "F16", "BF16"):
            t["nbytes"] = math.prod(t["shape"]) * (4 if t["type"] == "F32" else 2)
            np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t["type"]]  # BF16 as raw bits
        else:
            block, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[t["type"]]]
            t["nbytes"], np_dtype = t["shape"][0] * (t["shape"][1] // block) * size, np.uint8
        # gguf-py takes a quantized tensor's shape in bytes per row and turns it back into elements
        shape = t["shape"] if np_dtype is not np.uint8 else [t["shape"][0], t["nbytes"] // t["shape"][0]]
        w.add_tensor_info(t["name"], shape, np.dtype(np_dtype), t["nbytes"], raw_dtype=GGMLQuantizationType[t["type"]])
        total_bytes += t["nbytes"]
        params += math.prod(t["shape"])

    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with _progress(progress, total_bytes, f"writing {out.name}") as b, _open_all(files) as handles:
            for t in plan:
                src = handles[t["file"]].get_tensor(t["key"]) if t["key"] else None
                if t["type"] in ("F32", "F16", "BF16"):
                    w.write_tensor_data(_convert(src, t, hp))
                else:
                    w.write_tensor_data(quantize(t["name"], _convert(src, {**t, "type": "F32"}, hp), t["type"]))
                b.update(t["nbytes"])
                fault_point("gguf.tensor")
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        w.close()
        tmp.unlink(missing_ok=True)
        raise artifact.disk_error(e, out, total_bytes) from e
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    log.info("wrote %s: %s, %d tensors, %s, %.1f MB, tokenizer %s/%s", out, hp["arch"], len(plan),
             "per-tensor mix" if types else dtype, size / 1e6,
             vocab["model"], vocab["pre"])
    return {"path": str(out), "size_bytes": size, "n_tensors": len(plan), "dtype": dtype, "params": params,
            "arch": hp["arch"], "tied_embeddings": hp["tied"], "tokenizer_model": vocab["model"],
            "tokenizer_pre": vocab["pre"], "n_vocab": hp["vocab_size"]}


def _hparams(cfg: dict, source: Path) -> dict:
    """The architecture numbers llama.cpp needs, refusing what its graph for the family would compute differently."""
    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        raise ModelError(f"{source}: model_type {mt!r} cannot be exported to GGUF by edgekit (it writes "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models); convert it with llama.cpp's "
                         "convert_hf_to_gguf.py and pass the .gguf file instead")
    fam = MODEL_TYPES[mt]
    act_key = "hidden_activation" if mt == "gemma3_text" else "hidden_act"
    if cfg.get(act_key, fam.activation) != fam.activation:
        raise ModelError(f"{source}: {act_key} {cfg[act_key]!r} is not {fam.activation}, which llama.cpp's "
                         f"{fam.gguf_arch} graph uses; this model cannot be exported to GGUF")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ModelError(f"{source}: {key} is true; edgekit's GGUF exporter writes {mt} layers without that "
                             "bias (as llama.cpp's graph for it has none). Convert with llama.cpp's "
                             "convert_hf_to_gguf.py instead")
    try:
        heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        hp = {
            "model_type": mt, "family": fam, "layout": LAYOUTS[fam.name], "arch": fam.gguf_arch,
            "layers": int(cfg["num_hidden_layers"]), "hidden": hidden, "ffn": int(cfg["intermediate_size"]),
            "heads": heads, "kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or hidden // heads), "vocab_size": int(cfg["vocab_size"]),
            "context": int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT),
            "rope_theta": float(cfg.get("rope_theta") or 10000.0), "eps": float(cfg.get("rms_norm_eps") or 1e-6),
            "tied": bool(cfg.get("tie_word_embeddings", mt == "gemma3_text")),
        }
        hp["rope_dims"] = int(float(cfg.get("partial_rotary_factor") or 1.0) * hp["head_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{source} lacks or mangles a required field ({e}); is this a {mt} config.json?") from e
    if hp["rope_dims"] != hp["head_dim"] and mt != "phi3":
        raise ModelError(f"{source}: partial_rotary_factor {cfg['partial_rotary_factor']} rotates part of each head, "
                         f"which edgekit's GGUF exporter handles for phi3 only; convert with convert_hf_to_gguf.py")
    hp["rope_scaling"] = _rope_scaling(cfg.get("rope_scaling"), hp, source, cfg)
    if mt == "gemma3_text":
        hp.update(_gemma3(cfg, hp, source))
    else:
        _window(cfg, hp, source)
    return hp


def _window(cfg: dict, hp: dict, source: Path) -> None:
    """Families whose llama.cpp graph attends to the whole context: a sliding window transformers applies is kept
    exact by recording the window as the trained context (llama.cpp warns when a longer one is asked for)."""
    types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    windowed = ("sliding_attention" in types) if types else window is not None
    hp["sliding_window"] = int(window or 0) if hp["model_type"] == "phi3" else None  # as convert_hf_to_gguf writes
    if windowed and window and int(window) < hp["context"]:
        log.warning("%s: sliding_window %d is shorter than the context %d; llama.cpp's %s graph attends to the "
                    "whole context, so the GGUF records %d as its trained context (they agree up to it)",
                    source, int(window), hp["context"], hp["arch"], int(window))
        hp["context"] = int(window)


def _gemma3(cfg: dict, hp: dict, source: Path) -> dict:
    """Gemma 3's sliding/global layers, as llama.cpp's gemma3 graph hard-codes them; anything else is refused."""
    n = hp["layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % int(cfg.get("sliding_window_pattern") or
                                       cfg.get("_sliding_window_pattern") or 6) else "full_attention" for i in range(n)]
    want = ["sliding_attention" if i % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1 else "full_attention"
            for i in range(n)]
    if list(types) != want:
        show = "".join("S" if t == "sliding_attention" else "G" for t in types)
        raise ModelError(f"{source}: layer_types {show} (S sliding, G global) is not the pattern llama.cpp's gemma3 "
                         f"hard-codes (every {GEMMA3_SWA_PATTERN}th layer global); it cannot run this model")
    local = float(cfg.get("rope_local_base_freq") or GEMMA3_LOCAL_ROPE_BASE)
    if local != GEMMA3_LOCAL_ROPE_BASE:
        raise ModelError(f"{source}: rope_local_base_freq {local:g} differs from the {GEMMA3_LOCAL_ROPE_BASE:g} "
                         "llama.cpp's gemma3 hard-codes for its sliding layers; it cannot run this model")
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for its 62-layer 27B); HF by
    # query_pre_attn_scalar ** -0.5.
    scalar = float(cfg.get("query_pre_attn_scalar") or hp["head_dim"])
    expected = hp["hidden"] / hp["heads"] if hp["layers"] == 62 else hp["head_dim"]
    if scalar != expected:
        raise ModelError(f"{source}: query_pre_attn_scalar {scalar:g} is not the {expected:g} llama.cpp's gemma3 "
                         "derives its attention scale from; it cannot run this model")
    for key in ("attn_logit_softcapping",):
        if cfg.get(key) is not None:
            raise ModelError(f"{source}: {key} is set, which llama.cpp's gemma3 graph does not apply; "
                             "it cannot run this model")
    if cfg.get("use_bidirectional_attention"):
        raise ModelError(f"{source}: use_bidirectional_attention is true (an embedding model); llama.cpp's gemma3 "
                         "is a causal decoder")
    if not cfg.get("sliding_window"):
        raise ModelError(f"{source}: gemma3 config has no sliding_window; llama.cpp's gemma3 needs the window size")
    return {"sliding_window": int(cfg["sliding_window"]), "softcap": cfg.get("final_logit_softcapping")}


def _rope_scaling(rs: dict | None, hp: dict, source: Path, cfg: dict | None = None) -> dict | None:
    kind = (rs or {}).get("rope_type") or (rs or {}).get("type") or "default"
    allowed = hp["layout"].rope if "layout" in hp else ("default", "linear", "llama3")
    if kind not in allowed:
        raise ModelError(f"{source}: rope_scaling type {kind!r} is not supported by edgekit's GGUF exporter for "
                         f"{hp.get('model_type', 'llama')} (it handles {', '.join(a for a in allowed if a != 'su')}); "
                         "convert with llama.cpp's convert_hf_to_gguf.py")
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(rs["factor"])}
    if kind in ("longrope", "su"):
        return _longrope(rs, hp, source, cfg or {})
    # llama3: llama.cpp applies Llama 3's frequency scaling through a ``rope_freqs`` tensor of per-pair factors.
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", 8192))
    d = hp["head_dim"]
    factors = []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * hp["rope_theta"] ** (i / d)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"type": "llama3", "freqs": factors}


def _longrope(rs: dict, hp: dict, source: Path, cfg: dict) -> dict:
    """Phi-3's longrope as convert_hf_to_gguf writes it: short/long factor tensors and an attention factor."""
    orig = int(cfg.get("original_max_position_embeddings") or hp["context"])
    long, short = rs.get("long_factor"), rs.get("short_factor")
    if not long or not short or len(long) != len(short) or len(long) != hp["rope_dims"] // 2:
        raise ModelError(f"{source}: rope_scaling longrope needs long_factor and short_factor of "
                         f"{hp['rope_dims'] // 2} values each (half the rotary dimensions); the config is inconsistent")
    scale = hp["context"] / orig
    attn = float(rs.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0))
    return {"type": "longrope", "long": [float(x) for x in long], "short": [float(x) for x in short],
            "attn_factor": attn, "original_context": orig}


def _add_hparams(w, hp: dict) -> None:
    from gguf import RopeScalingType

    w.add_vocab_size(hp["vocab_size"])
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["layers"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_freq_base(hp["rope_theta"])  # gemma3: the global layers' base
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_rope_dimension_count(hp["rope_dims"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"] or hp["model_type"] == "gemma3_text":
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if hp.get("sliding_window") is not None:
        w.add_sliding_window(hp["sliding_window"])
    if hp.get("softcap") is not None:
        w.add_final_logit_softcapping(float(hp["softcap"]))
    rs = hp["rope_scaling"]
    if rs and rs["type"] == "linear":  # gemma3: llama.cpp applies it to the global layers only, as HF does
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    if hp["model_type"] == "phi3":
        w.add_rope_scaling_orig_ctx_len(rs["original_context"] if rs else hp["context"])
        if rs:
            w.add_rope_scaling_attn_factors(rs["attn_factor"])


# --------------------------------------------------------------------------- tensors


def _safetensors_keys(model_dir: Path) -> dict[str, tuple[Path, list[int]]]:
    """Every tensor key in the folder's safetensors files -> (file, shape); headers only."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no .safetensors weights; edgekit exports safetensors folders only "
                         "(save the model with save_pretrained(dir, safe_serialization=True))")
    keys: dict[str, tuple[Path, list[int]]] = {}
    for f in files:
        check_safetensors(f)  # the header against the file's size, before safetensors maps it
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    keys[k] = (f, list(h.get_slice(k).get_shape()))
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise ModelError(f"{f} is not a readable safetensors file ({e}); re-save or re-download it") from e
    return keys


def _hf_tensors(hp: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors a ``hp`` model of its family holds, with the shapes config.json implies, in file order."""
    fam, h, f, d = hp["family"], hp["hidden"], hp["ffn"], hp["head_dim"]
    sandwich = fam.norms_per_layer == 4
    q, kv = hp["heads"] * d, hp["kv_heads"] * d
    want: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (hp["vocab_size"], h))]
    for i in range(hp["layers"]):
        p = f"model.layers.{i}."
        want.append((p + "input_layernorm.weight", (h,)))
        if fam.fused:
            want.append((p + "self_attn.qkv_proj.weight", (q + 2 * kv, h)))
        else:
            want += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                     (p + "self_attn.v_proj.weight", (kv, h))]
        if fam.attn_bias:
            want += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                     (p + "self_attn.v_proj.bias", (kv,))]
        if fam.qk_norm:
            want += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
        want += [(p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,))]
        if sandwich:
            want += [(p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,))]
        if fam.fused:
            want.append((p + "mlp.gate_up_proj.weight", (2 * f, h)))
        else:
            want += [(p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h))]
        want.append((p + "mlp.down_proj.weight", (h, f)))
    want.append(("model.norm.weight", (h,)))
    if not hp["tied"]:
        want.append(("lm_head.weight", (hp["vocab_size"], h)))
    return want


def _tensor_plan(keys: dict[str, tuple[Path, list[int]]], hp: dict, model_dir: Path) -> list[dict]:
    """The GGUF tensors in file order, each mapped to its HF key (names from gguf-py's map), with the shape checked."""
    import gguf

    want = _hf_tensors(hp)
    fam, layout = hp["family"], hp["layout"]
    used = {k for k, _ in want} | ({"lm_head.weight"} if hp["tied"] else set())
    extra = [k for k in keys if k not in used and not _IGNORED.search(k)]
    if extra:
        what = "a bias-free Llama" if fam.gguf_arch == "llama" else f"a {hp['model_type']} model as llama.cpp runs it"
        raise ModelError(f"{model_dir} has tensors {what} does not ({', '.join(sorted(extra)[:3])}"
                         f"{' ...' if len(extra) > 3 else ''}); edgekit cannot export this variant to GGUF -- "
                         "use llama.cpp's convert_hf_to_gguf.py")
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[fam.gguf_arch]
    names = gguf.get_tensor_name_map(arch, hp["layers"])
    plan = []
    for hf, shape in want:
        if hf not in keys:
            raise ModelError(f"{model_dir}: tensor {hf} is missing from the safetensors files; the checkpoint is "
                             f"incomplete or not a {hp['model_type']} model -- re-save it with save_pretrained")
        f, got = keys[hf]
        if tuple(got) != shape:
            raise ModelError(f"{f}: {hf} has shape {got} but config.json implies {list(shape)}; config and "
                             "weights disagree -- re-save the model")
        gg = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gg is None:  # a gap in gguf-py's map for this architecture, not a user error
            raise ModelError(f"gguf-py has no {hp['arch']} name for {hf}; upgrade the gguf package")
        kind = ""
        if layout.permute_qk and gg.endswith(("attn_q.weight", "attn_k.weight")):
            kind = "q" if gg.endswith("attn_q.weight") else "k"
        elif layout.norm_shift and gg.endswith("norm.weight"):
            kind = "norm_shift"
        plan.append({"name": gg, "key": hf, "file": f, "shape": list(shape), "kind": kind})
    rs = hp["rope_scaling"]
    if rs and rs["type"] == "llama3":
        plan.append({"name": "rope_freqs.weight", "key": None, "file": None,
                     "shape": [hp["head_dim"] // 2], "kind": "rope_freqs"})
    if rs and rs["type"] == "longrope":
        for which in ("long", "short"):
            plan.append({"name": f"rope_factors_{which}.weight", "key": None, "file": None,
                         "shape": [hp["rope_dims"] // 2], "kind": f"rope_{which}"})
    return plan


def rope_interleave(w, n_head: int):
    """HF's half-split rotary rows -> llama.cpp's adjacent-pair rows, per head (works on numpy and torch)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(t, plan_item: dict, hp: dict):
    """One HF tensor (torch) -> the numpy array the GGUF stores."""
    import numpy as np
    import torch

    kind = plan_item["kind"]
    if kind == "rope_freqs":
        return np.asarray(hp["rope_scaling"]["freqs"], dtype=np.float32)
    if kind in ("rope_long", "rope_short"):
        return np.asarray(hp["rope_scaling"][kind[5:]], dtype=np.float32)
    t = t.to(torch.float32)
    if kind == "q":
        t = rope_interleave(t, hp["heads"])
    elif kind == "k":
        t = rope_interleave(t, hp["kv_heads"])
    elif kind == "norm_shift":
        t = t + hp["layout"].norm_shift
    kind = plan_item["type"]
    if kind == "F32":
        return t.contiguous().numpy()
    if kind == "F16":
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)  # BF16 as raw bits


@contextlib.contextmanager
def _open_all(keys: dict[str, tuple[Path, list[int]]]):
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        yield {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in sorted({f for f, _ in keys.values()})}


class _NoBar:
    def update(self, n: float = 1) -> None:
        pass


def _progress(enabled: bool, total: float, desc: str):
    return bar(total=total, desc=desc, unit="B") if enabled else contextlib.nullcontext(_NoBar())


# --------------------------------------------------------------------------- tokenizer


def _pre_step(step: dict) -> str:
    """A short, comparable name for one pre-tokenizer step (the keys of :data:`PRE_TOKENIZERS`)."""
    kind = step.get("type", "?")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return "ByteLevel(prefix space)"
        return "ByteLevel" if step.get("use_regex", True) else "ByteLevel(no regex)"
    if kind == "Digits":
        return "Digits(individual)" if step.get("individual_digits") else "Digits"
    if kind == "Split":
        pattern = step.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String", "?"))
        named = {_LLAMA3_SPLIT: "Split(llama3)", _QWEN2_SPLIT: "Split(qwen2)"}
        return named.get(regex, f"Split({regex!r})")
    return kind


def detect_pre_tokenizer(pre_tokenizer: dict | None, source: Path | str = "tokenizer.json") -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name for a tokenizer.json ``pre_tokenizer``, by :data:`PRE_TOKENIZERS`."""
    if not pre_tokenizer:
        steps: list[dict] = []
    elif pre_tokenizer.get("type") == "Sequence":
        steps = pre_tokenizer.get("pretokenizers", [])
    else:
        steps = [pre_tokenizer]
    shape = tuple(_pre_step(s) for s in steps)
    if shape in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[shape]
    known = "; ".join(f"{' + '.join(k)} -> {v}" for k, v in PRE_TOKENIZERS.items())
    raise ModelError(f"{source}: pre-tokenizer {' + '.join(shape) or '(none)'} has no entry in edgekit's table "
                     f"of llama.cpp pre-tokenizers ({known}); if you know the llama.cpp name that splits text the "
                     "same way, pass tokenizer_pre=<name>")


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPM_CONTROL_SCORE = -1000.0  # what convert_hf_to_gguf's SentencePiece vocabularies give control/user tokens


def _normalizer_steps(normalizer: dict | None) -> tuple[str, ...]:
    """tokenizer.json's normalizer as a short comparable shape, e.g. ("Prepend(▁)", "Replace(' '->▁)")."""
    if not normalizer:
        return ()
    if normalizer.get("type") == "Sequence":
        return tuple(s for n in normalizer.get("normalizers", []) for s in _normalizer_steps(n))
    kind = normalizer.get("type", "?")
    if kind == "Prepend":
        return (f"Prepend({normalizer.get('prepend')})",)
    if kind == "Replace":
        pattern = normalizer.get("pattern", {})
        return (f"Replace({pattern.get('String', pattern.get('Regex', '?'))!r}->{normalizer.get('content')})",)
    return (kind,)


# SentencePiece-style BPE (tokenizer.json with byte fallback): the (normalizer, pre-tokenizer) shapes llama.cpp's
# SPM tokenizer reproduces -> tokenizer.ggml.add_space_prefix. llama.cpp escapes spaces as ▁ itself and, with the
# prefix on, puts one space before the text and after each special token, as these shapes do per segment.
SPM_SHAPES: dict[tuple[tuple[str, ...], str], bool] = {
    (("Replace(' '->▁)",), "none"): False,                     # Gemma
    (("Prepend(▁)", "Replace(' '->▁)"), "none"): True,         # Llama 2 / Mistral / Phi-3 (legacy)
    ((), "Metaspace(always)"): True,
    ((), "Metaspace(never)"): False,
}


def _spm_pre(pre: dict | None) -> str:
    if not pre:
        return "none"
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" and not pre.get("split", True):
        return f"Metaspace({pre.get('prepend_scheme', 'always')})"
    return pre.get("type", "?")


def _tokenizer_kind(tj: dict, path: Path) -> tuple[str, bool | None]:
    """``("gpt2", None)`` for byte-level BPE, ``("llama", add_space_prefix)`` for SentencePiece-style BPE."""
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer")
    byte_level = "ByteLevel" in json.dumps(pre) or (tj.get("decoder") or {}).get("type") == "ByteLevel"
    normalizer = tj.get("normalizer")
    if model.get("type") == "BPE" and byte_level:
        if _normalizer_steps(normalizer):
            raise ModelError(f"{path}: the tokenizer normalizes text ({normalizer.get('type')}) before splitting, "
                             "which llama.cpp's gpt2 tokenizer does not do; the GGUF would tokenize differently")
        return "gpt2", None
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        shape = (_normalizer_steps(normalizer), _spm_pre(pre))
        if shape not in SPM_SHAPES:
            known = "; ".join(f"{' + '.join(n) or '-'} / {p}" for n, p in SPM_SHAPES)
            raise ModelError(f"{path}: a SentencePiece-style tokenizer with normalizer {' + '.join(shape[0]) or '-'} "
                             f"and pre-tokenizer {shape[1]} splits text in a way llama.cpp's SPM tokenizer does not "
                             f"reproduce (edgekit writes: {known}); convert with llama.cpp's convert_hf_to_gguf.py")
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model.get("vocab", {})]
        if missing:
            raise ModelError(f"{path}: byte fallback is on but {len(missing)} byte tokens (e.g. {missing[0]}) are not "
                             "in the vocabulary; llama.cpp's SPM tokenizer needs all 256 <0xNN> tokens")
        return "llama", SPM_SHAPES[shape]
    what = f"a {model.get('type', 'unknown')} tokenizer" + ("" if byte_level or model.get("type") != "BPE"
                                                            else " without byte-level splitting or byte fallback")
    raise ModelError(f"{path}: {what} cannot be written to GGUF: edgekit writes byte-level BPE (gpt2: GPT-2, SmolLM, "
                     "Llama 3, Qwen style) and SentencePiece-style BPE with byte fallback (llama: Gemma, Phi-3, "
                     "Mistral style) tokenizers -- convert with llama.cpp's convert_hf_to_gguf.py")


def _tokenizer(model_dir: Path, cfg: dict, n_vocab: int, pre_override: str | None) -> dict:
    """Everything tokenizer.* in the GGUF, from tokenizer.json, tokenizer_config.json and the chat template."""
    from gguf import TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        what = "a SentencePiece tokenizer.model" if (model_dir / "tokenizer.model").is_file() else "no tokenizer.json"
        raise ModelError(f"{model_dir} has {what}; edgekit's GGUF exporter writes tokenizers from tokenizer.json "
                         "only -- save the fast tokenizer (tokenizer.save_pretrained) or convert with "
                         "llama.cpp's convert_hf_to_gguf.py")
    tj = _json(path)
    model = tj.get("model") or {}
    kind, space_prefix = _tokenizer_kind(tj, path)
    if kind == "gpt2":
        pre_name = pre_override or detect_pre_tokenizer(tj.get("pre_tokenizer"), path)
    else:
        pre_name = pre_override or "default"  # llama.cpp's SPM tokenizer has no pre-tokenizer variants

    tokens: list[str | None] = [None] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in model.get("vocab", {}).items():
        byte = kind == "llama" and _BYTE_TOKEN.match(text)
        _place(tokens, types, i, text, int(TokenType.BYTE if byte else TokenType.NORMAL), path, n_vocab)
    for a in tj.get("added_tokens", []):
        kind_ = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
        _place(tokens, types, a["id"], a["content"], int(kind_), path, n_vocab)
    padded = [i for i, t in enumerate(tokens) if t is None]
    for i in padded:
        tokens[i] = f"[PAD{i}]"
    if padded:
        log.info("%s: %d embedding rows have no token; writing them as unused [PAD<i>] tokens", path, len(padded))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    scores = _spm_scores(tokens, types, merges) if kind == "llama" else None

    tc = _json(model_dir / "tokenizer_config.json", required=False)
    gen = _json(model_dir / "generation_config.json", required=False)
    ids = {t: i for i, t in enumerate(tokens)}
    for a in tj.get("added_tokens", []):
        ids[a["content"]] = a["id"]
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        tok = tc.get(f"{role}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        tok_id = ids.get(tok) if tok else None
        if role == "unk" and tok_id is None and model.get("unk_token"):
            tok_id = ids.get(model["unk_token"])
        cfg_ids = _id_list(gen.get(f"{role}_token_id", cfg.get(f"{role}_token_id")))
        if cfg_ids and tok_id not in cfg_ids:
            if tok_id is not None:
                log.warning("%s says %s token is %r (id %d) but config.json/generation_config.json say id %d; "
                            "using %d, the id transformers' generate uses", model_dir / "tokenizer_config.json",
                            role, tok, tok_id, cfg_ids[0], cfg_ids[0])
            tok_id = cfg_ids[0]
        if tok_id is not None and 0 <= tok_id < n_vocab:
            special[role] = tok_id

    add_bos, add_eos = _post_processor_flags(tj.get("post_processor"), tokens, special)
    if isinstance(tc.get("add_bos_token"), bool):
        add_bos = tc["add_bos_token"]
    if isinstance(tc.get("add_eos_token"), bool):
        add_eos = tc["add_eos_token"]

    template = None
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif tc.get("chat_template"):
        template = tc["chat_template"]
    return {"model": kind, "pre": pre_name, "tokens": tokens, "types": types, "scores": scores,
            "merges": merges if kind == "gpt2" else None, "space_prefix": space_prefix, "special": special,
            "add_bos": add_bos, "add_eos": add_eos, "chat_template": template,
            "rstrip": {a["content"] for a in tj.get("added_tokens", []) if a.get("rstrip")}}


# llama.cpp (llama-vocab.cpp) gives special tokens an attribute the GGUF cannot carry, by general.name: a name with
# "phi-3" or "phi3" makes every special token but these swallow the whitespace after it (Phi-3's rstrip).
_PHI3_NAME = re.compile(r"(?i)(phi)-?(3)")
_PHI3_KEEPS_SPACE = ("<unk>", "<s>", "<|endoftext|>")


def _llama_cpp_name(name: str, vocab: dict) -> str:
    """``name``, changed only as far as needed for llama.cpp's name-keyed Phi-3 rule to strip what HF strips."""
    from gguf import TokenType

    special = (int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN))
    rule = {t for t, ty in zip(vocab["tokens"], vocab["types"]) if ty in special or t == "</s>"}
    rule -= set(_PHI3_KEEPS_SPACE)
    hf = vocab["rstrip"]
    fixed = name
    if _PHI3_NAME.search(name) and hf != rule:
        fixed = _PHI3_NAME.sub(r"\1_\2", name)
    elif not _PHI3_NAME.search(name) and hf and hf == rule:
        fixed = f"{name} phi-3"
    if fixed != name:
        log.warning("GGUF general.name %r written as %r: llama.cpp strips the space after special tokens exactly "
                    "when the name contains 'phi-3' or 'phi3', and this tokenizer %s", name, fixed,
                    "does not strip it" if fixed != f"{name} phi-3" else "does (Phi-3's rule)")
    return fixed


def _spm_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """Scores for llama.cpp's SPM tokenizer, which merges the adjacent pair whose joined text has the highest score:
    a token made by the merge of rank r scores -r (so merges apply in the BPE's order); byte tokens 0; control and
    user-defined tokens -1000, as SentencePiece vocabularies converted by convert_hf_to_gguf have them."""
    from gguf import TokenType

    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    normal = (int(TokenType.NORMAL), int(TokenType.BYTE))
    return [(-float(rank.get(t, 0)) if ty == int(TokenType.NORMAL) else 0.0) if ty in normal
            else _SPM_CONTROL_SCORE for t, ty in zip(tokens, types)]


def _place(tokens: list, types: list, i: int, text: str, kind: int, path: Path, n_vocab: int) -> None:
    if not 0 <= i < n_vocab:
        raise ModelError(f"{path}: token {text!r} has id {i} but the model's embedding has only {n_vocab} rows "
                         "(config.json vocab_size); tokenizer and model do not belong together")
    tokens[i], types[i] = text, kind


def _id_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def _post_processor_flags(pp: dict | None, tokens: list[str], special: dict) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS (first) / EOS (last) to a single sequence."""
    if not pp:
        return False, False
    if pp.get("type") == "Sequence":
        flags = [_post_processor_flags(p, tokens, special) for p in pp.get("processors", [])]
        return any(f[0] for f in flags), any(f[1] for f in flags)
    if pp.get("type") != "TemplateProcessing":
        return False, False
    single = pp.get("single") or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    last = single[-1].get("SpecialToken", {}).get("id") if single else None
    bos = tokens[special["bos"]] if "bos" in special else None
    eos = tokens[special["eos"]] if "eos" in special else None
    return first is not None and first == bos, last is not None and last == eos and len(single) > 1


def _add_tokenizer(w, v: dict) -> None:
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    if v["scores"] is not None:
        w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    if v["merges"] is not None:
        w.add_token_merges(v["merges"])
    if v["space_prefix"] is not None:
        w.add_add_space_prefix(v["space_prefix"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for role, i in v["special"].items():
        adders[role](i)
    w.add_add_bos_token(v["add_bos"])
    w.add_add_eos_token(v["add_eos"])
    if v["chat_template"]:
        w.add_chat_template(v["chat_template"])


def _json(path: Path, required: bool = True) -> dict:
    return read_json(path, required, "a model folder needs config.json and tokenizer.json")


# --------------------------------------------------------------------------- the export stage's exporter


def export_artifact(cfg, model, tmp: Path, texts: list[str] | None) -> dict:
    """The export stage's GGUF step: floats are written directly; quantized types are made by llama.cpp's
    quantizer from a temporary f32 GGUF (guided by an importance matrix when ``texts`` are given)."""
    meta = {"name": model.name, "license": model.license, "teacher": model.origin}
    final = tmp / "model.gguf"
    if cfg.quant in GGUF_FLOATS:
        written = export_gguf(model.path, final, cfg.quant, **meta)
        return {"model_file": final.name, "size_bytes": final.stat().st_size, "export": written,
                "bits_per_weight": 8 * final.stat().st_size / model.arch.params}
    if cfg.quant == "auto":
        return _export_auto(cfg, model, final, texts, meta)
    source = tmp / "source-f32.gguf.tmp"  # the quantizer's input; deleted before the manifest is written
    try:
        export_gguf(model.path, source, "f32", **meta)
        imatrix = None
        if texts is not None:
            imatrix = compute_imatrix(model.path, texts, max_tokens=cfg.calibration_tokens)
            save_imatrix(tmp / "imatrix.safetensors", imatrix, {"texts": len(texts), "model": model.name})
        report = quantize_gguf(source, final, cfg.quant, imatrix=imatrix, nthreads=cfg.threads)
        artifact.fault_point("quantize.done")
        # the quantizer saw temporary paths; record what they are once the folder is renamed into place
        report.update(path=final.name, source=f"f32 GGUF of {model.path} (temporary, deleted)")
    finally:
        source.unlink(missing_ok=True)
    artifact.atomic_write_text(tmp / "quant_report.json", json.dumps(report, indent=2, default=str) + "\n")
    return {"model_file": final.name, "size_bytes": final.stat().st_size,
            "bits_per_weight": report["bits_per_weight"], "fallbacks": report["fallbacks"],
            "imatrix": texts is not None}


def _export_auto(cfg, model, final: Path, texts: list[str], meta: dict) -> dict:
    """``quant: auto``: measure each matrix's sensitivity, choose its type for the target size
    (:mod:`edgekit.quantize.auto`), then write the GGUF with each matrix quantized by ggml's own quantizer."""
    plan = _tensor_plan(_safetensors_keys(model.path), _hparams(_json(model.path / "config.json"), model.path),
                        model.path)
    names = {t["key"].removesuffix(".weight"): t["name"] for t in plan if len(t["shape"]) == 2}
    fixed = sum(4 * math.prod(t["shape"]) for t in plan if len(t["shape"]) == 1)
    budget = auto.budget_bytes(cfg.target, model.arch)
    auto.check_budget([tuple(t["shape"]) for t in plan if len(t["shape"]) == 2], fixed, budget,
                      auto.gguf_candidates)
    mix, imatrix = auto.mix_for("gguf", model.path, {g: [m] for m, g in names.items()}, fixed, texts, budget,
                                lambda row: auto.gguf_candidates(row, cfg.threads),
                                calibration_tokens=cfg.calibration_tokens)
    save_imatrix(final.parent / "imatrix.safetensors", imatrix, {"texts": len(texts), "model": model.name})
    artifact.fault_point("quantize.done")
    written = export_gguf(model.path, final, "f32", types=mix.types,
                          quantize=lambda name, arr, dtype: ggml.quantize(arr, dtype, imatrix.get(name), cfg.threads),
                          **meta)
    tensors = read_gguf(final)["tensors"]
    params = sum(math.prod(t["shape"]) for t in tensors)
    nbytes = sum(t["nbytes"] for t in tensors)
    report = {"quant": "auto", "target": cfg.target, **mix.summary(), "size_bytes": final.stat().st_size,
              "bits_per_weight": round(8 * nbytes / params, 4), "tensors": mix.rows, "path": final.name}
    artifact.atomic_write_text(final.parent / "quant_report.json", json.dumps(report, indent=2) + "\n")
    return {"model_file": final.name, "size_bytes": final.stat().st_size, "bits_per_weight": report["bits_per_weight"],
            "fallbacks": [], "imatrix": True, "auto": {**mix.summary(), "target": cfg.target},
            "n_tensors": written["n_tensors"]}


def _check(cfg) -> None:
    if cfg.calibrate and cfg.quant in GGUF_FLOATS:
        raise RecipeError(f"calibrate needs a quantized type, not {cfg.quant}: an importance matrix only "
                          "guides quantization; pick e.g. --quant q4_k_m")


def _space(quant: str, params: int) -> float:
    """Floats write the file once; quantized types first write an f32 GGUF for the quantizer."""
    return params * {"f32": 4.0, "f16": 2.0, "bf16": 2.0}.get(quant, 4.0 + 1.1)


EXPORTER = Exporter("gguf", export_artifact, version=1, default_quant="f16", check=_check, space=_space,
                    description="edgekit's GGUF writer, then llama.cpp's quantizer (imatrix with calibrate)")


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``): the GGUF exporter."""
    reg.add(registry.EXPORTER, EXPORTER.format, EXPORTER)
