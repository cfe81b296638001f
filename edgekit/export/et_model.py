"""The decoder families edgekit exports, shaped for ExecuTorch: static KV cache, XNNPACK-friendly ops.

Why this module is written by hand (STYLE: say why):

- transformers' own ExecuTorch wrapper (``TorchExportableModuleForDecoderOnlyLM``)
  exports, but its graph splits every layer into ~12 XNNPACK partitions with
  portable kernels in between (GQA ``repeat_kv`` copies of the whole cache,
  mask construction over the full cache, RMSNorm's ``mean``): measured here on
  SmolLM2-135M it decodes at 28 tok/s even with 4-bit weights.
  In non-strict export with torch 2.13 its cache writes are also lost (the
  cache tensors are lifted as constants).
- ``optimum-executorch`` does the same job with ExecuTorch's fused ops, but it
  pins ``transformers==5.0.0rc1`` (the project pins 4.57, see README).
- ExecuTorch's own Llama example model is example code, not a library API.

So this module re-uses the HF model's own ``nn.Linear`` / ``nn.Embedding``
submodules (no weight copy, except that fused projections are split; torchao's
``quantize_`` finds them as usual) and arranges the arithmetic around ExecuTorch's
LLM kernels:

- ``llama::update_cache`` writes K/V in place into ``[1, max_len, kv_heads, head_dim]``
  buffers, and ``llama::custom_sdpa`` attends to positions ``0..start+S`` with
  grouped-query heads natively (no repeated K/V, no mask tensor);
- RoPE's ``rotate_half`` and RMSNorm's mean are written as constant matmuls
  (``F.linear``) so XNNPACK takes them: a dynamic-length slice or a rank-3 mean
  would fall out of the delegate and split the graph;
- the forward signature ``(tokens [1, S], input_pos [1]) -> logits [1, vocab]``
  (last position) is the one ExecuTorch's C++ LLM runner drives.

The families differ only in what a layer does around that core (``check_supported``
refuses the rest in one line):

- llama / mistral: the plain layout (Llama 3.x rope scaling comes with the HF model's
  rotary module, which computes every position's cos/sin);
- qwen2: q/k/v biases (the HF linears carry them); qwen3: RMSNorm of q and k per head;
- phi3: fused ``qkv_proj`` / ``gate_up_proj`` (split into separate linears here) and
  partial rotary (the pass-through dims get cos 1, sin 0); longrope only up to
  ``original_max_position_embeddings`` positions, where HF uses the short factors;
- gemma3 text: RMSNorm of ``x * (1 + w)``, norms after attention and after the MLP too,
  GeGLU with tanh-GELU, the embedding scaled by sqrt(hidden), attention scaled by
  ``query_pre_attn_scalar ** -0.5``, and sliding-window layers with their own RoPE base.

Sliding-window layers keep the full-context cache and pass ``custom_sdpa`` an additive
mask ``[S, max_len]`` (allowed: ``pos - window < k <= pos``); with a mask the kernel
attends over the whole cache, so it costs more than the causal path and is used only
when the context is longer than the window (otherwise the window changes nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import ModelError
from edgekit.export.et_families import ACTIVATION_NAMES, activation_name, check_supported, gemma_norms


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` written out: ExecuTorch 1.5's XNNPACK lowering maps ``aten.gelu`` to
    XNNPACK's erf GELU whatever ``approximate`` says (measured: 4.7e-4 off tanh-GELU), while these ops it
    delegates exactly (1e-6)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


# Activation name (config ``hidden_act`` / ``hidden_activation``) -> the function HF's ACT2FN maps it to.
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": _gelu_tanh}
assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)


class _RMSNorm(nn.Module):
    """RMSNorm with the mean as ``F.linear`` against a constant 1/h row (XNNPACK delegates it).

    ``offset`` 1.0 is Gemma's ``x * (1 + w)`` (the sum is taken once here, in float32 as Gemma does).
    """

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone() + offset, requires_grad=False)
        self.eps = eps
        self.register_buffer("mean_row", torch.full((1, weight.numel()), 1.0 / weight.numel()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = F.linear(x * x, self.mean_row)  # [.., 1]
        return x * torch.rsqrt(ms + self.eps) * self.weight


def _rotate_half_matrix(d: int, rotary_dim: int | None = None) -> torch.Tensor:
    """``R`` with ``x @ R.T == rotate_half(x) == cat(-x[d/2:], x[:d/2])``.

    With ``rotary_dim < d`` (partial rotary) only the first ``rotary_dim`` dims rotate; the rest map to 0.
    """
    r = rotary_dim or d
    half = r // 2
    rot = torch.zeros(d, d)
    rot[torch.arange(half), torch.arange(half) + half] = -1.0
    rot[torch.arange(half) + half, torch.arange(half)] = 1.0
    return rot


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) == x @ rot.T``; x: [1, S, heads, D]."""
    return x * cos + F.linear(x, rot) * sin


