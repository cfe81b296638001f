"""Activation-aware weight scaling (the AWQ idea, Lin et al. 2023) for every supported family, in PyTorch.

Round-to-nearest 4-bit quantization spends the same precision on every input channel of a
linear layer, but a few channels carry much larger activations, and their weights' rounding
errors dominate the output error. AWQ multiplies those weight columns by ``s`` (so they
round more finely relative to their size) and divides the layer's *input* by ``s``, folding
``1/s`` into whatever produces that input:

====================  ===========================  =====================================
input of              produced by                  where ``1/s`` goes
====================  ===========================  =====================================
q/k/v_proj            input_layernorm              the RMSNorm weight
o_proj                attention over v_proj        v_proj's rows (shared across a GQA group)
gate/up_proj          post_attention_layernorm     the RMSNorm weight
down_proj             silu(gate) * up_proj         up_proj's rows
====================  ===========================  =====================================

so the fp32 model computes the same function. Per group, ``s = mean|x|^alpha`` over the
calibration activations ``x``; ``alpha`` is grid-searched in [0, 1) for the smallest output
error of the fake-quantized layers (alpha = 0 is plain round-to-nearest, so on the
calibration data a group is never made worse). The LM head is left alone: it shares its
matrix with a tied token embedding. The weights are then quantized by the usual
round-to-nearest exporter (for ONNX, onnxruntime's MatMulNBits quantizer).

Hand-written because onnxruntime 1.32's own calibrated weight-only options do not work here:
its GPTQ (``onnxruntime.quantization.neural_compressor.gptq_quantize``) runs but applies no
error compensation -- it propagates each column's error with ``Hinv[i:, i]``, the part of an
*upper*-triangular inverse-Hessian factor below the diagonal, which is all zeros -- so it
returns exactly the round-to-nearest weights; its AWQ ("nvidia_awq") needs NVIDIA ModelOpt,
the ``datasets`` package and a dataset download from the hub. The weight clipping search of
the full AWQ recipe is not done here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import RecipeError
from edgekit.hf import copy_hf_files

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 2048  # calibration tokens whose activations are kept (~0.4 MB per token for SmolLM2-135M)


@dataclass
class GroupResult:
    layer: int
    group: str  # qkv | o | gate_up | down
    alpha: float
    error_rtn: float  # mean squared output error of plain round-to-nearest on the calibration activations
    error_awq: float  # the same with the chosen scale


def fake_quant(weight: torch.Tensor, block: int, bits: int = 4, symmetric: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``weight [out, in]`` in blocks of ``block`` inputs by round-to-nearest.

    Asymmetric (default) mirrors onnxruntime's MatMulNBits quantizer: a zero point, the range of each
    block widened to include 0. ``symmetric`` mirrors torchao's symmetric int4 (ExecuTorch's 8da4w):
    no zero point, scale = max|w| / 7.5, codes clamped to [-8, 7].
    """
    import torch

    out_features, in_features = weight.shape
    pad = -in_features % block
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(out_features, -1, block)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (w.abs().amax(-1, keepdim=True) / (half - 0.5)).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale), -half, half - 1)
        return (q * scale).reshape(out_features, -1)[:, :in_features]
    maxq = 2**bits - 1
    lo = w.amin(-1, keepdim=True).clamp(max=0)
    hi = w.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(out_features, -1)[:, :in_features]


