"""What each quantization scheme does to each weight, per export format.

A :class:`Scheme` turns an :class:`~edgekit.arch.Architecture` into the list of
tensors the format stores, each with its storage type and exact byte size. The
planner's memory model and decode-speed model sum these; later the exporters
report what they really wrote against the same list.

GGUF rules mirror llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) for
the ftypes we expose: the output head (or the tied token embedding that serves
as it) is kept at Q6_K (Q8_0 when its rows are not a multiple of 256); ``_M``
mixes give ``attn_v`` and ``ffn_down`` Q6_K in the layers ``use_more_bits``
picks; and K-quants fall back (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->
IQ4_NL) when a row length is not a multiple of 256 -- SmolLM2's hidden size of
576 makes most of its tensors fall back. Block sizes come from ``gguf``'s own
table, so the byte counts are the library's, not ours. A test checks these
choices against llama.cpp's quantizer tensor by tensor.

Built-ins register exactly as a third party would: :func:`register` is this module's entry point in
the ``edgekit`` group (see :mod:`edgekit.registry`); a scheme is registered as ``"<format>/<name>"``.
Each scheme is the one place that says everything about it: its memory layout for the planner, whether
``calibrate`` applies, and in ``options`` what its format's exporter needs (llama.cpp's ftype, ONNX's
quantizer settings, ExecuTorch's weight bits). The exporters read their tables from the registered
schemes (:class:`SchemeTable`), so adding a scheme is one row here (or one ``reg.add`` in a plugin).
Which runtimes run a format is the runtimes' own word (their ``formats``), read by :func:`runtimes`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgekit import registry
from edgekit.arch import Architecture
from edgekit.errors import RecipeError


@dataclass(frozen=True)
class Tensor:
    name: str
    row: int  # length of one row (ggml ne[0]: the input dimension of a matmul)
    rows: int
    dtype: str  # storage type actually used
    nbytes: int
    role: str  # embedding | output | attention | mlp | norm
    requested: str = ""  # the type the scheme asked for, when a fallback replaced it

    @property
    def params(self) -> int:
        return self.row * self.rows


@dataclass(frozen=True)
class Format:
    name: str
    file_suffix: str
    kv_dtype_bytes: int  # bytes per cached K or V value at the runtime's default
    description: str


@dataclass(frozen=True)
class Scheme:
    format: str
    name: str
    description: str
    layout: Callable[[Architecture], list[Tensor]] = field(repr=False)
    row_multiple: int = 1  # rows that are multiples of this quantize without fallback
    calibrate: bool = False  # `calibrate` (imatrix / activation-aware scaling) applies to this scheme
    # What the format's exporter needs to make this scheme (read through SchemeTable by the exporter).
    options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    def tensors(self, arch: Architecture) -> list[Tensor]:
        return list(_laid_out(self.layout, arch))

    def weight_bytes(self, arch: Architecture) -> int:
        return sum(t.nbytes for t in _laid_out(self.layout, arch))

    def bits_per_weight(self, arch: Architecture) -> float:
        ts = _laid_out(self.layout, arch)
        return 8 * sum(t.nbytes for t in ts) / sum(t.params for t in ts)

    def fallbacks(self, arch: Architecture) -> list[Tensor]:
        return [t for t in _laid_out(self.layout, arch) if t.requested and t.requested != t.dtype]


@functools.lru_cache(maxsize=1024)
def _laid_out(layout: Callable[[Architecture], list[Tensor]], arch: Architecture) -> tuple[Tensor, ...]:
    """A layout is a pure function of the (frozen) architecture; the planner asks for the same one for every
    device, context and candidate shape (~10^3 tensors each), so each is built once."""
    return tuple(layout(arch))


def scheme_key(fmt: str, name: str) -> str:
    """A scheme's name in the registry: ``"<format>/<scheme>"`` (``gguf/q4_k_m``)."""
    return f"{fmt}/{name}"


def formats() -> dict[str, Format]:
    return registry.items(registry.FORMAT)


def get_format(name: str) -> Format:
    return registry.get(registry.FORMAT, name, error=RecipeError)