def _split_linear(fused: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """``fused``'s output rows as separate linears (XNNPACK and torchao then see plain q/k/v or gate/up)."""
    out, row = [], 0
    for n in sizes:
        lin = nn.Linear(fused.in_features, n, bias=fused.bias is not None)
        lin.weight = nn.Parameter(fused.weight.detach()[row:row + n].clone(), requires_grad=False)
        if fused.bias is not None:
            lin.bias = nn.Parameter(fused.bias.detach()[row:row + n].clone(), requires_grad=False)
        out.append(lin)
        row += n
    if row != fused.out_features:
        raise ModelError(f"a fused projection has {fused.out_features} outputs, not {row}; is config.json right?")
    return out


def _rope_tables(rotary, max_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cos/sin ``[max_len, head_dim]`` from an HF rotary module and the rotated dims; partial rotary (fewer
    dims than ``head_dim``, as Phi-3 applies it) pads the pass-through dims with cos 1, sin 0."""
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(max_len).unsqueeze(0))
    cos, sin = cos[0].float(), sin[0].float()
    rotary_dim = cos.shape[-1]
    if rotary_dim < head_dim:
        pad = head_dim - cos.shape[-1]
        cos = torch.cat([cos, torch.ones(max_len, pad)], dim=-1)
        sin = torch.cat([sin, torch.zeros(max_len, pad)], dim=-1)
    return cos.contiguous(), sin.contiguous(), rotary_dim


class Int8Embedding(nn.Module):
    """Token embedding with int8 rows and one fp32 scale per row, run by ExecuTorch's ``embedding_byte`` kernel.

    Written out rather than left to torchao + ExecuTorch's quant-fusion pass: that pass did not
    rewrite the embedding inside this graph (export then fails with "Missing out variants:
    torchao::dequantize_affine"), while calling the kernel's op directly always lowers.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)

        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("qweight", torch.clamp(torch.round(w / scale[:, None]), -128, 127).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.default(self.qweight, self.scales, None, -128, 127,
                                                                     tokens)


class _Layer(nn.Module):
    def __init__(self, hf_layer, cfg, max_len: int, rotary_dim: int):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if hasattr(attn, "qkv_proj"):  # phi3
            self.q_proj, self.k_proj, self.v_proj = _split_linear(attn.qkv_proj, [q_size, kv_size, kv_size])
        else:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj
        if hasattr(mlp, "gate_up_proj"):  # phi3: gate first, then up
            self.gate_proj, self.up_proj = _split_linear(mlp.gate_up_proj, [cfg.intermediate_size] * 2)
        else:
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.down_proj = mlp.down_proj
        self.act = ACTIVATIONS[cfg.act_name_]
        eps, offset = cfg.rms_norm_eps, cfg.norm_offset_
        self.input_norm = _RMSNorm(hf_layer.input_layernorm.weight, eps, offset)
        # post_norm is the MLP's input norm; Gemma's "sandwich" layers also norm each block's output.
        sandwich = hasattr(hf_layer, "pre_feedforward_layernorm")
        self.attn_out_norm = _RMSNorm(hf_layer.post_attention_layernorm.weight, eps, offset) if sandwich else None
        self.post_norm = _RMSNorm((hf_layer.pre_feedforward_layernorm if sandwich
                                   else hf_layer.post_attention_layernorm).weight, eps, offset)
        self.mlp_out_norm = _RMSNorm(hf_layer.post_feedforward_layernorm.weight, eps, offset) if sandwich else None
        has_qk_norm = hasattr(attn, "q_norm")
        self.q_norm = _RMSNorm(attn.q_norm.weight, eps, offset) if has_qk_norm else None
        self.k_norm = _RMSNorm(attn.k_norm.weight, eps, offset) if has_qk_norm else None
        self.scale = float(getattr(attn, "scaling", None) or 1.0 / (self.head_dim ** 0.5))
        shape = (1, max_len, self.kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        # Each layer owns its [D, D] rotate_half matrix: a constant shared by several XNNPACK partitions
        # would be duplicated per partition anyway (with one log line per copy).
        self.register_buffer("rot", _rotate_half_matrix(self.head_dim, rotary_dim), persistent=False)

    def forward(self, h: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.input_norm(h)
        q = self.q_proj(x).view(1, -1, self.heads, self.head_dim)
        k = self.k_proj(x).view(1, -1, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, -1, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin, self.rot), _rope(k, cos, sin, self.rot)
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        if mask is None:  # causal over 0..start+S
            o = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True, self.scale)
        else:  # the mask [S, max_len] says which cache positions each query sees
            o = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, mask, 0.0, False, self.scale)
        a = self.o_proj(o.reshape(1, -1, self.heads * self.head_dim))
        h = h + (a if self.attn_out_norm is None else self.attn_out_norm(a))
        x = self.post_norm(h)
        m = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return h + (m if self.mlp_out_norm is None else self.mlp_out_norm(m))


def layer_types(cfg) -> list[str]:
    """``"sliding_attention"`` / ``"full_attention"`` per layer, as the HF model masks them."""
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return [kind] * cfg.num_hidden_layers


class StaticDecoder(nn.Module):
    """``forward(tokens [1, S] int64, input_pos [1] int64) -> logits [1, vocab]`` of the last position.

    Calls must be in order (position ``input_pos`` continues the sequence in the cache); a new
    sequence starts again at ``input_pos = 0`` and overwrites the cache.
    """

    def __init__(self, hf_model, max_len: int):
        super().__init__()
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::custom_sdpa / update_cache)

        cfg = hf_model.config
        check_supported(cfg, max_len)
        cfg.head_dim_ = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cfg.act_name_ = activation_name(cfg)
        cfg.norm_offset_ = 1.0 if gemma_norms(cfg) else 0.0
        if max_len > cfg.max_position_embeddings:
            raise ModelError(f"context {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}; lower the export context")
        self.max_len = max_len
        self.model_type = cfg.model_type
        inner = hf_model.model
        emb = inner.embed_tokens
        if hasattr(emb, "embed_scale"):  # Gemma scales the embedding by sqrt(hidden) in the weights' dtype
            self.embed_tokens = nn.Embedding(emb.num_embeddings, emb.embedding_dim)
            self.embed_tokens.weight = emb.weight  # shared: a tied head stays tied
            self.register_buffer("embed_scale", emb.embed_scale.detach().to(emb.weight.dtype).clone(),
                                 persistent=False)
        else:
            self.embed_tokens = emb
            self.embed_scale = None
        self.lm_head = hf_model.lm_head
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        # cos/sin for every cache position from the HF model's own rotary modules (covers rope_scaling);
        # Gemma's sliding layers have their own (rotary_emb_local, another base frequency).
        cos, sin, rotary_dim = _rope_tables(inner.rotary_emb, max_len, cfg.head_dim_)
        self.register_buffer("cos", cos, persistent=False)  # [max_len, D]
        self.register_buffer("sin", sin, persistent=False)
        types = layer_types(cfg)
        window = getattr(cfg, "sliding_window", None)
        # A window at least as long as the context masks nothing: those layers take the causal path.
        self.sliding = [t == "sliding_attention" and bool(window) and window < max_len for t in types]
        self.window = int(window) if any(self.sliding) else 0
        self.local_rope = hasattr(inner, "rotary_emb_local")
        if self.local_rope:
            cos_l, sin_l, _ = _rope_tables(inner.rotary_emb_local, max_len, cfg.head_dim_)
            self.register_buffer("cos_local", cos_l, persistent=False)
            self.register_buffer("sin_local", sin_l, persistent=False)
        self.local = [self.local_rope and t == "sliding_attention" for t in types]
        if self.window:
            self.register_buffer("positions", torch.arange(max_len), persistent=False)
        self.layers = nn.ModuleList(_Layer(layer, cfg, max_len, rotary_dim) for layer in inner.layers)
        self.norm = _RMSNorm(inner.norm.weight, cfg.rms_norm_eps, cfg.norm_offset_)

    def _window_mask(self, start: int, seq: int) -> torch.Tensor:
        """Additive mask [seq, max_len]: query at ``start + i`` sees cache positions ``p`` with
        ``start + i - window < p <= start + i`` (HF's sliding-window causal mask)."""
        dist = self.positions.narrow(0, start, seq).view(-1, 1) - self.positions.view(1, -1)
        seen = (dist >= 0) & (dist < self.window)
        return torch.where(seen, 0.0, torch.finfo(torch.float32).min)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        seq = tokens.shape[1]
        torch._check_is_size(start)
        torch._check(start + seq <= self.max_len)
        h = self.embed_tokens(tokens)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        cos = self.cos.narrow(0, start, seq).view(1, seq, 1, -1)
        sin = self.sin.narrow(0, start, seq).view(1, seq, 1, -1)
        if self.local_rope:
            cos_l = self.cos_local.narrow(0, start, seq).view(1, seq, 1, -1)
            sin_l = self.sin_local.narrow(0, start, seq).view(1, seq, 1, -1)
        mask = self._window_mask(start, seq) if self.window else None
        for layer, sliding, local in zip(self.layers, self.sliding, self.local):
            h = layer(h, start, cos_l if local else cos, sin_l if local else sin, mask if sliding else None)
        last = h[:, -1, :]
        logits = self.lm_head(self.norm(last))
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