def _search(x: torch.Tensor, weights: list[torch.Tensor], block: int, grid: int, expand=None,
            alphas: tuple[float, ...] | None = None, symmetric: bool = False) -> tuple[float, torch.Tensor, float, float]:
    """Best (alpha, per-channel scale, error, RTN error) for linears ``weights`` reading ``x [T, in]``.

    ``expand`` maps a reduced scale vector to the full input width (GQA: one scale per KV channel).
    """
    import torch

    refs = [x @ w.T for w in weights]
    stat = x.abs().mean(0)
    if expand is not None:
        stat = expand.reduce(stat)

    def error(s: torch.Tensor) -> float:
        full = expand.full(s) if expand is not None else s
        xs = x / full
        return sum(float(((xs @ fake_quant(w * full, block, symmetric=symmetric).T - r) ** 2).mean())
                   for w, r in zip(weights, refs))

    ones = torch.ones_like(stat)
    rtn = error(ones)
    best = (0.0, ones, rtn)
    for alpha in alphas if alphas is not None else [i / grid for i in range(1, grid)]:
        s = stat.clamp(min=1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 (AWQ's normalisation)
        err = error(s)
        if err < best[2] or alphas is not None:
            best = (alpha, s, err)
    return best[0], best[1], best[2], rtn


class _GroupedHeads:
    """o_proj's input has ``heads * head_dim`` channels, but v_proj's rows are ``kv_heads * head_dim``:
    a scale folded into v_proj is shared by the query heads of a GQA group."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        self.kv, self.rep, self.dim = kv_heads, heads // kv_heads, head_dim

    def reduce(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.reshape(self.kv, self.rep, self.dim).mean(1).reshape(-1)

    def full(self, s: torch.Tensor) -> torch.Tensor:
        return s.reshape(self.kv, 1, self.dim).expand(self.kv, self.rep, self.dim).reshape(-1)


def _groups(layer, model_type: str, grouped) -> list[tuple]:
    """(name, producer, kind, consumers, expand) for one layer of the model's family.

    Gemma 3 feeds its MLP from ``pre_feedforward_layernorm`` (``post_attention_layernorm`` normalises the
    attention *output*), and its norms multiply by ``1 + w`` (kind ``norm+1``). Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj`` take the norm-fed groups; the row-fed groups (v rows -> o_proj, up rows -> down_proj)
    would fold into half of a fused matrix and are left at round-to-nearest.
    """
    attn, mlp = layer.self_attn, layer.mlp
    if model_type == "phi3":
        return [("qkv", layer.input_layernorm, "norm", [attn.qkv_proj], None),
                ("gate_up", layer.post_attention_layernorm, "norm", [mlp.gate_up_proj], None)]
    gemma = model_type == "gemma3_text"
    norm = "norm+1" if gemma else "norm"
    mlp_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    return [("qkv", layer.input_layernorm, norm, [attn.q_proj, attn.k_proj, attn.v_proj], None),
            ("o", attn.v_proj, "rows", [attn.o_proj], grouped),
            ("gate_up", mlp_norm, norm, [mlp.gate_proj, mlp.up_proj], None),
            ("down", mlp.up_proj, "rows", [mlp.down_proj], None)]


def _capture(model, sequences: list[list[int]], max_tokens: int) -> dict[tuple[int, str], torch.Tensor]:
    """The inputs of every group's consumers in every layer, over the first ``max_tokens`` tokens."""
    import torch

    found: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for key, _prev, _kind, linears, _expand in _groups(layer, model.config.model_type, None):
            def hook(_module, args, key=(i, key)):
                found.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            hooks.append(linears[0].register_forward_pre_hook(hook))
    run_hooked(model, sequences, max_tokens, hooks)
    return {k: torch.cat(v) for k, v in found.items()}


def run_hooked(model, sequences: list[list[int]], max_tokens: int, hooks: list) -> None:
    """Run ``model`` over the first ``max_tokens`` calibration tokens of ``sequences`` (no gradients), then remove
    ``hooks`` (the forward hooks gathering what the caller needs), also when the run fails."""
    import torch

    seen = 0
    try:
        with torch.no_grad():
            for ids in sequences:
                if seen >= max_tokens:
                    break
                ids = ids[: max_tokens - seen]
                model(input_ids=torch.tensor([ids]))
                seen += len(ids)
    finally:
        for h in hooks:
            h.remove()


def awq_scale(model, sequences: list[list[int]], block_size: int = 32, *, grid: int = 20, max_tokens: int = MAX_TOKENS,
              alphas: tuple[float, ...] | None = None, progress=None, symmetric: bool = False) -> list[GroupResult]:
    """Rescale ``model`` (any family in :data:`edgekit.arch.FAMILIES`) in place so 4-bit RTN in blocks of ``block_size`` loses less.

    ``symmetric`` scores scales against the symmetric quantizer (ExecuTorch 8da4w) instead of the
    zero-point one (ONNX MatMulNBits).

    ``sequences`` are calibration token ids (at most ``max_tokens`` are used). The model's fp32
    outputs do not change (up to float rounding). ``alphas`` forces the exponents tried (tests).
    ``progress(n)`` is called once per layer. Returns what was chosen per layer and group.
    """
    import torch

    if not sequences or not any(sequences):
        raise ValueError("awq_scale needs calibration token ids")
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    grouped = _GroupedHeads(heads, kv_heads, head_dim)
    acts = _capture(model, sequences, max_tokens)
    results = []
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name, prev, kind, linears, expand in _groups(layer, cfg.model_type, grouped):
                x = acts.pop((i, name))
                alpha, s, err, rtn = _search(x, [m.weight.float() for m in linears], block_size, grid, expand, alphas,
                                             symmetric)
                if alpha:
                    _fold(prev, kind, linears, s, expand.full(s) if expand is not None else s)
                results.append(GroupResult(i, name, alpha, rtn, err))
            if progress:
                progress(1)
    gain = sum(r.error_rtn for r in results) / max(sum(r.error_awq for r in results), 1e-30)
    log.info("AWQ: scaled %d of %d linear groups; calibration output error %.2fx lower than RTN",
             sum(1 for r in results if r.alpha), len(results), gain)
    return results


def _fold(prev, kind: str, linears, s: torch.Tensor, full: torch.Tensor) -> None:
    """Divide the producer of the input by ``s`` and multiply the consumers' input columns by it."""
    dtype = prev.weight.dtype
    if kind == "norm":
        prev.weight.div_(s.to(dtype))
    elif kind == "norm+1":  # Gemma's RMSNorm scales by (1 + w): (1 + w') = (1 + w) / s
        prev.weight.copy_((1 + prev.weight.float()) / s - 1)
    else:  # the rows (outputs) of the producing linear
        prev.weight.div_(s.to(dtype)[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(dtype))
    for m in linears:
        m.weight.mul_(full.to(m.weight.dtype)[None, :])


def awq_scaled_copy(model_dir: Path, texts: list[str], block: int, folder: Path,
                    symmetric: bool = False) -> tuple[Path, dict]:
    """An HF folder with the AWQ-scaled float weights of ``model_dir`` (same fp32 function), for an exporter to
    quantize with its own round-to-nearest grid (``symmetric`` for ExecuTorch's), plus a summary of the scaling."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sequences = [ids for ids in (tok(t, add_special_tokens=False)["input_ids"][:512] for t in texts) if ids]
    if not sequences:
        raise RecipeError("calibration_texts tokenized to nothing; pass a few paragraphs of representative text")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    results = awq_scale(model, sequences, block, symmetric=symmetric)
    model.save_pretrained(folder, safe_serialization=True)
    copy_hf_files(model_dir, folder, keep=("config.json",))
    rtn, awq = sum(r.error_rtn for r in results), sum(r.error_awq for r in results)
    return folder, {"calibration_tokens": min(sum(map(len, sequences)), MAX_TOKENS), "groups": len(results),
                    "groups_scaled": sum(1 for r in results if r.alpha),
                    "calibration_error_vs_rtn": round(awq / rtn, 4) if rtn else 1.0,
                    "alphas": [r.alpha for r in results]}
