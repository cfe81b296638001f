"""Quality of a model's next-token distributions: perplexity, KL to a reference, top-1 agreement.

One :class:`Tally` per scored model; :meth:`Tally.add` takes, for a run of positions, the
reference's log-probabilities, the model's logits and the target tokens. Both the distillation
eval (student against teacher) and fidelity (export against PyTorch fp32) use it, so the numbers
mean the same in both tables -- the measures llama.cpp's ``--kl-divergence`` tool reports.

numpy only (torch tensors on the CPU are accepted and converted), imported when a function runs, so
importing this module loads neither torch nor numpy.
Sums are accumulated in float64.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def log_softmax(logits) -> np.ndarray:
    """log_softmax over the last axis, float32 (computed stably: x - max - log(sum(exp(x - max))))."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logp, logp) -> np.ndarray:
    """KL(reference || model) per position from log-probabilities, clamped at 0 (rounding can dip below)."""
    import numpy as np

    ref_logp, logp = np.asarray(ref_logp, dtype=np.float32), np.asarray(logp, dtype=np.float32)
    return np.maximum((np.exp(ref_logp) * (ref_logp - logp)).sum(-1, dtype=np.float64), 0.0)


class Tally:
    """Running sums for one model: NLL of the targets, KL to the reference, agreement; per-token KL kept for percentiles."""

    def __init__(self):
        self.nll = 0.0
        self.agree = 0
        self.n = 0
        self.kls: list[np.ndarray] = []

    def add(self, ref_logp, logits, targets, scored=None) -> None:
        """Score positions ``0..len(targets)-1``: ``ref_logp`` [T, V] log-probs, ``logits`` [>=T, V], ``targets`` [T];
        with ``scored`` (T booleans), only the positions it marks (e.g. a chat's answer tokens)."""
        import numpy as np

        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        ref_logp = np.asarray(ref_logp, dtype=np.float32)[: len(targets)]
        logits = np.asarray(logits)[: len(targets)]
        if scored is not None:
            keep = np.asarray(scored, dtype=bool).reshape(-1)[: len(targets)]
            targets, ref_logp, logits = targets[keep], ref_logp[keep], logits[keep]
        logp = log_softmax(logits)
        self.nll += float(-np.take_along_axis(logp, targets[:, None], -1).sum(dtype=np.float64))
        self.kls.append(kl_divergence(ref_logp, logp))
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.n += len(targets)

    def result(self) -> dict:
        import numpy as np

        if self.n == 0:
            raise ValueError("no target tokens to score")
        kl = np.concatenate(self.kls)
        return {"tokens": self.n, "perplexity": math.exp(self.nll / self.n), "cross_entropy": self.nll / self.n,
                "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
                "top1_agreement": self.agree / self.n}
