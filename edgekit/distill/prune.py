"""Student initialisation by structured pruning: carve the planned shape out of the teacher.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation") shows that a student whose weights are *selected* from the teacher, ranked by
activation-based importance measured on a little calibration text, starts far closer to the
teacher than a random one and distils in a fraction of the tokens. This module does that:

1. :func:`measure_importance` runs calibration batches through the teacher with forward hooks
   and scores every prunable unit:

   - ``block``           per layer, Block Influence = mean over tokens of 1 - cos(input, output)
                         (ShortGPT, Men et al. 2024): a layer that barely turns its input is redundant.
   - ``mlp_channel``     [layers, intermediate] mean |act(gate) * up|, the input of ``down_proj``.
   - ``head``            [layers, heads] mean L2 norm of each head's slice of the input of ``o_proj``.
   - ``hidden_channel``  [hidden] mean |x| of every RMSNorm output (both per layer, and the final one), summed.

2. :func:`prune` builds a model of the target shape and copies the best units: the top layers
   (kept in their original order), whole kv groups of attention heads (GQA: the query heads that
   share one kv head stay together), the top MLP channels per layer and the top hidden channels
   everywhere the residual stream is read or written. Units keep their original order, so a
   target equal to the teacher's shape reproduces the teacher exactly. ``method="random"`` gives
   the randomly initialised baseline of the same shape.

3. With ``reconstruct`` (the default), :func:`measure_reconstruction` takes a second, shorter pass
   over the calibration text and :func:`prune` repairs what the cuts broke instead of only copying:

   - each layer's attention output projection is refitted by least squares to the heads it keeps
     (``o_proj``: the kept heads' outputs, weighted by their Gram matrix, reproduce what all heads
     wrote). The query heads of one kv group read the same values, so the kept ones carry much of
     what a dropped one wrote;
   - each norm over the hidden size has its weight multiplied by the mean ratio of the kept channels'
     RMS to all channels' RMS at its input: RMSNorm divides by the RMS of the channels it sees, so
     with channels gone every normalised activation would come out scaled.

   Measured on the embedded teacher (benchmarks/RESULTS.md, "Student initialisation"): keeping 6 of
   its 9 heads and nothing else cut, KL to the teacher 1.91 -> 0.31; these are training-free
   corrections of the kind in the structured-pruning literature (output reconstruction as in FLAP,
   ZipLM and SlimGPT), written here because no maintained library does it for these layouts.

4. :func:`run` is the stage: teacher folder + calibration texts in, artifact folder out
   (student weights, tokenizer, ``importance.safetensors``, ``manifest.json``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit import artifact
from edgekit.arch import CROSS_FAMILY, Architecture
from edgekit.errors import ModelError, RecipeError
from edgekit.hf import NOTICE_FILE, worth_copying

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

METHODS = ("minitron", "random")
CALIB_SEQ_LEN = 512  # tokens per calibration sequence
CALIB_BATCH = 4  # sequences per forward pass
RECONSTRUCT_TOKENS = 8192  # calibration tokens for the reconstruction statistics (a 2nd, shorter pass)
RIDGE = 1e-2  # least-squares refits: ridge = this x the mean diagonal of the Gram matrix (kept units' energy)


@dataclass
class Importance:
    """Activation-based scores from :func:`measure_importance`; higher means more important."""

    block: torch.Tensor  # [layers]
    mlp_channel: torch.Tensor  # [layers, intermediate]
    head: torch.Tensor  # [layers, heads]
    hidden_channel: torch.Tensor  # [hidden]
    tokens: int = 0  # calibration tokens the scores were averaged over

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in ("block", "mlp_channel", "head", "hidden_channel")}


# --------------------------------------------------------------------------- importance


def measure_importance(model: nn.Module, batches: list[torch.Tensor]) -> Importance:
    """Score layers, MLP channels, heads and hidden channels of a Llama model on token batches [batch, seq]."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():  # scores only: no graph
        cfg = model.config
        layers = model.model.layers
        head_dim = _head_dim(cfg)
        dev = model.device
        block = torch.zeros(len(layers), device=dev)
        mlp = torch.zeros(len(layers), cfg.intermediate_size, device=dev)
        head = torch.zeros(len(layers), cfg.num_attention_heads, device=dev)
        hidden = torch.zeros(cfg.hidden_size, device=dev)

        def on_block(i):
            def hook(module, args, kwargs, output):
                x_in = args[0] if args else kwargs["hidden_states"]
                x_out = output[0] if isinstance(output, tuple) else output
                block[i] += (1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)).sum()
            return hook

        def on_down_proj(i):
            def hook(module, args):
                mlp[i] += args[0].float().abs().sum(dim=(0, 1))
            return hook

        def on_o_proj(i):
            def hook(module, args):
                x = args[0].float()
                head[i] += x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1).sum(dim=(0, 1))
            return hook

        def on_norm(module, args, output):
            hidden.add_(output.float().abs().sum(dim=(0, 1)))

        handles = [model.model.norm.register_forward_hook(on_norm)]
        for i, layer in enumerate(layers):
            handles += [
                layer.register_forward_hook(on_block(i), with_kwargs=True),
                layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)),
                layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)),
            ] + [norm.register_forward_hook(on_norm) for _, norm in _hidden_norms(layer)]
        model.eval()
        tokens = 0
        try:
            for ids in batches:
                model(input_ids=ids.to(dev), use_cache=False)
                tokens += ids.numel()
        finally:
            for h in handles:
                h.remove()
        if tokens == 0:
            raise RecipeError("no calibration tokens to measure importance on; give at least one non-empty text")
        return Importance((block / tokens).cpu(), (mlp / tokens).cpu(), (head / tokens).cpu(), (hidden / tokens).cpu(),
                          tokens)


