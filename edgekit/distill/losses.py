"""Distillation losses: divergences between teacher and student next-token distributions.

All functions take logits of shape ``[batch, seq, vocab]`` and an optional boolean
``mask`` ``[batch, seq]`` of the positions that count, and return the mean over
those positions. With temperature ``T`` both distributions are softened and the
result is multiplied by ``T**2`` so gradient magnitudes stay comparable across T
(Hinton et al. 2015).

Divergences (``p`` = teacher, ``q`` = student):

- ``forward_kl``  KL(p || q): mode-covering, the classic KD objective.
- ``reverse_kl``  KL(q || p): mode-seeking (MiniLLM, Gu et al. 2024).
- ``jsd``         generalised JSD(beta) = beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q
                  (GKD, Agarwal et al. 2024); symmetric at beta = 0.5.
- ``skew_kl``     KL(p || a p + (1-a) q) and ``skew_rkl`` KL(q || a q + (1-a) p) (DistiLLM, Ko et al. 2024).

Sparse targets (from the logit cache) give the teacher as ``(indices, values)`` over
``k`` tokens per position: ``topk`` values are teacher logits, re-normalised over the k
tokens (biased towards the head of the distribution); ``sampled`` values are weights of
tokens drawn from the teacher, an unbiased estimate of p (Sparse Logit Sampling,
arXiv 2503.16870). Only the forward KL is defined for sparse targets: the others need
p outside the stored tokens.

Written here rather than imported because no maintained library ships these
token-level divergences with masking, temperature and sparse targets together.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from edgekit.distill.config import LOSSES
from edgekit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

KINDS = LOSSES


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


_LOG_FLOOR = -1e4  # exp() of this is exactly 0 in fp32, yet it keeps 0 * (log 0 - x) finite, gradients too


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per position from log-probabilities; 0 * log 0 counts as 0."""
    log_a, log_b = log_a.clamp_min(_LOG_FLOOR), log_b.clamp_min(_LOG_FLOOR)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1-w) b), computed stably in log space."""
    import torch

    if w <= 0:
        return log_b
    if w >= 1:
        return log_a
    return torch.logsumexp(torch.stack([log_a + torch.log(torch.tensor(w, dtype=log_a.dtype)),
                                        log_b + torch.log(torch.tensor(1 - w, dtype=log_b.dtype))]), dim=0)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0, mask: torch.Tensor | None = None, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """Mean divergence between teacher and student over masked positions, times T^2."""
    import torch.nn.functional as F

    if kind not in KINDS:
        raise ConfigError(f"unknown distillation loss {kind!r}: choose one of {', '.join(KINDS)}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student and teacher logits differ in shape ({tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}); the student must keep the teacher's vocabulary"
        )
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        per = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        per = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    elif kind == "skew_kl":
        per = _kl(log_p, _log_mix(log_p, log_q, skew))
    else:  # skew_rkl
        per = _kl(log_q, _log_mix(log_q, log_p, skew))
    return _masked_mean(per, mask) * temperature**2


@functools.cache
def _sparse_forward_kl_function():
    """The autograd function behind :func:`sparse_forward_kl`, defined on first use (importing this module stays
    torch-free)."""
    import torch

    class _SparseForwardKL(torch.autograd.Function):
        """sum_rows w_row * sum_k p_k (log p_k - log q_k), with log q = s - logsumexp(s), on [rows, vocab] logits.

        Hand-written backward: d/ds = w * (softmax(s) * sum_k p_k - scatter(p)). Autograd's version
        goes through logsumexp and a gather (two more full-vocabulary passes and a zero-filled
        scatter buffer) and made this loss ~1.7x as costly as fused cross-entropy.
        """

        @staticmethod
        def forward(ctx, s, indices, p, log_p, w):
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            log_q = s.gather(-1, indices) - lse
            per = (p * (log_p - log_q)).sum(-1)
            ctx.save_for_backward(s, lse, indices, p, w)
            return (per * w).sum()

        @staticmethod
        def backward(ctx, grad_out):
            s, lse, indices, p, w = ctx.saved_tensors
            grad = torch.exp(s - lse)
            grad.mul_(p.sum(-1, keepdim=True))
            grad.scatter_add_(-1, indices, -p)
            grad.mul_((w * grad_out)[:, None])
            return grad, None, None, None, None

    return _SparseForwardKL


def sparse_forward_kl(student_logits: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                      mode: str = "topk", temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL against a sparse teacher (``indices``/``values`` of shape ``[batch, seq, k]``).

    ``topk``: values are teacher logits; p is their softmax at T over the k tokens.
    ``sampled``: values are non-negative weights summing to 1 per position (the empirical
    distribution of tokens sampled from the teacher at the cache's temperature); they are
    used as p directly, so T only softens the student side and must match the cache.
    Padding entries use index 0 with value -inf (topk) or weight 0 (sampled).
    """
    import torch
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)
    if temperature != 1.0:
        s = s / temperature
    idx = indices.long().reshape(-1, indices.shape[-1])
    if mode == "topk":
        log_p = F.log_softmax(values.float().reshape(idx.shape) / temperature, dim=-1)
    elif mode == "sampled":
        log_p = torch.log(values.float().reshape(idx.shape))  # weight 0 -> -inf, floored below
    else:
        raise ConfigError(f"unknown sparse target mode {mode!r}: choose topk or sampled")
    log_p = log_p.clamp_min(_LOG_FLOOR)
    p = log_p.exp()
    if mask is None:
        w = torch.full((s.shape[0],), 1.0 / s.shape[0])
    else:
        m = mask.reshape(-1).to(torch.float32)
        w = m / m.sum().clamp_min(1.0)
    return _sparse_forward_kl_function().apply(s, idx, p, log_p, w) * temperature**2


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy; ``labels`` are aligned with ``student_logits`` (already shifted)."""
    import torch.nn.functional as F

    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index)


@functools.cache
def _feature_projector_class():
    from torch import nn

    class FeatureProjector(nn.Module):
        """Learned linear maps from student hidden states to the teacher's width, one per matched layer."""

        def __init__(self, student_width: int, teacher_width: int, n_layers: int):
            super().__init__()
            self.maps = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_layers))
            if student_width == teacher_width:
                for m in self.maps:
                    nn.init.eye_(m.weight)

        def forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
            return self.maps[i](hidden)

    return FeatureProjector


def FeatureProjector(student_width: int, teacher_width: int, n_layers: int) -> nn.Module:
    """Learned linear maps from student hidden states to the teacher's width, one per matched layer: an
    ``nn.Module`` whose class is defined on first use, so importing this module stays torch-free."""
    return _feature_projector_class()(student_width, teacher_width, n_layers)


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, spread evenly; the last student layer meets the last teacher layer."""
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


def feature_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                 projector: nn.Module, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between projected student and teacher hidden states over matched layers.

    ``*_hidden`` are ``output_hidden_states`` tuples (embeddings first, then each layer).
    Each term is divided by the teacher state's mean square so layers weigh alike.
    """
    pairs = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    total = student_hidden[0].new_zeros(())
    for k, (si, ti) in enumerate(pairs):
        s = projector(k, student_hidden[si + 1].float())
        t = teacher_hidden[ti + 1].float()
        per = ((s - t) ** 2).mean(-1) / (t**2).mean(-1).clamp_min(1e-6)
        total = total + _masked_mean(per, mask)
    return total / len(pairs)
