"""``quant: auto``: a type for every GGUF tensor, chosen for a size budget by each tensor's measured sensitivity.

llama.cpp's ``_M`` mixes are fixed rules (``use_more_bits`` layers, the head at Q6_K); which tensors of a
given model really need bits is a measurement. This module makes it, then spends a byte budget where it buys
the most:

1. **Sensitivity.** On calibration tokens, the float model's next-token distribution is the reference. For
   each quantizable tensor alone, its weights are replaced by what the runtime would compute with at the
   cheapest candidate type (ggml's own quantizer and gguf-py's dequantizer, :mod:`edgekit.quantize.ggml`,
   with the importance matrix) and the mean KL to the reference is measured. Only the layers from the
   tensor's own onward are re-run: every layer's inputs from the float pass are kept.
2. **Every other type** of the ladder is priced without another forward pass: its KL is predicted as the
   measured KL times the ratio of the two types' importance-weighted squared rounding errors on that tensor
   (``sum_c imatrix_c * sum_r (w - w_q)^2``), which is what a second-order expansion of the KL around the
   float model scales with. Measuring every type would cost a forward pass per (tensor, type): five times
   the time for a ranking that the error ratio already gives.
3. **Choice.** Total KL is taken as the sum over tensors (the same first-order assumption), and the
   multiple-choice knapsack is solved greedily on each tensor's lower convex hull of (bytes, KL): start
   everything at its cheapest type, then repeatedly take the upgrade with the largest KL drop per byte that
   still fits. On convex hulls this is the optimum of the Lagrangian relaxation.

Candidate types are K-quants where a row is a multiple of 256 (``Q3_K`` .. ``Q6_K``, ``Q8_0``), otherwise
the 32-blocks llama.cpp itself falls back to (``IQ4_NL``, ``Q5_0``, ``Q5_1``, ``Q8_0``). Norms and biases
stay f32, as in every llama.cpp file. The budget is a file size, a bits-per-weight figure, or by default the
size of ``q4_k_m`` for the same model (so ``auto`` answers "the best file of q4_k_m's size").
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.arch import Architecture
from edgekit.artifact import atomic_write_text, content_id, folder_id, home
from edgekit.errors import RecipeError
from edgekit.progress import steps
from edgekit.quantize import fakequant, ggml
from edgekit.quantize.gguf import compute_imatrix
from edgekit.quantize.schemes import get_scheme, matmul_nbits_bytes
from edgekit.units import UnitError, format_bytes, parse_bytes

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

LADDER_256 = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LADDER_32 = ("IQ4_NL", "Q5_0", "Q5_1", "Q8_0")
SENSITIVITY_TOKENS = 512  # calibration tokens each tensor's KL is measured on
SENSITIVITY_VERSION = 1  # bump when the measurement changes, so saved tables are measured again
VERSION = 3  # bump when the choice changes, so auto exports made by an older one are not reused (2: fill pass;
#             3: trades, _trade)
# with no target, auto aims at the size of this fixed scheme of its format
REFERENCE = {"gguf": "q4_k_m", "onnx": "int4", "executorch": "8da4w"}
_BPW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*bpw\s*$", re.IGNORECASE)


def ladder(row: int) -> tuple[str, ...]:
    """The candidate types of a tensor whose rows are ``row`` long, cheapest first."""
    if row % 256 == 0:
        return LADDER_256
    if row % 32 == 0:
        return LADDER_32
    return ("F16",)


# --------------------------------------------------------------------------- the budget


def parse_target(text: object) -> tuple[str, float]:
    """``"4.8bpw"`` -> ("bpw", 4.8); ``"90MB"`` / ``90000000`` -> ("bytes", 9e7). RecipeError otherwise."""
    if text == "device":
        raise RecipeError("target: device is the device's memory budget, which only a recipe knows (its `device:`); "
                          "on the command line give a size ('90MB') or bits per weight ('4.8bpw')")
    if isinstance(text, str) and (m := _BPW.match(text)):
        bpw = float(m.group(1))
        if not 2.0 <= bpw <= 16.0:
            raise RecipeError(f"target {text!r}: bits per weight must be between 2 and 16 (e.g. '4.8bpw')")
        return "bpw", bpw
    try:
        return "bytes", float(parse_bytes(text))
    except UnitError as e:
        raise RecipeError(f"target {text!r} is neither a size nor bits per weight: {e}; e.g. '90MB' or "
                          "'4.8bpw'") from None


def budget_bytes(target: object | None, arch: Architecture, fmt: str = "gguf") -> int:
    """The tensor bytes ``target`` allows for ``arch`` in ``fmt`` (all tensors, norms included, as bits_per_weight
    counts)."""
    reference = get_scheme(fmt, REFERENCE[fmt])
    if target is None:
        return reference.weight_bytes(arch)
    kind, value = parse_target(target)
    if kind == "bpw":
        return int(value * sum(t.params for t in reference.tensors(arch)) / 8)
    return int(value)


def check_budget(shapes: list[tuple[int, int]], fixed_bytes: int, budget: int,
                 candidates: Callable[[int], list[Candidate]]) -> None:
    """RecipeError before any measuring when even every matrix (``(rows, row)``) at its cheapest type overflows."""
    cheapest = {row: candidates(row)[0] for _, row in shapes}
    least = fixed_bytes + sum(cheapest[row].nbytes(rows, row) for rows, row in shapes)
    if least > budget:
        types = "/".join(sorted({c.dtype for c in cheapest.values()}))
        raise RecipeError(f"target of {format_bytes(budget)} is below the smallest auto mix of this model "
                          f"({format_bytes(least)}, every matrix at its cheapest type {types}); raise the target or "
                          "pick a smaller student")


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Option:
    dtype: str
    nbytes: int
    kl: float  # predicted mean KL when this tensor alone is at dtype


@dataclass
class TensorSensitivity:
    name: str  # GGUF name
    row: int
    rows: int
    options: list[Option]  # cheapest first
    measured_kl: float  # mean KL measured with the tensor at options[0]
    errors: dict[str, float] = field(default_factory=dict)  # importance-weighted squared error per type


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, KL), cheapest first: the options a greedy budget walk can stop at."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.kl)):
        if pts and o.kl >= pts[-1].kl:
            continue  # dearer and no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a -> o: dropping it keeps the hull convex
            if (b.kl - a.kl) * (o.nbytes - a.nbytes) >= (o.kl - a.kl) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def choose(tensors: list[TensorSensitivity], fixed_bytes: int, budget: int) -> dict[str, Option]:
    """The least total predicted KL with ``fixed_bytes`` + chosen bytes <= ``budget``; RecipeError if even the
    cheapest types do not fit."""
    hulls = {t.name: _hull(t.options) for t in tensors}
    pick = {name: 0 for name in hulls}
    total = fixed_bytes + sum(h[0].nbytes for h in hulls.values())
    if total > budget:
        raise RecipeError(f"target of {format_bytes(budget)} is below the smallest auto mix of this model "
                          f"({format_bytes(total)}, every tensor at its cheapest type {LADDER_256[0]}/"
                          f"{LADDER_32[0]}); raise the target or pick a smaller student")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], pick[name]
        if i + 1 < len(h):
            gain = (h[i].kl - h[i + 1].kl) / max(1, h[i + 1].nbytes - h[i].nbytes)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pick[name]
        step = h[i + 1].nbytes - h[i].nbytes
        if total + step > budget:
            continue  # this tensor's next step does not fit; cheaper steps of others still may
        pick[name], total = i + 1, total + step
        push(name)
    chosen = {name: hulls[name][i] for name, i in pick.items()}
    # The walk stops where a large tensor's next hull step does not fit (a vocabulary-sized embedding can leave
    # tens of MB unused); options off the hull may still fit there. Spend what is left on them, the largest KL
    # drop first, until nothing more fits.
    options = {t.name: t.options for t in tensors}
    while True:
        left = budget - total
        best = max(((chosen[n].kl - o.kl, n, o) for n, opts in options.items() for o in opts
                    if o.kl < chosen[n].kl and 0 < o.nbytes - chosen[n].nbytes <= left),
                   default=None, key=lambda x: x[0])
        if best is None:
            break
        _, name, option = best
        total += option.nbytes - chosen[name].nbytes
        chosen[name] = option
    return _trade(chosen, options, budget - total)


def _trade(chosen: dict[str, Option], options: dict[str, list[Option]], left: int) -> dict[str, Option]:
    """Upgrades that fit once other tensors step down, kept while they lower the total predicted KL.

    The greedy walk climbs small tensors first (their steps drop more KL per byte), so a large tensor's last step
    can miss the budget by a few kB once they are all at the top: Gemma 3's 262k-row embedding stayed at Q5_1,
    52 MB under a budget it nearly filled, while every small matrix sat at a type that loses nothing on weights
    that came from that very grid. Here such an upgrade is paid for by stepping other tensors down, the least KL
    per byte freed first, one step each.
    """
    while True:
        best = None
        for name, opts in options.items():
            for up in opts:
                gain, need = chosen[name].kl - up.kl, up.nbytes - chosen[name].nbytes - left
                if gain <= 0 or need <= 0:
                    continue
                downs = sorted(((d.kl - chosen[m].kl) / (chosen[m].nbytes - d.nbytes), m, d)
                               for m, ds in options.items() if m != name
                               for d in [min((d for d in ds if d.nbytes < chosen[m].nbytes),
                                             key=lambda d: (d.kl - chosen[m].kl) / (chosen[m].nbytes - d.nbytes),
                                             default=None)] if d is not None)
                freed, cost, moves = 0, 0.0, []
                for _, m, d in downs:
                    if freed >= need or cost >= gain:
                        break
                    freed, cost = freed + chosen[m].nbytes - d.nbytes, cost + d.kl - chosen[m].kl
                    moves.append((m, d))
                if freed >= need and gain - cost > 1e-12 and (best is None or gain - cost > best[0]):
                    best = (gain - cost, name, up, moves)
        if best is None:
            return chosen
        _, name, up, moves = best
        left -= up.nbytes - chosen[name].nbytes
        chosen[name] = up
        for m, d in moves:
            left += chosen[m].nbytes - d.nbytes
            chosen[m] = d


# --------------------------------------------------------------------------- sensitivity


class _Tail:
    """The float model's inputs to every decoder layer (and to the final norm) over the calibration sequences,
    so a forward pass can restart at any layer with one tensor changed."""

    def __init__(self, model, sequences: list[list[int]]):
        import torch

        self.model, self.sequences = model, sequences
        body = model.model
        self.layers, self.norm = list(body.layers), body.norm
        self.inputs: list[list[tuple]] = [[] for _ in self.layers]
        self.final: list = []
        self.ref: list = []
        hooks = []
        for i, layer in enumerate(self.layers):
            def hook(_m, args, kwargs, i=i):
                self.inputs[i].append((args, kwargs))
            hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        hooks.append(self.norm.register_forward_pre_hook(lambda _m, args: self.final.append(args[0])))
        try:
            with torch.no_grad():
                for ids in sequences:
                    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
                    self.ref.append(torch.log_softmax(logits, -1))
        finally:
            for h in hooks:
                h.remove()
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        self.tokens = sum(len(s) for s in sequences)

    def logits(self, start: int, s: int, hidden=None):
        """Sequence ``s``'s logits re-run from layer ``start`` (``len(layers)``: only norm and head), starting from
        ``hidden`` (default: the float model's input to that layer)."""
        import torch

        if hidden is None:
            hidden = self.inputs[start][s][0][0] if start < len(self.layers) else self.final[s]
        for j in range(start, len(self.layers)):
            args, kwargs = self.inputs[j][s]
            if args:
                out = self.layers[j](hidden, *args[1:], **kwargs)
            else:
                out = self.layers[j](**{**kwargs, "hidden_states": hidden})
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(self.norm(hidden))[0].float()
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def kl(self, start: int, embed: bool = False) -> float:
        """Mean KL(float || changed) over every calibration token, re-running from layer ``start``; ``embed``
        recomputes the layer-0 input from the (changed) token embedding."""
        import torch

        total = 0.0
        with torch.no_grad():
            for s, ids in enumerate(self.sequences):
                hidden = self.model.model.embed_tokens(torch.tensor([ids])) if embed else None
                logp = torch.log_softmax(self.logits(start, s, hidden), -1)
                ref = self.ref[s]
                total += float((ref.exp() * (ref - logp)).sum())
        return max(0.0, total / self.tokens)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Candidate:
    """One type a unit may take: its bytes for ``rows x row`` and what the runtime computes with after quantizing
    a float32 ``[rows, row]`` matrix (given its importance-matrix column weights, or None)."""

    dtype: str
    nbytes: Callable[[int, int], int]
    roundtrip: Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def gguf_candidates(row: int, threads: int | None = None) -> list[Candidate]:
    """The GGUF ladder of a ``row``-long matrix, quantized by ggml itself (with the importance matrix)."""
    return [Candidate(d, lambda rows, r, d=d: rows * ggml.row_bytes(d, r),
                      lambda w, imat, d=d: ggml.roundtrip(w, d, imat, threads)) for d in ladder(row)]


def onnx_candidates(row: int) -> list[Candidate]:
    """MatMulNBits block 32 at 4 or 8 bits (asymmetric, what the ONNX int4 export writes), as
    :func:`edgekit.quantize.fakequant.nbits` reproduces onnxruntime's quantizer bit for bit."""
    import torch

    return [Candidate(f"int{b}", lambda rows, r, b=b: matmul_nbits_bytes(b, 32)(r, rows),
                      lambda w, imat, b=b: fakequant.nbits(torch.from_numpy(w), b, 32).numpy()) for b in (4, 8)]


def executorch_candidates(group: int = 32) -> list[Candidate]:
    """ExecuTorch's 8da4w linear (int4 weights in groups of ``group``, a bf16 scale each as XNNPACK packs them) and
    8da8w (int8 per output channel, an fp32 scale), as torchao's own QAT fake-quantizer computes the weights."""
    import torch

    return [Candidate("8da4w", lambda rows, r: rows * (r // 2 + 2 * (r // group)),
                      lambda w, imat: fakequant.torchao_weight(torch.from_numpy(w), "8da4w", group).numpy()),
            Candidate("8da8w", lambda rows, r: rows * (r + 4),
                      lambda w, imat: fakequant.torchao_weight(torch.from_numpy(w), "8da8w").numpy())]


def sensitivity(model, units: Mapping[str, Sequence[str]], sequences: list[list[int]],
                imatrix: Mapping[str, np.ndarray], candidates: Callable[[int], list[Candidate]], *,
                tokens: int = SENSITIVITY_TOKENS, progress: bool = True) -> list[TensorSensitivity]:
    """Each quantizable unit's KL cost at every candidate type (see the module docstring).

    ``model`` is the float HF model; ``units`` maps each stored matrix's name (a GGUF tensor, an ONNX weight) to
    the module names of the weights it holds, in row order (one, or q/k/v for a packed matrix):
    ``model.layers.3.mlp.up_proj``, ``model.embed_tokens``, ``lm_head``. ``imatrix`` is keyed by the unit name;
    ``candidates(row)`` lists a unit's types, cheapest first."""
    import numpy as np
    import torch

    picked, seen = [], 0
    for ids in sequences:
        if seen >= tokens:
            break
        picked.append(ids[: tokens - seen])
        seen += len(picked[-1])
    if not picked:
        raise RecipeError("quant auto needs calibration text to measure sensitivity; the calibration texts "
                          "tokenized to nothing")
    modules = dict(model.named_modules())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    todo = [(u, ms) for u, ms in units.items() if all(m in modules for m in ms) and not (tied and ms == ["lm_head"])]
    tail = _Tail(model, picked)
    n_layers = len(tail.layers)
    out: list[TensorSensitivity] = []
    with steps(progress, len(todo), f"sensitivity of {len(todo)} matrices on {tail.tokens} tokens") as bar:
        for unit, names in todo:
            weights = [modules[m].weight for m in names]
            w = torch.cat([x.detach().to(torch.float32) for x in weights]).numpy()
            rows, row = w.shape
            imat = imatrix.get(unit)
            col = np.ones(row, dtype=np.float64) if imat is None else np.asarray(imat, dtype=np.float64)
            options, errors, cheapest = [], {}, None
            for c in candidates(row):
                q = c.roundtrip(w, imat)
                errors[c.dtype] = float((((w - q).astype(np.float64) ** 2).sum(axis=0) * col).sum())
                options.append((c.dtype, c.nbytes(rows, row)))
                if cheapest is None:
                    cheapest = q
            originals = [x.data.clone() for x in weights]
            try:
                at = 0
                for x in weights:
                    x.data.copy_(torch.from_numpy(cheapest[at:at + x.shape[0]]).to(x.dtype))
                    at += x.shape[0]
                if names == ["lm_head"]:
                    measured = tail.kl(n_layers)
                elif names[0].endswith("embed_tokens"):
                    measured = tail.kl(0, embed=True)
                else:
                    m = _LAYER.match(names[0])
                    measured = tail.kl(int(m.group(1)) if m else 0)
            finally:
                for x, original in zip(weights, originals):
                    x.data.copy_(original)
            base = errors[options[0][0]]
            out.append(TensorSensitivity(
                unit, row, rows,
                [Option(d, nb, measured * (errors[d] / base if base > 0 else 0.0)) for d, nb in options],
                measured, errors))
            bar.update(1)
    return out


@dataclass
class Mix:
    types: dict[str, str]  # GGUF name -> chosen type
    budget: int
    tensor_bytes: int  # chosen quantized tensors + fixed (f32) tensors
    predicted_kl: float
    rows: list[dict]  # per tensor: name, type, bytes, measured KL (at the cheapest type), predicted KL

    def summary(self) -> dict:
        return {"budget_bytes": self.budget, "tensor_bytes": self.tensor_bytes,
                "predicted_kl": round(self.predicted_kl, 5),
                "types": dict(sorted(Counter(self.types.values()).items()))}


def plan_mix(found: list[TensorSensitivity], fixed_bytes: int, budget: int) -> Mix:
    """:func:`choose` over :func:`sensitivity`'s result, with a per-tensor record for the export's report."""
    chosen = choose(found, fixed_bytes, budget)
    rows = [{"name": t.name, "type": chosen[t.name].dtype, "bytes": chosen[t.name].nbytes,
             "kl_measured": round(t.measured_kl, 6), "kl_measured_at": t.options[0].dtype,
             "kl_predicted": round(chosen[t.name].kl, 6)} for t in found]
    total = fixed_bytes + sum(o.nbytes for o in chosen.values())
    mix = Mix({n: o.dtype for n, o in chosen.items()}, budget, total, sum(o.kl for o in chosen.values()), rows)
    log.info("auto mix: %s of %s budget, predicted KL %.4f, %s", format_bytes(total), format_bytes(budget),
             mix.predicted_kl, mix.summary()["types"])
    return mix


def _save(found: list[TensorSensitivity], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"version": SENSITIVITY_VERSION, "tensors": [asdict(t) for t in found]}))