@dataclass
class Reconstruction:
    """Calibration statistics of the teacher for repairing a pruned student (:func:`measure_reconstruction`)."""

    o_gram: dict[int, torch.Tensor]  # teacher layer -> Gram matrix of o_proj's input [q_dim, q_dim], per token
    norm_ratio: dict[tuple[int, str], float]  # (teacher layer or -1 for the final norm, norm name) -> RMS ratio


def measure_reconstruction(model: nn.Module, batches: list[torch.Tensor], target: Architecture,
                           importance: Importance) -> Reconstruction:
    """Statistics :func:`prune` needs to refit the layers ``target`` keeps (the units chosen by ``importance``).

    Only what the cut changes is measured: the Gram matrix of a kept layer's attention output input when
    heads are dropped, and each hidden-size norm's ratio of kept-channel RMS to all-channel RMS (per token,
    averaged) when hidden channels are dropped."""
    import torch

    teacher = teacher_architecture(model)
    kept, hid = kept_units(importance, target)
    kept, hid = kept.tolist(), hid.to(model.device)
    heads_cut, hidden_cut = target.heads < teacher.heads, target.hidden_size < teacher.hidden_size
    o_gram: dict[int, torch.Tensor] = {}
    ratio_sum: dict[tuple[int, str], float] = {}
    tokens = 0

    def on_o_proj(i):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            o_gram[i] = o_gram[i] + x.T @ x if i in o_gram else x.T @ x
        return hook

    def on_norm(key):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().pow(2)
            r = (x[:, hid].mean(dim=-1) / x.mean(dim=-1).clamp_min(1e-30)).sqrt()
            ratio_sum[key] = ratio_sum.get(key, 0.0) + r.sum().item()
        return hook

    handles = []
    if hidden_cut:
        handles.append(model.model.norm.register_forward_hook(on_norm((-1, "norm"))))
    for i in kept:
        layer = model.model.layers[i]
        if heads_cut:
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        if hidden_cut:
            handles += [norm.register_forward_hook(on_norm((i, name))) for name, norm in _hidden_norms(layer)]
    try:
        with torch.no_grad():
            for ids in batches:
                if tokens >= RECONSTRUCT_TOKENS or not handles:
                    break
                model(input_ids=ids.to(model.device), use_cache=False)
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    if handles and tokens == 0:
        raise RecipeError("no calibration tokens to measure the reconstruction on; give at least one non-empty text")
    return Reconstruction({i: (g / tokens).double().cpu() for i, g in o_gram.items()},
                          {k: v / tokens for k, v in ratio_sum.items()})


