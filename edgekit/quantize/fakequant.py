"""Fake quantization: each 4-bit export's weight grid in PyTorch, equal bit for bit to its exporter's quantizer.

A *grid* maps a float32 weight ``[out, in]`` (blocks run along ``in``, the matmul's reduction axis and
ggml's ``ne[0]``) to the float32 values the exported model computes with, i.e. quantize then
dequantize exactly as the exporter's own library does:

- ``Q4_0`` / ``Q8_0``: llama.cpp's reference quantizers (``quantize_row_q4_0_ref`` /
  ``quantize_row_q8_0_ref`` in ggml-quants.c, what ``llama_model_quantize`` runs without an
  importance matrix): one fp16 scale per 32 weights, Q4_0's scale is the signed absolute maximum / -8
  and its rounding truncates ``x / d + 8.5``.
- ``Q4_K``: llama.cpp's ``quantize_row_q4_K_ref``: super-blocks of 256, each 32-weight sub-block
  fitted by ``make_qkx2_quants`` (a 20-step search over scale and min, weighted by
  ``rms + |x|``), the 8 scales and mins re-quantized to 6 bits against fp16 super-scales. The
  search's running sums are accumulated element by element, in float32, in the C order (ggml-base is
  built without FMA contraction), so the result is the same float, not a close one.
- ``int4-bB`` / ``int8-bB``: onnxruntime's MatMulNBits blockwise quantizer (MLAS
  ``BlockwiseQuantizer`` with zero points, what ``MatMulNBitsQuantizer``'s default RTN calls):
  asymmetric, range widened to include 0, ``scale = (max - min) / (2^bits - 1)``, zero point
  ``roundf(-min / scale)``, ``q = clamp(roundf(x * (1 / scale) + zp))``, weight ``(q - zp) * scale``.
- ``Q5_0``: as Q4_0 with 5 bits (what Q4_K falls back to when a row is not a multiple of 256).
- ``F16``: a tensor llama.cpp keeps at f16 (rows not a multiple of the block).

ExecuTorch 8da4w is not re-implemented: :func:`prepare` hands those linears to torchao's own QAT
(``QATConfig`` of the exporter's ``Int8DynamicActivationIntxWeightConfig``), which also fake-quantizes
the int8 per-token activations.

Which tensor gets which grid is the registered scheme's word (:mod:`edgekit.quantize.schemes`, the
same table the planner and the exporters read); tensors whose type has no grid here (Q6_K, Q5_0,
...) stay float during QAT and are listed by :func:`plan_grids`. A tied LM head / token embedding
stays float too (its 8-bit or Q6_K type is the least sensitive, and one table serves both uses).

Training sees the grid through a straight-through estimator: the forward value is the grid's output
exactly, the gradient passes to the float weight unchanged. The float weights are what a QAT run
saves, so the exporter's quantizer reproduces the fake-quantized weights.

Torch is imported inside functions; this module is importable without it (the recipe schema reads
:data:`TARGETS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgekit.arch import Architecture
from edgekit.errors import ModelError, RecipeError
from edgekit.quantize.schemes import get_scheme

# QAT target name -> (format, quant): the export whose quantizer training goes through.
TARGETS: dict[str, tuple[str, str]] = {
    "gguf-q4_0": ("gguf", "q4_0"),
    "gguf-q4_k_s": ("gguf", "q4_k_s"),
    "gguf-q4_k_m": ("gguf", "q4_k_m"),
    "onnx-int4": ("onnx", "int4"),
    "onnx-int4-b128": ("onnx", "int4-b128"),
    "executorch-8da4w": ("executorch", "8da4w"),
}
TORCHAO = "torchao"  # grid name of the tensors torchao's QAT handles (executorch 8da4w / 8da8w linears)

_GGUF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
_DENSE_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                  "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                  "down_proj": "mlp.down_proj"}
_NBITS = re.compile(r"^int([48])-b(\d+)$")


# --------------------------------------------------------------------------- the grids (no gradient)


def _blocks(w, block: int):
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"a {tuple(w.shape)} weight does not split into blocks of {block} along its rows")
    return w.detach().float().reshape(-1, block)


def _div(a, b):
    """``a / b`` in float32 as C divides: torch turns ``scalar / tensor`` into ``reciprocal(tensor) * scalar``,
    which rounds twice, so both sides are made float32 tensors first."""
    import torch

    a = a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float32)
    b = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=torch.float32)
    return torch.div(a, b)


def _round_away(x):
    """C's ``roundf``: halves away from zero (``torch.round`` rounds them to even)."""
    import torch

    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _legacy(w, half: int):
    """llama.cpp's Q4_0 (``half`` 8) / Q5_0 (16): scale = the signed largest magnitude / -half, fp16."""
    import torch

    x = _blocks(w, 32)
    idx = x.abs().argmax(dim=1, keepdim=True)  # the first largest |x|, as the C loop's strict '<' keeps it
    d = _div(x.gather(1, idx), float(-half))
    inv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    q = torch.clamp(torch.trunc(x * inv + (half + 0.5)), 0, 2 * half - 1)  # (int8_t) truncates; MIN(2*half-1)
    return ((q - half) * d.half().float()).reshape(w.shape)