def runtimes(fmt: str) -> list[str]:
    """Registered runtimes that run ``fmt`` (each runtime lists its ``formats``), in registration order; not the
    opt-in ones (the browser runtimes), which are measured only when named."""
    return [name for name, rt in registry.items(registry.RUNTIME).items()
            if fmt in rt.formats and not getattr(rt, "opt_in", False)]


def schemes(fmt: str | None = None) -> list[Scheme]:
    return [s for s in registry.items(registry.SCHEME).values() if fmt is None or s.format == fmt]


def get_scheme(fmt: str, name: str) -> Scheme:
    get_format(fmt)
    found = registry.items(registry.SCHEME).get(scheme_key(fmt, name.lower()))
    if found is None:
        names = [s.name for s in schemes(fmt)]
        elsewhere = [s.format for s in schemes() if s.name == name.lower()]
        hint = f" ({name!r} is a {elsewhere[0]} scheme: pass --format {elsewhere[0]})" if elsewhere else ""
        raise RecipeError(f"unknown quant {name!r} for format {fmt}{hint}; choose one of {', '.join(names)}")
    return found


class SchemeTable(Mapping):
    """An exporter's quant table, built from the registered schemes of ``fmt`` on first use.

    ``build(schemes)`` turns the format's registered schemes into the table (usually ``{s.name: spec}``,
    plus variants such as ONNX's calibrated ``int4-awq``). Reading the registry lazily keeps importing an
    exporter (which the registry itself does, to call its entry point) free of lookups.
    """

    def __init__(self, fmt: str, build: Callable[[list[Scheme]], Mapping[str, Any]]) -> None:
        self.format, self._build = fmt, build

    def _table(self) -> dict[str, Any]:
        return dict(self._build(schemes(self.format)))

    def __getitem__(self, key: str) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


# --------------------------------------------------------------------------- GGUF / llama.cpp