def _least_squares(gram: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, len(keep)] whose output from the kept inputs best matches ``weight`` [out, in] from all
    inputs, in the mean square over the calibration tokens whose input Gram matrix is ``gram`` (ridge-damped)."""
    import torch

    g_kk = gram[keep][:, keep]
    g_kk = g_kk + RIDGE * g_kk.diagonal().mean() * torch.eye(len(keep), dtype=gram.dtype)
    return torch.linalg.solve(g_kk, gram[keep] @ weight.double().T).T.to(weight.dtype)


def _scale_norm(weight: torch.Tensor, factor: float, offset: bool) -> torch.Tensor:
    """A norm weight whose effective scale is multiplied by ``factor`` (Gemma's norms scale by 1 + weight)."""
    return (1 + weight.float()) * factor - 1 if offset else weight.float() * factor


# --------------------------------------------------------------------------- pruning


def check_carvable(teacher: Architecture, target: Architecture) -> None:
    """Raise RecipeError unless ``target`` can be selected out of ``teacher`` (no unit is ever invented)."""
    problems = []
    if target.model_type != teacher.model_type and (teacher.family.name, target.family.name) not in CROSS_FAMILY:
        problems.append(f"a {target.family.name} student cannot be carved from a {teacher.family.name} teacher "
                        f"(pairs that work: {', '.join(f'{a} -> {b}' for a, b in CROSS_FAMILY)})")
    if target.layers < 1:
        problems.append(f"layers {target.layers} is below 1")
    for name in ("layers", "hidden_size", "intermediate_size", "heads", "kv_heads"):
        want, have = getattr(target, name), getattr(teacher, name)
        if want > have:
            problems.append(f"{name} {want} is larger than the teacher's {have} (pruning only removes units)")
        elif want < 1 and name != "layers":
            problems.append(f"{name} {want} is below 1")
    if target.head_dim != teacher.head_dim:
        problems.append(f"head_dim {target.head_dim} differs from the teacher's {teacher.head_dim} "
                        "(heads are kept or dropped whole, never resized)")
    if target.kv_heads >= 1 and target.heads % target.kv_heads:
        problems.append(f"heads {target.heads} is not a multiple of kv_heads {target.kv_heads}")
    elif target.kv_heads >= 1 and target.heads // target.kv_heads > teacher.heads // teacher.kv_heads:
        problems.append(f"heads // kv_heads = {target.heads // target.kv_heads} query heads per kv group exceeds "
                        f"the teacher's group of {teacher.heads // teacher.kv_heads}")
    if target.vocab_size != teacher.vocab_size:
        problems.append(f"vocab_size {target.vocab_size} differs from the teacher's {teacher.vocab_size} "
                        "(a pruned student keeps its teacher's tokenizer)")
    if target.tie_embeddings != teacher.tie_embeddings:
        problems.append(f"tie_embeddings {target.tie_embeddings} differs from the teacher's {teacher.tie_embeddings}")
    if problems:
        raise RecipeError(
            "the student shape cannot be carved out of the teacher: " + "; ".join(problems) + ". Fix: choose a "
            "student no larger than the teacher in every dimension, with the teacher's head_dim, vocab_size and "
            "tie_embeddings and whole kv groups (edgekit.plan.candidate_shapes lists shapes that work)"
        )


def prune(model: nn.Module, target: Architecture, importance: Importance | None, method: str = "minitron",
          seed: int = 0, reconstruction: Reconstruction | None = None) -> nn.Module:
    """A new model of exactly the ``target`` shape, its weights selected from ``model`` (or random, seeded),
    repaired with ``reconstruction`` (:func:`measure_reconstruction`) when given."""
    import torch

    if method not in METHODS:
        raise RecipeError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    teacher = teacher_architecture(model)
    check_carvable(teacher, target)
    cfg = student_config(model.config, target)
    if method == "random":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _new_model(model, cfg)
    if importance is None:
        raise RecipeError("pruning method 'minitron' needs importance scores; call measure_importance() on "
                          "calibration batches first, or use method 'random'")
    _check_importance(importance, teacher)

    student = _new_model(model, cfg)
    rec = reconstruction
    kept_layers, hid = kept_units(importance, target)
    fam = teacher.family
    qk_norm = fam.qk_norm and target.family.qk_norm  # a llama student of a qwen3 teacher has none (CROSS_FAMILY)
    with torch.no_grad():
        for new, old in zip(student.model.layers, kept_layers.tolist(), strict=True):
            src = model.model.layers[old]
            q_rows, kv_rows = _head_rows(importance.head[old], teacher, target)
            ch = top_indices(importance.mlp_channel[old], target.intermediate_size)
            if fam.fused:  # Phi-3: qkv_proj rows are [q | k | v], gate_up_proj rows are [gate | up]
                qkv = torch.cat([q_rows, teacher.q_dim + kv_rows, teacher.q_dim + teacher.kv_dim + kv_rows])
                _copy_linear(new.self_attn.qkv_proj, src.self_attn.qkv_proj, rows=qkv, cols=hid)
                _copy_linear(new.mlp.gate_up_proj, src.mlp.gate_up_proj,
                             rows=torch.cat([ch, teacher.intermediate_size + ch]), cols=hid)
            else:  # q/k/v biases (Qwen2) follow their rows
                _copy_linear(new.self_attn.q_proj, src.self_attn.q_proj, rows=q_rows, cols=hid)
                _copy_linear(new.self_attn.k_proj, src.self_attn.k_proj, rows=kv_rows, cols=hid)
                _copy_linear(new.self_attn.v_proj, src.self_attn.v_proj, rows=kv_rows, cols=hid)
                _copy_linear(new.mlp.gate_proj, src.mlp.gate_proj, rows=ch, cols=hid)
                _copy_linear(new.mlp.up_proj, src.mlp.up_proj, rows=ch, cols=hid)
            _copy_linear(new.self_attn.o_proj, src.self_attn.o_proj, rows=hid, cols=q_rows)
            if rec and old in rec.o_gram:  # the kept heads also write what the dropped ones did, as far as they can
                new.self_attn.o_proj.weight.copy_(
                    _least_squares(rec.o_gram[old], q_rows, src.self_attn.o_proj.weight[hid]))
            _copy_linear(new.mlp.down_proj, src.mlp.down_proj, rows=hid, cols=ch)
            if qk_norm:  # per-head norms: heads keep their head_dim, so these are copied whole
                new.self_attn.q_norm.weight.copy_(src.self_attn.q_norm.weight)
                new.self_attn.k_norm.weight.copy_(src.self_attn.k_norm.weight)
            for (name, dst), (_, norm) in zip(_hidden_norms(new), _hidden_norms(src), strict=True):
                w = norm.weight[hid]
                if rec and (old, name) in rec.norm_ratio:
                    w = _scale_norm(w, rec.norm_ratio[(old, name)], fam.norm_offset)
                dst.weight.copy_(w)
        embed = model.model.embed_tokens.weight[:, hid]
        final = model.model.norm.weight[hid]
        if fam.embed_scale:
            # Gemma multiplies embeddings by sqrt(hidden): keep the teacher's scale on the kept channels, and
            # undo it on a tied head through the final norm's (1 + w), so the carved model computes the same
            c = (teacher.hidden_size / target.hidden_size) ** 0.5
            embed = embed * c
            if cfg.tie_word_embeddings:
                final = (1 + final.float()) / c - 1
        if rec and (-1, "norm") in rec.norm_ratio:
            final = _scale_norm(final, rec.norm_ratio[(-1, "norm")], fam.norm_offset)
        student.model.norm.weight.copy_(final)
        student.model.embed_tokens.weight.copy_(embed)
        if not cfg.tie_word_embeddings:
            _copy_linear(student.lm_head, model.lm_head, cols=hid)
    log.info("pruned to %d layers (kept %s), hidden %d, intermediate %d, %d heads / %d kv heads",
             target.layers, kept_layers.tolist(), target.hidden_size, target.intermediate_size,
             target.heads, target.kv_heads)
    return student


def teacher_architecture(model: nn.Module) -> Architecture:
    """The model's Architecture; a family edgekit does not support is one ModelError line."""
    return Architecture.from_hf_config(model.config.to_dict(), source="teacher config")


def _hidden_norms(layer) -> list[tuple[str, nn.Module]]:
    """The layer's norms over the hidden size, in a fixed order (Gemma 3 has four, the others two)."""
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return [(n, getattr(layer, n)) for n in names if hasattr(layer, n)]


def student_config(teacher_cfg, target: Architecture):
    """The teacher's config (rope, eps, activation, ...) with the target's shape set explicitly.

    A student of another family (``target.model_type``, one of :data:`edgekit.arch.CROSS_FAMILY`) gets that
    family's config class with the teacher's shared settings."""
    if target.model_type != teacher_cfg.model_type:
        from transformers import AutoConfig

        shared = ("vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act")
        teacher_cfg = AutoConfig.for_model(target.model_type, **{k: getattr(teacher_cfg, k) for k in shared
                                                                 if getattr(teacher_cfg, k, None) is not None})
    cfg = copy.deepcopy(teacher_cfg)
    cfg.num_hidden_layers = target.layers
    cfg.hidden_size = target.hidden_size
    cfg.intermediate_size = target.intermediate_size
    cfg.num_attention_heads = target.heads
    cfg.num_key_value_heads = target.kv_heads
    cfg.head_dim = target.head_dim
    if getattr(cfg, "layer_types", None) is not None:
        # The student keeps its family's attention pattern for its own depth (Gemma 3: every 6th layer global,
        # the rest sliding, as llama.cpp's gemma3 graph assumes), not the kept layers' original types.
        cfg.layer_types = [_layer_type(target, i) for i in range(target.layers)]
    return cfg


def _layer_type(target: Architecture, i: int) -> str:
    if not target.sliding_layers:
        return "full_attention"
    if target.sliding_layers == target.layers:
        return "sliding_attention"
    return "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original (ascending) order."""
    import torch

    return torch.topk(scores.float(), k, sorted=False).indices.sort().values


def kept_units(importance: Importance, target: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, hidden channels) of the teacher that a ``target``-shaped student keeps, ascending: the one rule
    :func:`prune`, :func:`measure_reconstruction` and the stage's record all follow."""
    return (top_indices(importance.block, target.layers),
            top_indices(importance.hidden_channel, target.hidden_size))


def _head_rows(head_scores: torch.Tensor, teacher: Architecture, target: Architecture):
    """Row indices (into q_proj and k/v_proj) of the query heads and kv heads one layer keeps.

    Query head h uses kv head h // group. Each kv group is scored by the sum of its query
    heads; the best ``target.kv_heads`` groups stay, each with its best ``heads // kv_heads`` heads.
    """
    import torch

    group = teacher.heads // teacher.kv_heads
    per_group = head_scores.view(teacher.kv_heads, group)
    kept_groups = top_indices(per_group.sum(dim=1), target.kv_heads)
    q_heads = [g * group + j for g in kept_groups.tolist()
               for j in top_indices(per_group[g], target.heads // target.kv_heads).tolist()]
    d = teacher.head_dim
    q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in q_heads])
    kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kept_groups.tolist()])
    return q_rows, kv_rows


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> None:
    """Copy the selected rows/columns; a bias only where the student's layout has one (CROSS_FAMILY)."""
    w, b = src.weight, src.bias
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    dst.weight.copy_(w)
    if b is not None and dst.bias is not None:
        dst.bias.copy_(b)