def q4_0(w):
    """llama.cpp's Q4_0 of ``w`` (rows a multiple of 32), dequantized."""
    return _legacy(w, 8)


def q5_0(w):
    """llama.cpp's Q5_0 of ``w`` (rows a multiple of 32), dequantized: what Q4_K falls back to for rows that are
    not a multiple of 256 (SmolLM2's 576)."""
    return _legacy(w, 16)


def q8_0(w):
    """llama.cpp's Q8_0 of ``w`` (rows a multiple of 32), dequantized."""
    import torch

    x = _blocks(w, 32)
    d = _div(x.abs().amax(dim=1, keepdim=True), 127.0)
    inv = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    return (_round_away(x * inv) * d.half().float()).reshape(w.shape)


def f16(w):
    return w.detach().float().half().float()


def _sum(terms, exact: bool):
    """The sum over the first axis: term by term in float32 as a C loop adds (``exact``), or torch's own order."""
    if not exact:
        return terms.sum(0)
    acc = terms[0].clone()
    for t in terms[1:]:
        acc.add_(t)
    return acc


def _make_qkx2_quants(x, wt, exact: bool):
    """``make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`` for every column of ``x``
    (``[32, B]``: one 32-weight sub-block per column) at once. Returns (scale, -min)."""
    import numpy as np
    import torch

    mn, mx = x.amin(0), x.amax(0)  # order does not change a min or a max
    sum_w = _sum(wt, exact)
    sum_x = _sum(wt * x, exact)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    flat_min = mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _div(15.0, rng)
    scale = _div(1.0, iscale)
    labels = torch.clamp(torch.round(iscale * (x - mn)), 0, 15)

    def error(s, m, lab):
        diff = s * lab + m - x
        return _sum(wt * (diff * diff), exact)

    best = error(scale, mn, labels)
    for step in range(21):
        num = np.float32(-1.0) + np.float32(0.1) * np.float32(step) + np.float32(15.0)
        iscale = _div(float(num), torch.where(flat, torch.ones_like(mx), mx - mn))  # the C code's min moves with it
        aux = torch.clamp(torch.round(iscale * (x - mn)), 0, 15)
        wl = wt * aux
        sum_l, sum_l2, sum_xl = _sum(wl, exact), _sum(wl * aux, exact), _sum(wl * x, exact)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        cur = error(this_scale, this_min, aux)
        better = (det > 0) & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -torch.where(flat, flat_min, mn)


