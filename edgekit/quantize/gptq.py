"""Error-compensating blockwise rounding (the GPTQ algorithm, Frantar et al. 2022) for MatMulNBits weights.

Round-to-nearest rounds every weight on its own. GPTQ rounds a linear layer's input columns one at a
time and, after each, moves the rounding error onto the columns not yet rounded, weighted by the
inverse Hessian ``H = X^T X`` of the layer's calibration inputs ``X``: the layer's *output* error on
that data is what gets minimised, not the weight error. The grid is the one onnxruntime's
MatMulNBits stores -- per row, blocks of ``block`` input columns with an fp32 scale and an integer
zero point (asymmetric, range widened to include 0) -- computed when the rounding reaches a block,
from the already-compensated weights. The result is the integer codes, scales and zero points
themselves, so the exporter writes them as they are (a re-rounding by onnxruntime's quantizer
would move them off the grid the compensation assumed).

Hand-written because onnxruntime 1.32's GPTQ returns round-to-nearest weights (see
:mod:`edgekit.quantize.awq`), and the other GPTQ implementations (auto-gptq, gptqmodel, llm-compressor)
need CUDA kernels or write their own checkpoint formats, not MatMulNBits blocks. The Hessians are taken
from the float model in one pass (not layer by layer through already-quantized layers), which keeps it to
one forward pass over the calibration text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgekit.quantize.awq import run_hooked

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's percdamp)
LAZY = 128  # columns updated together before the rest of the matrix is (GPTQ's lazy batch)
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # block ranges tried (fractions of the full min..max range)


@dataclass
class Blocks:
    """A ``[rows, k]`` matrix as MatMulNBits blocks: codes ``[rows, blocks * block]`` (uint8, padded columns
    hold the zero point), scales and zero points ``[rows, blocks]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    block: int
    k: int

    def dequantize(self) -> torch.Tensor:
        rows = self.codes.shape[0]
        q = self.codes.float().reshape(rows, -1, self.block)
        w = (q - self.zeros.float()[..., None]) * self.scales[..., None]
        return w.reshape(rows, -1)[:, :self.k]


def _grid(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per row of ``w [rows, block]``: the range widened to include 0, as MatMulNBits stores it,
    then shrunk by the factor in :data:`SHRINK` that rounds the block with the least ``importance``-weighted
    squared error (an outlier no longer stretches the step of the whole block; llama.cpp's K-quants search
    their scales the same way)."""
    import torch

    top = (1 << bits) - 1
    lo0 = w.amin(1).clamp(max=0)
    hi0 = w.amax(1).clamp(min=0)
    weight = importance if importance is not None else torch.ones(w.shape[1])
    best = None
    for f in SHRINK:
        lo, hi = lo0 * f, hi0 * f
        scale = (hi - lo) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, top)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, top)
        err = (((q - zero[:, None]) * scale[:, None] - w) ** 2 * weight[None, :]).sum(1)
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, zero, best[2]))
    return best[1], best[2]


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, block: int = 32, damp: float = DAMP) -> Blocks:
    """GPTQ-round ``weight [rows, k]`` (a linear's ``[out, in]``) for inputs whose ``X^T X`` is ``hessian [k, k]``."""
    import torch

    w = weight.detach().float().clone()
    rows, k = w.shape
    pad = -k % block
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs never seen: their columns cannot matter on the data
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    diag = torch.diag(h).float()  # each input's mean square: how much its weights' errors cost
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError:  # not positive definite even damped: round to nearest
        hinv = torch.eye(k)
    top = (1 << bits) - 1
    blocks = (k + pad) // block
    codes = torch.zeros(rows, k + pad, dtype=torch.uint8)
    scales = torch.zeros(rows, blocks)
    zeros = torch.zeros(rows, blocks)
    step = max(block, LAZY // block * block)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:  # the block's grid, from the weights as compensated so far
                g = col // block
                scale, zero = _grid(w1[:, i:i + block], bits, diag[col:col + block])
                scales[:, g], zeros[:, g] = scale, zero
            g = col // block
            c = w1[:, i]
            q = torch.clamp(torch.round(c / scales[:, g]) + zeros[:, g], 0, top)
            codes[:, col] = q.to(torch.uint8)
            err = (c - (q - zeros[:, g]) * scales[:, g]) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if pad:
        codes[:, k:] = zeros[:, -1:].to(torch.uint8)
    return Blocks(codes, scales, zeros, bits, block, k)


def hessians(model, sequences: list[list[int]], modules: dict[str, object], max_tokens: int) -> dict[str, object]:
    """``X^T X`` of each named module's input over the first ``max_tokens`` calibration tokens (float64 sums).

    Modules that read the same tensor (q/k/v, gate/up) each get their own copy of the same sum.
    """
    sums: dict = {}
    hooks = []
    for name, module in modules.items():
        def hook(_module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        hooks.append(module.register_forward_pre_hook(hook))
    run_hooked(model, sequences, max_tokens, hooks)
    return sums