def ggml_nbytes(dtype: str, row: int, rows: int) -> int:
    """Bytes llama.cpp stores for a ``rows x row`` tensor of ``dtype``, from gguf's block table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    if row % block:
        raise ValueError(f"row of {row} is not a multiple of {dtype}'s block of {block}")
    return rows * (row // block) * size


def _ggml_block(dtype: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[dtype]][0]


_K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third layer between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf_type(ftype: str, base: str, role: str, kind: str, i: int, n: int, row: int) -> tuple[str, str]:
    """(type used, type requested) for one 2-D tensor, following llama_tensor_get_type."""
    want = base
    if base in ("F32", "F16", "BF16"):
        return base, ""
    if role == "output":
        want = "Q8_0" if row % 256 else ("Q8_0" if base == "Q8_0" else "Q6_K")
    elif kind == "attn_v":
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            want = "Q6_K"
        elif ftype == "q4_k_s" and i < 4:
            want = "Q5_K"
        elif ftype == "q3_k_m":
            want = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "q2_k":
            want = "Q3_K"
    elif kind == "ffn_down":
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            want = "Q6_K"
        elif ftype == "q4_k_s" and i < n // 8:
            want = "Q5_K"
        elif ftype == "q3_k_m":
            want = "Q5_K" if i < n // 16 else ("Q4_K" if use_more_bits(i, n) else "Q3_K")
        elif ftype == "q2_k":
            want = "Q3_K"
    elif kind == "attn_qkv":  # a fused qkv matrix holds attn_v's rows, so it gets a step more
        want = {"q4_k_m": "Q5_K", "q5_k_m": "Q6_K", "q3_k_m": "Q4_K"}.get(ftype, want)
    elif kind == "attn_output" and ftype == "q3_k_m":
        want = "Q4_K"
    used = want
    if want in _K_FALLBACK and row % 256:
        used = _K_FALLBACK[want]
    if row % _ggml_block(used):
        used = "F16"
    return used, (want if used != want else "")


def _small_tensors(a: Architecture, prefix: str, add) -> None:
    """The family's 1-D tensors beyond the two norms (all stored f32): q/k/v biases (Qwen2), per-head
    q/k norms (Qwen3, Gemma 3), the post-attention and post-MLP norms (Gemma 3)."""
    fam = a.family
    if fam.attn_bias:
        for name, n in (("attn_q.bias", a.q_dim), ("attn_k.bias", a.kv_dim), ("attn_v.bias", a.kv_dim)):
            add(prefix + name, n, 1, "norm")
    if fam.qk_norm:
        add(prefix + "attn_q_norm.weight", a.head_dim, 1, "norm")
        add(prefix + "attn_k_norm.weight", a.head_dim, 1, "norm")
    if fam.norms_per_layer > 2:
        add(prefix + "post_attention_norm.weight", a.hidden_size, 1, "norm")
        add(prefix + "post_ffw_norm.weight", a.hidden_size, 1, "norm")


def _gguf_layout(ftype: str, base: str) -> Callable[[Architecture], list[Tensor]]:
    def layout(a: Architecture) -> list[Tensor]:
        out: list[Tensor] = []

        def add(name, row, rows, role, kind="", i=0):
            if role == "norm":
                out.append(Tensor(name, row, rows, "F32", 4 * row * rows, role))
                return
            used, requested = _gguf_type(ftype, base, role, kind, i, a.layers, row)
            out.append(Tensor(name, row, rows, used, ggml_nbytes(used, row, rows), role, requested))

        h, q, kv, inter = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size
        # With tied embeddings llama.cpp has no output.weight: token_embd doubles as the head
        # and is quantized by the output rule.
        add("token_embd.weight", h, a.vocab_size, "output" if a.tie_embeddings else "embedding")
        fam = a.family
        for i in range(a.layers):
            b = f"blk.{i}."
            add(b + "attn_norm.weight", h, 1, "norm")
            if fam.fused:  # Phi-3: one qkv matrix, one gate+up matrix (llama.cpp keeps them fused)
                add(b + "attn_qkv.weight", h, q + 2 * kv, "attention", "attn_qkv", i)
            else:
                add(b + "attn_q.weight", h, q, "attention", "attn_q", i)
                add(b + "attn_k.weight", h, kv, "attention", "attn_k", i)
                add(b + "attn_v.weight", h, kv, "attention", "attn_v", i)
            _small_tensors(a, b, add)
            add(b + "attn_output.weight", q, h, "attention", "attn_output", i)
            add(b + "ffn_norm.weight", h, 1, "norm")
            if fam.fused:
                add(b + "ffn_up.weight", h, 2 * inter, "mlp", "ffn_up", i)
            else:
                add(b + "ffn_gate.weight", h, inter, "mlp", "ffn_gate", i)
                add(b + "ffn_up.weight", h, inter, "mlp", "ffn_up", i)
            add(b + "ffn_down.weight", inter, h, "mlp", "ffn_down", i)
        add("output_norm.weight", h, 1, "norm")
        if not a.tie_embeddings:
            add("output.weight", h, a.vocab_size, "output")
        return out

    return layout


GGUF = Format("gguf", ".gguf", 2, "GGUF for llama.cpp (KV cache f16)")

_GGUF = [
    ("f32", "F32", 1, "32-bit float, the reference"),
    ("f16", "F16", 1, "16-bit float"),
    ("bf16", "BF16", 1, "bfloat16"),
    ("q8_0", "Q8_0", 32, "8-bit, one f16 scale per 32 weights (8.5 bpw)"),
    ("q6_k", "Q6_K", 256, "6-bit K-quant (6.56 bpw)"),
    ("q5_k_m", "Q5_K", 256, "5-bit K-quant, attn_v/ffn_down at Q6_K in some layers"),
    ("q5_k_s", "Q5_K", 256, "5-bit K-quant"),
    ("q5_1", "Q5_1", 32, "5-bit with scale and min per 32 (6.0 bpw)"),
    ("q5_0", "Q5_0", 32, "5-bit with one scale per 32 (5.5 bpw)"),
    ("q4_k_m", "Q4_K", 256, "4-bit K-quant, attn_v/ffn_down at Q6_K in some layers (llama.cpp's usual pick)"),
    ("q4_k_s", "Q4_K", 256, "4-bit K-quant (4.5 bpw)"),
    ("q4_1", "Q4_1", 32, "4-bit with scale and min per 32 (5.0 bpw)"),
    ("q4_0", "Q4_0", 32, "4-bit with one scale per 32 (4.5 bpw); fastest 4-bit on ARM"),
    ("q3_k_m", "Q3_K", 256, "3-bit K-quant mix"),
    ("q2_k", "Q2_K", 256, "2-bit K-quant mix; large quality loss"),
]
GGUF_FLOATS = ("f32", "f16", "bf16")  # converted by edgekit's writer; llama.cpp quantizes the others from f32
# Our scheme name -> llama.cpp's LLAMA_FTYPE_* (a name in llama_cpp): the quantizer's target, and the
# imatrix (calibrate) applies to every quantized type.
_LLAMA_FTYPE = {"f32": "LLAMA_FTYPE_ALL_F32", **{n: f"LLAMA_FTYPE_MOSTLY_{n.upper()}" for n, *_ in _GGUF[1:]}}
GGUF_SCHEMES = tuple(Scheme("gguf", n, d, _gguf_layout(n, base), mult, calibrate=n not in GGUF_FLOATS,
                            options={"ftype": _LLAMA_FTYPE[n]}) for n, base, mult, d in _GGUF) + (
    # Per-tensor types chosen at export time (edgekit.quantize.auto) for a size target that defaults to
    # q4_k_m's; until then the planner counts q4_k_m's layout, the size auto aims at by default.
    Scheme("gguf", "auto", "per-tensor types (Q3_K..Q8_0) chosen by measured sensitivity for a size target "
           "(default: q4_k_m's size); always calibrated", _gguf_layout("q4_k_m", "Q4_K"), 256, calibrate=True,
           options={"auto": True}),
)


# --------------------------------------------------------------------------- ONNX / onnxruntime


def _dense_layout(
    weight_bytes: Callable[[int, int], int], dtype: str, embed_bytes: int, embed_dtype: str,
    head_bytes: Callable[[int, int], int] | None = None, mix: bool = False, packed_qkv: bool = False,
) -> Callable[[Architecture], list[Tensor]]:
    """Layout for exporters that store the embedding (a Gather) and every linear separately.

    The fp32/fp16 ONNX and the ExecuTorch exports keep the token embedding unquantized (a Gather
    of float rows) and give the LM head its own quantized copy even when the PyTorch model ties
    them. The MatMulNBits ONNX exports (``embed_dtype="shared"``) quantize the LM head with
    ``head_bytes`` and let a tied embedding read that same copy (GatherBlockQuantized), so the
    vocabulary matrix is stored once. ``mix`` also gives v_proj and down_proj of the
    :func:`use_more_bits` layers ``head_bytes`` (llama.cpp's ``_M`` idea, as the int4 exports do);
    with ``packed_qkv`` (the fused ONNX graph's one q/k/v matmul, in families without q/k norms) q_proj
    and k_proj share v_proj's bits there.
    """

    def layout(a: Architecture) -> list[Tensor]:
        out: list[Tensor] = []
        h, q, kv, inter = a.hidden_size, a.q_dim, a.kv_dim, a.intermediate_size

        def lin(name, row, rows, role, nbytes=weight_bytes, kind=dtype):
            out.append(Tensor(name, row, rows, kind, nbytes(row, rows), role))

        shared = embed_dtype == "shared" and a.tie_embeddings
        if embed_dtype == "shared" and not shared:
            out.append(Tensor("embed_tokens", h, a.vocab_size, "int8-b32", head_bytes(h, a.vocab_size), "embedding"))
        elif not shared:
            out.append(Tensor("embed_tokens", h, a.vocab_size, embed_dtype, embed_bytes * h * a.vocab_size,
                              "embedding"))
        for i in range(a.layers):
            b = f"layers.{i}."
            out.append(Tensor(b + "input_layernorm", h, 1, "fp32", 4 * h, "norm"))
            more = mix and use_more_bits(i, a.layers)
            if more and packed_qkv and not a.family.qk_norm:
                lin(b + "q_proj", h, q, "attention", head_bytes, "int8-b32")
                lin(b + "k_proj", h, kv, "attention", head_bytes, "int8-b32")
            else:
                lin(b + "q_proj", h, q, "attention")
                lin(b + "k_proj", h, kv, "attention")
            if more:
                lin(b + "v_proj", h, kv, "attention", head_bytes, "int8-b32")
            else:
                lin(b + "v_proj", h, kv, "attention")
            lin(b + "o_proj", q, h, "attention")
            out.append(Tensor(b + "post_attention_layernorm", h, 1, "fp32", 4 * h, "norm"))
            _small_tensors(a, b, lambda name, row, rows, role: out.append(Tensor(name, row, rows, "fp32", 4 * row,
                                                                                 role)))
            lin(b + "gate_proj", h, inter, "mlp")
            lin(b + "up_proj", h, inter, "mlp")
            if more:
                lin(b + "down_proj", inter, h, "mlp", head_bytes, "int8-b32")
            else:
                lin(b + "down_proj", inter, h, "mlp")
        out.append(Tensor("norm", h, 1, "fp32", 4 * h, "norm"))
        if head_bytes is not None:
            lin("lm_head", h, a.vocab_size, "output", head_bytes, "int8-b32")
        else:
            lin("lm_head", h, a.vocab_size, "output")
        return out

    return layout


def _blockwise(bits: int, block: int, scale_bytes: int, zero_bits: int) -> Callable[[int, int], int]:
    def nbytes(row: int, rows: int) -> int:
        blocks = -(-row // block)
        return rows * (blocks * block * bits // 8 + blocks * scale_bytes + -(-blocks * zero_bits // 8))

    return nbytes


def matmul_nbits_bytes(bits: int, block: int) -> Callable[[int, int], int]:
    """Bytes of a MatMulNBits weight (``(row, rows) -> bytes``): ``bits`` per weight, an fp32 scale and a
    ``bits``-wide zero point per block."""
    return _blockwise(bits, block, 4, bits)


ONNX = Format("onnx", ".onnx", 4, "ONNX for onnxruntime (KV cache fp32)")
# int4 and auto (whose planning layout is int4's, the size it aims at by default)
_ONNX_INT4_LAYOUT = _dense_layout(_blockwise(4, 32, 4, 4), "int4-b32", 0, "shared", head_bytes=_blockwise(8, 32, 4, 8),
                                  mix=True, packed_qkv=True)


def _onnx(kind: str, block_size: int = 0, algorithm: str = "", description: str = "") -> dict[str, Any]:
    """What edgekit.export.onnx needs: the weight kind, MatMulNBits block, algorithm, and its metadata text."""
    return {"kind": kind, "block_size": block_size, "algorithm": algorithm, "description": description}


ONNX_SCHEMES = (
    Scheme("onnx", "fp32", "32-bit float", _dense_layout(lambda r, n: 4 * r * n, "fp32", 4, "fp32"),
           options=_onnx("fp32", description="32-bit float weights")),
    Scheme("onnx", "fp16", "16-bit float", _dense_layout(lambda r, n: 2 * r * n, "fp16", 2, "fp16"),
           options=_onnx("fp16", description="16-bit float weights, activations and K/V cache (the fused graph "
                                             "in fp16)")),
    Scheme(
        "onnx", "int8", "int8 weight-only MatMulNBits, block 32 (fp32 scale + 8-bit zero point); embedding shares it",
        _dense_layout(_blockwise(8, 32, 4, 8), "int8-b32", 0, "shared", head_bytes=_blockwise(8, 32, 4, 8)),
        options=_onnx("int8", 32, "rtn", "int8 weight-only MatMulNBits, block 32, asymmetric (accuracy_level 4)"),
    ),
    Scheme(
        "onnx", "int8-dynamic", "int8 weights per output channel, int8 activations per tensor (MatMulInteger)",
        _dense_layout(lambda r, n: r * n + 4 * n, "int8", 4, "fp32"),
        options=_onnx("int8", 0, "dynamic", "int8 weights per output channel, int8 activations per tensor "
                                            "(dynamic quantization, MatMulInteger)"),
    ),
    Scheme(
        "onnx", "int4", "int4 MatMulNBits, block 32, fp32 scale + 4-bit zero point per block (5.125 bpw); "
        "LM head, tied embedding and the _M mix's qkv (v_proj with q/k norms)/down_proj int8",
        _ONNX_INT4_LAYOUT,
        32, calibrate=True,
        options=_onnx("int4", 32, "rtn", "int4 MatMulNBits, block 32, asymmetric, round to nearest; LM head int8"),
    ),
    Scheme(
        "onnx", "int4-b128", "int4 MatMulNBits, block 128 (4.28 bpw); LM head, tied embedding and _M mix int8",
        _dense_layout(_blockwise(4, 128, 4, 4), "int4-b128", 0, "shared", head_bytes=_blockwise(8, 32, 4, 8),
                      mix=True, packed_qkv=True),
        128,
        options=_onnx("int4", 128, "rtn", "int4 MatMulNBits, block 128, asymmetric, round to nearest; LM head int8"),
    ),
    # The int4 export with its 8-bit matrices chosen at export time (edgekit.quantize.auto) for a size target that
    # defaults to int4's; the planner counts int4's layout, the size auto aims at by default.
    Scheme(
        "onnx", "auto", "int4 MatMulNBits block 32 with the 8-bit matrices chosen by measured sensitivity for a size "
        "target (default: int4's size); LM head int8; always calibrated (AWQ + GPTQ)",
        _ONNX_INT4_LAYOUT,
        32, calibrate=True,
        options={**_onnx("int4", 32, "rtn", "int4 MatMulNBits, block 32, asymmetric; 8-bit matrices chosen by "
                                            "measured sensitivity; LM head int8"), "auto": True},
    ),
)

# --------------------------------------------------------------------------- ExecuTorch / XNNPACK

EXECUTORCH = Format("executorch", ".pte", 4, "ExecuTorch .pte for XNNPACK (static KV cache fp32)")
# 8da4w and auto (whose planning layout is 8da4w's, the size it aims at by default)
_ET_8DA4W_LAYOUT = _dense_layout(_blockwise(4, 32, 2, 0), "int4-g32", 1, "int8", head_bytes=lambda r, n: r * n + 4 * n,
                                 mix=True)
# fp32 keeps a tied embedding twice (the embedding kernel's table and the XNNPACK-packed LM head); the
# quantized schemes store the embedding as int8 rows (embedding_byte; the per-row scales, 0.7 % of it, are
# not counted) and the LM head as int8 per channel (edgekit.export.executorch). ``options``: weight bits
# (32 = float), group size (0 = one scale per output channel) and the exporter's metadata text.
EXECUTORCH_SCHEMES = (
    Scheme("executorch", "fp32", "32-bit float", _dense_layout(lambda r, n: 4 * r * n, "fp32", 4, "fp32"),
           options={"weight_bits": 32, "group_size": 0, "description": "32-bit float weights"}),
    Scheme(
        "executorch", "8da8w", "8-bit dynamic activations, int8 per-channel weights; int8 embedding",
        _dense_layout(lambda r, n: r * n + 4 * n, "int8", 1, "int8"),
        options={"weight_bits": 8, "group_size": 0,
                 "description": "int8 weights per output channel, int8 dynamic activations; int8 embedding"},
    ),
    Scheme(
        "executorch", "8da4w", "8-bit dynamic activations, int4 weights in groups of 32 (XNNPACK packs a bf16 "
        "scale); LM head and the _M mix's v_proj/down_proj int8 per channel, int8 embedding",
        _ET_8DA4W_LAYOUT,
        32, calibrate=True,
        options={"weight_bits": 4, "group_size": 32,
                 "description": "int4 weights in groups of 32, int8 dynamic activations; LM head and the _M mix's "
                                "v_proj/down_proj 8da8w, int8 embedding"},
    ),
    # 8da4w with its 8da8w linears chosen at export time (edgekit.quantize.auto) for a size target that defaults
    # to 8da4w's; the planner counts 8da4w's layout, the size auto aims at by default.
    Scheme(
        "executorch", "auto", "8da4w with the 8da8w linears chosen by measured sensitivity for a size target "
        "(default: 8da4w's size); LM head 8da8w, int8 embedding; always calibrated",
        _ET_8DA4W_LAYOUT,
        32, calibrate=True,
        options={"weight_bits": 4, "group_size": 32, "auto": True,
                 "description": "int4 weights in groups of 32, int8 dynamic activations; 8da8w linears chosen by "
                                "measured sensitivity; LM head 8da8w, int8 embedding"},
    ),
)


def register(reg: registry.Registry) -> None:
    """Entry point (group ``edgekit``): the built-in formats and their quant schemes."""
    for fmt, table in ((GGUF, GGUF_SCHEMES), (ONNX, ONNX_SCHEMES), (EXECUTORCH, EXECUTORCH_SCHEMES)):
        reg.add(registry.FORMAT, fmt.name, fmt)
        for scheme in table:
            reg.add(registry.SCHEME, scheme_key(scheme.format, scheme.name), scheme)