def q4_k(w, exact: bool = True):
    """llama.cpp's Q4_K of ``w`` (rows a multiple of 256) without an importance matrix, dequantized.

    ``exact=False`` adds the search's sums in torch's order instead of the C loop's: many times faster (what
    QAT trains through), and equal to the exact grid but for the rare sub-block where two candidate scales'
    errors differ in the last bit (a test measures how rare).
    """
    import torch

    x = _blocks(w, 256).reshape(-1, 32)  # sub-blocks; 8 per super-block
    xt = x.T.contiguous()  # [32, B]: each weight position contiguous across sub-blocks
    sum_x2 = _sum(xt * xt, exact)
    # sqrtf is correctly rounded; torch's vectorized float32 sqrt is not always. The square root of a double,
    # rounded to float, is (53 >= 2 * 24 + 2 bits).
    av_x = torch.sqrt(_div(sum_x2, 32.0).double()).float()
    wt = av_x + xt.abs()
    chunk = 8192  # sub-blocks per pass: the search's ~20 temporaries stay in cache (3-4x faster than one pass)
    parts = [_make_qkx2_quants(xt[:, i:i + chunk].contiguous(), wt[:, i:i + chunk].contiguous(), exact)
             for i in range(0, xt.shape[1], chunk)]
    scales, mins = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = torch.clamp(scales.amax(1), min=0.0)  # the C loop starts at 0 and keeps strictly larger values
    max_min = torch.clamp(mins.amax(1), min=0.0)
    inv_scale = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale, 1)), 0)
    inv_min = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, 1)), 0)
    ls = torch.clamp(torch.remainder(torch.round(inv_scale[:, None] * scales), 256), max=63)  # uint8, then MIN(63)
    lm = torch.clamp(torch.remainder(torch.round(inv_min[:, None] * mins), 256), max=63)
    d = _div(max_scale, 63.0).half().float()
    dmin = _div(max_min, 63.0).half().float()
    dj = d[:, None] * ls  # [super, 8]
    dmj = dmin[:, None] * lm
    xs = x.reshape(-1, 8, 32)
    safe = torch.where(dj != 0, dj, torch.ones_like(dj))
    q = torch.clamp(torch.round((xs + dmj[..., None]) / safe[..., None]), 0, 15)
    q = torch.where((dj != 0)[..., None], q, torch.zeros_like(q))  # d == 0: every weight dequantizes to -dm
    return (dj[..., None] * q - dmj[..., None]).reshape(w.shape)


def nbits(w, bits: int, block: int):
    """onnxruntime's MatMulNBits asymmetric blockwise quantizer (``bits`` 4 or 8, block ``block``), dequantized.

    ``w`` is ``[out, in]`` (the MatMul's B transposed); a row that does not fill its last block is padded
    with zeros, as the quantizer pads K, which cannot move the range (it always includes 0).
    """
    import torch

    w = w.detach().float()
    rows, k = w.shape
    pad = -k % block
    x = torch.nn.functional.pad(w, (0, pad)).reshape(-1, block)
    top = float((1 << bits) - 1)
    mn = torch.clamp(x.amin(dim=1, keepdim=True), max=0.0)
    mx = torch.clamp(x.amax(dim=1, keepdim=True), min=0.0)
    scale = _div(mx - mn, top)
    nonzero = scale != 0
    zp_fp = torch.where(nonzero, 0.0 - _div(mn, torch.where(nonzero, scale, 1)), mn)
    zp = torch.where(zp_fp < 0, 0.0, torch.where(zp_fp > top, top, _round_away(zp_fp)))
    inv = torch.where(nonzero, _div(1.0, torch.where(nonzero, scale, 1)), 0.0)
    q = torch.clamp(_round_away(x * inv + zp), 0, top)
    return ((q - zp) * scale).reshape(rows, k + pad)[:, :k]