def _new_model(teacher: nn.Module, cfg) -> nn.Module:
    """A randomly initialised model for ``cfg`` in the teacher's dtype (the teacher's class if the family is
    the same, else the student family's own transformers class)."""
    from transformers import AutoModelForCausalLM

    if cfg.model_type == teacher.config.model_type:
        return type(teacher)(cfg).to(teacher.dtype).eval()
    return AutoModelForCausalLM.from_config(cfg).to(teacher.dtype).eval()


def _check_importance(imp: Importance, teacher: Architecture) -> None:
    expected = {"block": (teacher.layers,), "mlp_channel": (teacher.layers, teacher.intermediate_size),
                "head": (teacher.layers, teacher.heads), "hidden_channel": (teacher.hidden_size,)}
    for name, shape in expected.items():
        if tuple(getattr(imp, name).shape) != shape:
            raise RecipeError(f"importance {name} has shape {tuple(getattr(imp, name).shape)} but this teacher "
                              f"needs {shape}; the scores were measured on another model, re-measure on this one")


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# --------------------------------------------------------------------------- the stage


def calibration_batches(tokenizer, texts: list[str], max_tokens: int, seq_len: int = CALIB_SEQ_LEN,
                        batch_size: int = CALIB_BATCH) -> list[torch.Tensor]:
    """Texts joined by EOS into one token stream (at most ``max_tokens``), cut into [batch, seq_len] batches."""
    import torch

    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    seqs = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    full = [s for s in seqs if len(s) == seq_len]
    batches = [torch.tensor(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    if seqs and len(seqs[-1]) < seq_len:  # the short tail has its own batch rather than padding
        batches.append(torch.tensor([seqs[-1]]))
    return batches


def run(teacher_dir: Path, target: Architecture, calib_texts: list[str], out_dir: Path, method: str = "minitron",
        seed: int = 0, max_tokens: int = 16384, reconstruct: bool = True) -> Path:
    """Prune the teacher in ``teacher_dir`` to ``target`` and write the student artifact to ``out_dir``
    (``reconstruct``: repair the cut layers, see the module docstring; minitron only)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    reconstruct = reconstruct and method == "minitron"
    config = {"target": target.to_dict(), "method": method, "seed": seed, "max_tokens": max_tokens,
              "calibration": artifact.content_id(calib_texts), "reconstruct": reconstruct}
    if method not in METHODS:
        raise RecipeError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    inputs = {"teacher": _teacher_id(teacher_dir)}
    with artifact.stage("prune", config, inputs, at=out_dir) as st:
        if st.reused:
            log.info("prune: reusing %s (same teacher, target and calibration)", out_dir)
            return out_dir
        started = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(teacher_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = teacher_architecture(model)
        check_carvable(teacher, target)
        importance, kept_layers, rec = None, None, None
        if method == "minitron":
            seq_len = min(CALIB_SEQ_LEN, teacher.max_context)
            batches = calibration_batches(tokenizer, calib_texts, max_tokens, seq_len)
            importance = measure_importance(model, batches)
            kept_layers = kept_units(importance, target)[0].tolist()
            if reconstruct:
                rec = measure_reconstruction(model, batches, target, importance)
        student = prune(model, target, importance, method=method, seed=seed, reconstruction=rec)

        tmp = st.tmp
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not worth_copying(tmp / "tokenizer.model"):  # a GGUF copy, not a tokenizer (see hf.worth_copying)
            (tmp / "tokenizer.model").unlink()
        if (teacher_dir / NOTICE_FILE).is_file():  # the teacher's terms travel with the student
            shutil.copy2(teacher_dir / NOTICE_FILE, tmp / NOTICE_FILE)
        if importance is not None:
            save_file(importance.tensors(), str(tmp / "importance.safetensors"))
        st.metrics = {
            "params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in model.parameters()),
            "kept_layers": kept_layers,
            "block_importance": importance.block.tolist() if importance is not None else None,
            "calibration_tokens": importance.tokens if importance is not None else 0,
            "reconstructed": {"attention_outputs": len(rec.o_gram), "norms": len(rec.norm_ratio)} if rec else None,
            "seconds": round(time.monotonic() - started, 2),
        }
    log.info("prune: wrote %s", out_dir)
    return out_dir


def _teacher_id(teacher_dir: Path) -> str:
    """A content id of the teacher's config and weights: a changed teacher never reuses a stale student."""
    files = [teacher_dir / "config.json", *sorted(teacher_dir.glob("*.safetensors"))]
    missing = [p.name for p in files if not p.is_file()]
    if missing or len(files) == 1:
        raise ModelError(f"{teacher_dir} lacks {', '.join(missing) or '*.safetensors'}; pruning needs a Hugging Face "
                         "folder with config.json and safetensors weights (resolve the teacher first)")
    return artifact.content_id({p.name: artifact.sha256_file(p) for p in files})

