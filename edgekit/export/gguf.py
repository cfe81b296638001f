"""Hugging Face Llama folder -> GGUF file for llama.cpp, written with gguf-py's ``GGUFWriter``.

What the file holds, and why:

- Weights are read from ``*.safetensors`` only (never pickles), one tensor at a
  time, and streamed into the file: the header and tensor table are written
  first from the shapes alone, so no two full copies of the model are in memory.
- Names follow llama.cpp's ``llama`` architecture (``token_embd``,
  ``blk.N.attn_q`` ... ``output_norm``, ``output``). A tied LM head writes no
  ``output.weight``: llama.cpp then uses ``token_embd`` for both.
- ``attn_q`` / ``attn_k`` rows are reordered per head. Hugging Face's Llama
  rotates the two *halves* of each head (``rotate_half``); llama.cpp's rope for
  ``llama`` rotates *adjacent pairs*. Row ``2i`` of a head becomes HF row ``i``
  and row ``2i+1`` HF row ``i + head_dim/2``, which makes both compute the same.
- 1-D tensors (the RMSNorm weights) stay f32 whatever ``dtype`` says, as
  llama.cpp expects; matrices are f32, f16 or bf16.
- The tokenizer goes in whole: byte-level BPE as ``tokenizer.ggml.model = gpt2``,
  its pre-tokenizer as a llama.cpp name (:data:`PRE_TOKENIZERS`), tokens with
  their types (normal / control for special added tokens / user-defined for the
  other added tokens), merges, special ids, add-BOS/EOS flags and the chat template.

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
from pathlib import Path

from edgekit import __version__, artifact, registry
from edgekit.arch import DEFAULT_CONTEXT
from edgekit.artifact import fault_point
from edgekit.errors import ModelError, RecipeError
from edgekit.export.exporter import Exporter
from edgekit.hf import read_json
from edgekit.integrity import check_safetensors
from edgekit.progress import bar
from edgekit.quantize.gguf import compute_imatrix, quantize_gguf, read_gguf, save_imatrix  # noqa: F401 (read_gguf: public here too)
from edgekit.quantize.schemes import GGUF_FLOATS

log = logging.getLogger(__name__)

ARCH = "llama"
SUPPORTED_MODEL_TYPES = ("llama",)
# dtype argument -> (GGML tensor type name, general.file_type as llama.cpp's LLAMA_FTYPE_*)
DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32)}

# HF tensor names inside ``model.layers.N.`` -> GGUF names inside ``blk.N.``
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved; recomputed at load

# The rule table for ``tokenizer.ggml.pre``: the shape of tokenizer.json's ``pre_tokenizer``
# (each step as :func:`_pre_step` names it) -> the llama.cpp pre-tokenizer that splits text the same way.
# Each entry is checked end to end by a test that tokenizes through llama.cpp and through tokenizers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    # GPT-2's regex on bytes (and any tokenizer trained with a bare ByteLevel pre-tokenizer)
    ("ByteLevel",): "gpt-2",
    # SmolLM / SmolLM2 (StarCoder's rules): every digit alone, then GPT-2's regex
    ("Digits(individual)", "ByteLevel"): "smollm",
    # Llama 3.x: its own split regex (numbers in groups of up to 3), then bytes without a regex
    ("Split(llama3)", "ByteLevel(no regex)"): "llama-bpe",
}


# --------------------------------------------------------------------------- export


def export_gguf(model_dir: Path, out: Path, dtype: str = "f16", *, name: str | None = None,
                license: str | None = None, teacher: str | None = None, progress: bool = True,
                tokenizer_pre: str | None = None) -> dict:
    """Write ``model_dir`` (an HF Llama safetensors folder) as a GGUF at ``out``; returns a summary.

    ``dtype`` is f32, f16 or bf16 for the matrices (norms stay f32). ``teacher``
    is recorded as the model's source (``general.base_model.0.name`` and
    ``edgekit.teacher``). ``tokenizer_pre`` overrides the detected llama.cpp
    pre-tokenizer name. The file appears at ``out`` only when complete.
    """
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

    w = GGUFWriter(path=None, arch=ARCH)
    w.add_type("model")
    w.add_name(name or cfg.get("_name_or_path") or model_dir.name)
    if license:
        w.add_license(license)
    if teacher:
        w.add_base_model_count(1)
        w.add_base_model_name(0, teacher)
        w.add_string("edgekit.teacher", teacher)
    w.add_string("edgekit.version", __version__)
    w.add_file_type(file_type)
    _add_hparams(w, hp)
    _add_tokenizer(w, vocab)

    total_bytes = params = 0
    for t in plan:
        t["type"] = "F32" if len(t["shape"]) == 1 else ggml_type
        t["nbytes"] = math.prod(t["shape"]) * (4 if t["type"] == "F32" else 2)
        np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t["type"]]  # BF16 travels as raw bits
        w.add_tensor_info(t["name"], t["shape"], np.dtype(np_dtype), t["nbytes"],
                          raw_dtype=GGMLQuantizationType[t["type"]])
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
                w.write_tensor_data(_convert(src, t, hp))
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
    log.info("wrote %s: %d tensors, %s, %.1f MB, tokenizer pre %s", out, len(plan), dtype, size / 1e6, vocab["pre"])
    return {"path": str(out), "size_bytes": size, "n_tensors": len(plan), "dtype": dtype, "params": params,
            "tied_embeddings": hp["tied"], "tokenizer_pre": vocab["pre"], "n_vocab": hp["vocab_size"]}


def _hparams(cfg: dict, source: Path) -> dict:
    """The architecture numbers llama.cpp needs, refusing what its ``llama`` graph would compute differently."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{source}: model_type {mt!r} cannot be exported to GGUF by edgekit yet (it writes "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models); convert it with llama.cpp's "
                         "convert_hf_to_gguf.py and pass the .gguf file instead")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{source}: hidden_act {cfg['hidden_act']!r} is not SiLU, which llama.cpp's llama graph "
                         "assumes; this model cannot be exported as a llama GGUF")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ModelError(f"{source}: {key} is true; edgekit's GGUF exporter writes bias-free Llama layers "
                             "only. Convert with llama.cpp's convert_hf_to_gguf.py instead")
    try:
        heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        hp = {
            "layers": int(cfg["num_hidden_layers"]), "hidden": hidden, "ffn": int(cfg["intermediate_size"]),
            "heads": heads, "kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or hidden // heads), "vocab_size": int(cfg["vocab_size"]),
            "context": int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT),
            "rope_theta": float(cfg.get("rope_theta") or 10000.0), "eps": float(cfg.get("rms_norm_eps") or 1e-6),
            "tied": bool(cfg.get("tie_word_embeddings", False)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{source} lacks or mangles a required field ({e}); is this a Llama config.json?") from e
    hp["rope_scaling"] = _rope_scaling(cfg.get("rope_scaling"), hp, source)
    return hp


def _rope_scaling(rs: dict | None, hp: dict, source: Path) -> dict | None:
    kind = (rs or {}).get("rope_type") or (rs or {}).get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(rs["factor"])}
    if kind == "llama3":
        # llama.cpp applies Llama 3's frequency scaling through a ``rope_freqs`` tensor of per-pair factors.
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
    raise ModelError(f"{source}: rope_scaling type {kind!r} is not supported by edgekit's GGUF exporter "
                     "(it handles none, linear and llama3); convert with llama.cpp's convert_hf_to_gguf.py")