def grid(name: str):
    """The grid function of a storage type name (``Q4_0``, ``Q4_K``, ``int4-b32``, ...), or None (stays float)."""
    fixed = {"Q4_0": q4_0, "Q5_0": q5_0, "Q8_0": q8_0, "Q4_K": q4_k, "F16": f16}
    if name in fixed:
        return fixed[name]
    m = _NBITS.match(name)
    if m:
        bits, block = int(m.group(1)), int(m.group(2))
        return lambda w: nbits(w, bits, block)
    return None


# --------------------------------------------------------------------------- which tensor, which grid


@dataclass(frozen=True)
class GridPlan:
    target: str
    grids: dict[str, str]  # HF module path (a Linear or the Embedding) -> grid name
    float_kept: dict[str, str]  # HF module path -> the export's type that has no grid here


def plan_grids(target: str, arch: Architecture) -> GridPlan:
    """Which of the student's modules go through which grid for ``target``, from the registered scheme."""
    if target not in TARGETS:
        raise RecipeError(f"unknown QAT target {target!r}: choose one of {', '.join(TARGETS)}")
    if arch.family.fused:
        raise ModelError(f"QAT needs separate q/k/v and gate/up linears; the {arch.family.name} family fuses them: "
                         "drop distill.qat for this student")
    fmt, quant = TARGETS[target]
    grids, kept = {}, {}
    for t in get_scheme(fmt, quant).tensors(arch):
        if t.role == "norm":
            continue
        module = hf_module(fmt, t.name)
        if module is None:
            continue
        if t.role in ("output", "embedding") and arch.tie_embeddings:
            kept[module] = f"{t.dtype} (tied embedding and LM head)"
            continue
        kind = _kind(fmt, t.dtype)
        if kind is None:
            kept[module] = t.dtype
        else:
            grids[module] = kind
    return GridPlan(target, grids, kept)


def _kind(fmt: str, dtype: str) -> str | None:
    if fmt == "executorch":
        # torchao's QAT for the linears: 8da4w, and 8da8w per channel for the LM head and the _M mix's
        # v_proj/down_proj (the shared dense layout labels those int8-b32; edgekit.export.executorch quantizes
        # them per output channel). The int8 embedding (ExecuTorch's embedding_byte) stays float.
        return {"int4-g32": TORCHAO + ":8da4w", "int8-b32": TORCHAO + ":8da8w"}.get(dtype)
    return dtype if grid(dtype) is not None else None


def hf_module(fmt: str, name: str) -> str | None:
    if fmt == "gguf":
        if name == "token_embd.weight":
            return "model.embed_tokens"
        if name == "output.weight":
            return "lm_head"
        m = re.match(r"^blk\.(\d+)\.(\w+)\.weight$", name)
        if m and m.group(2) in _GGUF_LINEARS:
            return f"model.layers.{m.group(1)}.{_GGUF_LINEARS[m.group(2)]}"
        return None
    if name in ("embed_tokens", "lm_head"):
        return "model.embed_tokens" if name == "embed_tokens" else "lm_head"
    m = re.match(r"^layers\.(\d+)\.(\w+)$", name)
    if m and m.group(2) in _DENSE_LINEARS:
        return f"model.layers.{m.group(1)}.{_DENSE_LINEARS[m.group(2)]}"
    return None


# --------------------------------------------------------------------------- training through a grid