def _load(path: Path) -> list[TensorSensitivity] | None:
    """A saved sensitivity table, or None when there is none or it is unreadable (then it is measured again)."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != SENSITIVITY_VERSION:
            return None
        return [TensorSensitivity(t["name"], t["row"], t["rows"], [Option(**o) for o in t["options"]],
                                  t["measured_kl"], t["errors"]) for t in data["tensors"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mix_for(fmt: str, model_dir: Path, units: Mapping[str, Sequence[str]], fixed_bytes: int, texts: list[str],
            budget: int, candidates: Callable[[int], list[Candidate]], *, calibration_tokens: int,
            progress: bool = True) -> tuple[Mix, Mapping[str, np.ndarray]]:
    """The importance matrix of ``units`` on ``texts``, then every unit measured on the float model in
    ``model_dir`` and the mix chosen for ``budget`` bytes (``fixed_bytes``: what is stored at a fixed type).
    Returns the mix and the importance matrix (keyed by unit name). The measurement does not depend on the
    budget: it is kept in the store's cache, named by the format, the model and the calibration text, and
    reused, so other targets for the same model cost only the choice and the writing."""
    imatrix = compute_imatrix(model_dir, texts, max_tokens=calibration_tokens,
                              names={m: u for u, ms in units.items() for m in ms})
    cache = home() / "cache" / (f"sensitivity-{fmt}-" + content_id(
        folder_id(model_dir), texts, calibration_tokens, SENSITIVITY_TOKENS, SENSITIVITY_VERSION) + ".json")
    found = _load(cache)
    if found is not None and {t.name for t in found} == set(units):
        log.info("reusing the sensitivity of %d tensors from %s", len(found), cache)
        return plan_mix(found, fixed_bytes, budget), imatrix
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sequences = [ids for ids in (tok(t, add_special_tokens=False)["input_ids"][:256] for t in texts) if ids]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    found = sensitivity(model, units, sequences, imatrix, candidates, progress=progress)
    del model
    _save(found, cache)
    return plan_mix(found, fixed_bytes, budget), imatrix