def _add_hparams(w, hp: dict) -> None:
    w.add_vocab_size(hp["vocab_size"])
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["layers"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    rs = hp["rope_scaling"]
    if rs and rs["type"] == "linear":
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])


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


def _tensor_plan(keys: dict[str, tuple[Path, list[int]]], hp: dict, model_dir: Path) -> list[dict]:
    """The GGUF tensors in file order, each mapped to its HF key, with the shape checked."""
    h, L = hp["hidden"], hp["layers"]
    q, kv = hp["heads"] * hp["head_dim"], hp["kv_heads"] * hp["head_dim"]
    want: list[tuple[str, str, tuple[int, ...]]] = [("token_embd.weight", "model.embed_tokens.weight",
                                                     (hp["vocab_size"], h))]
    shapes = {"attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_k.weight": (kv, h),
              "attn_v.weight": (kv, h), "attn_output.weight": (h, q), "ffn_norm.weight": (h,),
              "ffn_gate.weight": (hp["ffn"], h), "ffn_up.weight": (hp["ffn"], h), "ffn_down.weight": (h, hp["ffn"])}
    for i in range(L):
        for hf, gg in _LAYER_TENSORS.items():
            want.append((f"blk.{i}.{gg}", f"model.layers.{i}.{hf}", shapes[gg]))
    want.append(("output_norm.weight", "model.norm.weight", (h,)))
    if not hp["tied"]:
        want.append(("output.weight", "lm_head.weight", (hp["vocab_size"], h)))

    used = {k for _, k, _ in want} | ({"lm_head.weight"} if hp["tied"] else set())
    extra = [k for k in keys if k not in used and not _IGNORED.search(k)]
    if extra:
        raise ModelError(f"{model_dir} has tensors a bias-free Llama does not ({', '.join(sorted(extra)[:3])}"
                         f"{' ...' if len(extra) > 3 else ''}); edgekit cannot export this variant to GGUF -- "
                         "use llama.cpp's convert_hf_to_gguf.py")
    plan = []
    for gg, hf, shape in want:
        if hf not in keys:
            raise ModelError(f"{model_dir}: tensor {hf} is missing from the safetensors files; the checkpoint is "
                             "incomplete or not a Llama -- re-save it with save_pretrained")
        f, got = keys[hf]
        if tuple(got) != shape:
            raise ModelError(f"{f}: {hf} has shape {got} but config.json implies {list(shape)}; config and "
                             "weights disagree -- re-save the model")
        kind = "q" if gg.endswith("attn_q.weight") else "k" if gg.endswith("attn_k.weight") else ""
        plan.append({"name": gg, "key": hf, "file": f, "shape": list(shape), "kind": kind})
    if hp["rope_scaling"] and hp["rope_scaling"]["type"] == "llama3":
        plan.append({"name": "rope_freqs.weight", "key": None, "file": None,
                     "shape": [hp["head_dim"] // 2], "kind": "rope_freqs"})
    return plan


def rope_interleave(w, n_head: int):
    """HF's half-split rotary rows -> llama.cpp's adjacent-pair rows, per head (works on numpy and torch)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(t, plan_item: dict, hp: dict):
    """One HF tensor (torch) -> the numpy array the GGUF stores."""
    import numpy as np
    import torch

    if plan_item["kind"] == "rope_freqs":
        return np.asarray(hp["rope_scaling"]["freqs"], dtype=np.float32)
    t = t.to(torch.float32)
    if plan_item["kind"] == "q":
        t = rope_interleave(t, hp["heads"])
    elif plan_item["kind"] == "k":
        t = rope_interleave(t, hp["kv_heads"])
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
        return "Split(llama3)" if regex == _LLAMA3_SPLIT else f"Split({regex!r})"
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


def _tokenizer(model_dir: Path, cfg: dict, n_vocab: int, pre_override: str | None) -> dict:
    """Everything tokenizer.* in the GGUF, from tokenizer.json, tokenizer_config.json and the chat template."""
    from gguf import TokenType

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        what = "a SentencePiece tokenizer.model" if (model_dir / "tokenizer.model").is_file() else "no tokenizer.json"
        raise ModelError(f"{model_dir} has {what}; edgekit's GGUF exporter writes byte-level BPE tokenizers from "
                         "tokenizer.json only -- save the fast tokenizer (tokenizer.save_pretrained) or convert with "
                         "llama.cpp's convert_hf_to_gguf.py")
    tj = _json(path)
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer")
    byte_level = "ByteLevel" in json.dumps(pre) or (tj.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        what = f"a {model.get('type', 'unknown')} tokenizer" + ("" if byte_level else " without byte-level splitting")
        raise ModelError(f"{path}: {what} cannot be written as llama.cpp's byte-level BPE (gpt2) tokenizer; "
                         "edgekit exports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style) -- pick a model "
                         "with one, or convert with llama.cpp's convert_hf_to_gguf.py")
    normalizer = tj.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise ModelError(f"{path}: the tokenizer normalizes text ({normalizer.get('type')}) before splitting, which "
                         "llama.cpp's gpt2 tokenizer does not do; the GGUF would tokenize differently")
    pre_name = pre_override or detect_pre_tokenizer(pre, path)

    tokens: list[str | None] = [None] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in model.get("vocab", {}).items():
        _place(tokens, types, i, text, int(TokenType.NORMAL), path, n_vocab)
    for a in tj.get("added_tokens", []):
        kind = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
        _place(tokens, types, a["id"], a["content"], int(kind), path, n_vocab)
    padded = [i for i, t in enumerate(tokens) if t is None]
    for i in padded:
        tokens[i] = f"[PAD{i}]"
    if padded:
        log.info("%s: %d embedding rows have no token; writing them as unused [PAD<i>] tokens", path, len(padded))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

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
    return {"pre": pre_name, "tokens": tokens, "types": types, "merges": merges, "special": special,
            "add_bos": add_bos, "add_eos": add_eos, "chat_template": template}


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
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
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