class _Bank:
    """The grids of every weight of one kind, recomputed together once per optimizer step.

    Only when a weight has changed (the optimizer bumps its version), not on every forward (gradient
    accumulation, checkpointing). Q4_K's search is costly per call, so all the model's Q4_K weights go through
    one call (their rows end to end), with the search's sums in torch's order (``q4_k(exact=False)``): training
    sees Q4_K's grid but for under 1 % of sub-blocks (measured), while :func:`fake_quantized_weights` and the
    exporter use the exact one.
    """

    def __init__(self, kind: str):
        self.kind, self.fn = kind, grid(kind)
        self.params: list = []
        self.key: tuple | None = None
        self.values: dict[int, object] = {}

    def value(self, w):
        key = tuple((p.data_ptr(), p._version) for p in self.params)
        if key != self.key:
            self._refresh()
            self.key = key
        return self.values[w.data_ptr()]

    def _refresh(self) -> None:
        import torch

        with torch.no_grad():
            latents = [p.detach().float() for p in self.params]
            block = 256 if self.kind == "Q4_K" else 0
            if block and all(w.shape[1] % block == 0 for w in latents):
                joined = q4_k(torch.cat([w.reshape(-1, block) for w in latents]), exact=False)
                parts = torch.split(joined, [w.numel() // block for w in latents])
                grids = [part.reshape(w.shape) for part, w in zip(parts, latents)]
            else:
                grids = [self.fn(w) for w in latents]
        self.values = {p.data_ptr(): g.to(p.dtype) for p, g in zip(self.params, grids)}


def _parametrization(bank: _Bank):
    import torch

    class _Straight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, q):
            return q.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    class FakeQuant(torch.nn.Module):
        """The weight as the export stores it (its bank's grid), with a straight-through gradient."""

        def __init__(self):
            super().__init__()
            self.kind = bank.kind

        def forward(self, w):
            return _Straight.apply(w, bank.value(w))

    return FakeQuant()


def torchao_config(kind: str, group_size: int = 32):
    """The exporter's torchao config for an ExecuTorch grid (``8da4w`` groups of ``group_size`` or ``8da8w``)."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if kind.endswith("8da8w"):
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))


def prepare(model, plan: GridPlan) -> None:
    """Route every planned weight of ``model`` (an HF causal LM) through its grid, in place."""
    import torch
    from torch.nn.utils import parametrize

    modules = dict(model.named_modules())
    missing = [m for m in plan.grids if m not in modules]
    if missing:
        raise ModelError(f"QAT target {plan.target} expects module {missing[0]}, which this student does not have")
    torchao = {m: k for m, k in plan.grids.items() if k.startswith(TORCHAO)}
    banks: dict[str, _Bank] = {}
    for name, kind in plan.grids.items():
        if name not in torchao:
            bank = banks.setdefault(kind, _Bank(kind))
            bank.params.append(modules[name].weight)  # becomes parametrizations.weight.original, the same tensor
            parametrize.register_parametrization(modules[name], "weight", _parametrization(bank))
    if torchao:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        for kind in sorted(set(torchao.values())):
            names = {m for m, k in torchao.items() if k == kind}
            quantize_(model, QATConfig(torchao_config(kind), step="prepare"),
                      filter_fn=lambda mod, fqn, names=names: isinstance(mod, torch.nn.Linear) and fqn in names)


def release(model) -> None:
    """Undo :func:`prepare`: plain modules holding the float (latent) weights the exporter quantizes."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    try:
        from torchao.quantization.qat import FakeQuantizedLinear
    except ImportError:
        return
    if any(isinstance(m, FakeQuantizedLinear) for m in model.modules()):
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(model, QATConfig(step="convert"))


def fake_quantized_weights(model, plan: GridPlan) -> dict:
    """Each planned module's weight as the export will hold it (``{module path: tensor}``), from float weights."""
    import torch

    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name, kind in plan.grids.items():
            w = modules[name].weight.detach().float()
            out[name] = torchao_weight(w, kind) if kind.startswith(TORCHAO) else grid(kind)(w)
    return out


def torchao_weight(w, kind: str, group_size: int = 32):
    """torchao's QAT weight fake-quantization of ``w`` for an ExecuTorch grid (what training sees)."""
    import torch
    from torchao.quantization.qat import QATConfig

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    from torchao.quantization import quantize_

    holder = torch.nn.Sequential(lin)
    quantize_(holder, QATConfig(torchao_config(kind, group_size), step="prepare"))
    with torch.no_grad():
        return holder[0].weight_fake_quantizer(holder[0].weight).detach().clone()
