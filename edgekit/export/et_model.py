"""A Llama-family decoder shaped for ExecuTorch: static KV cache, XNNPACK-friendly ops.

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
submodules (no weight copy; torchao's ``quantize_`` finds them as usual) and
arranges the arithmetic around ExecuTorch's LLM kernels:

- ``llama::update_cache`` writes K/V in place into ``[1, max_len, kv_heads, head_dim]``
  buffers, and ``llama::custom_sdpa`` attends to positions ``0..start+S`` with
  grouped-query heads natively (no repeated K/V, no mask tensor);
- RoPE's ``rotate_half`` and RMSNorm's mean are written as constant matmuls
  (``F.linear``) so XNNPACK takes them: a dynamic-length slice or a rank-3 mean
  would fall out of the delegate and split the graph;
- the forward signature ``(tokens [1, S], input_pos [1]) -> logits [1, vocab]``
  (last position) is the one ExecuTorch's C++ LLM runner drives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.errors import ModelError

# model_type -> extra features this module handles (everything else is plain Llama layout).
SUPPORTED = ("llama", "mistral", "qwen2")


def check_supported(config) -> None:
    """Raise ModelError naming the first feature of ``config`` this module cannot express."""
    mt = getattr(config, "model_type", "?")
    if mt not in SUPPORTED:
        raise ModelError(f"ExecuTorch export handles {', '.join(SUPPORTED)} decoders, not model_type {mt!r}; "
                         "export this model to gguf or onnx instead")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and mt == "mistral":
        raise ModelError(f"model uses sliding-window attention (sliding_window={config.sliding_window}); the "
                         "ExecuTorch exporter has a full-context static cache only; export to gguf instead")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelError(f"hidden_act {config.hidden_act!r} is not supported by the ExecuTorch exporter (silu only)")


class _RMSNorm(nn.Module):
    """RMSNorm with the mean as ``F.linear`` against a constant 1/h row (XNNPACK delegates it)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps
        self.register_buffer("mean_row", torch.full((1, weight.numel()), 1.0 / weight.numel()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = F.linear(x * x, self.mean_row)  # [.., 1]
        return x * torch.rsqrt(ms + self.eps) * self.weight


def _rotate_half_matrix(d: int) -> torch.Tensor:
    """``R`` with ``x @ R.T == rotate_half(x) == cat(-x[d/2:], x[:d/2])``."""
    half = d // 2
    rot = torch.zeros(d, d)
    rot[torch.arange(half), torch.arange(half) + half] = -1.0
    rot[torch.arange(half) + half, torch.arange(half)] = 1.0
    return rot


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) == x @ rot.T``; x: [1, S, heads, D]."""
    return x * cos + F.linear(x, rot) * sin


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
    def __init__(self, hf_layer, cfg, max_len: int):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        eps = cfg.rms_norm_eps
        self.input_norm = _RMSNorm(hf_layer.input_layernorm.weight, eps)
        self.post_norm = _RMSNorm(hf_layer.post_attention_layernorm.weight, eps)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        self.scale = 1.0 / (self.head_dim ** 0.5)
        shape = (1, max_len, self.kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        # Each layer owns its [D, D] rotate_half matrix: a constant shared by several XNNPACK partitions
        # would be duplicated per partition anyway (with one log line per copy).
        self.register_buffer("rot", _rotate_half_matrix(self.head_dim), persistent=False)

    def forward(self, h: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(h)
        q = self.q_proj(x).view(1, -1, self.heads, self.head_dim)
        k = self.k_proj(x).view(1, -1, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(1, -1, self.kv_heads, self.head_dim)
        q, k = _rope(q, cos, sin, self.rot), _rope(k, cos, sin, self.rot)
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        o = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True, self.scale)
        h = h + self.o_proj(o.reshape(1, -1, self.heads * self.head_dim))
        x = self.post_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StaticLlama(nn.Module):
    """``forward(tokens [1, S] int64, input_pos [1] int64) -> logits [1, vocab]`` of the last position.

    Calls must be in order (position ``input_pos`` continues the sequence in the cache); a new
    sequence starts again at ``input_pos = 0`` and overwrites the cache.
    """

    def __init__(self, hf_model, max_len: int):
        super().__init__()
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::custom_sdpa / update_cache)

        cfg = hf_model.config
        check_supported(cfg)
        cfg.head_dim_ = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if max_len > cfg.max_position_embeddings:
            raise ModelError(f"context {max_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}; lower the export context")
        self.max_len = max_len
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.lm_head = hf_model.lm_head
        self.layers = nn.ModuleList(_Layer(layer, cfg, max_len) for layer in inner.layers)
        self.norm = _RMSNorm(inner.norm.weight, cfg.rms_norm_eps)
        # cos/sin for every cache position from the HF model's own rotary module (covers rope_scaling).
        with torch.no_grad():
            pos = torch.arange(max_len).unsqueeze(0)
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        self.register_buffer("cos", cos[0].float().contiguous(), persistent=False)  # [max_len, D]
        self.register_buffer("sin", sin[0].float().contiguous(), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        seq = tokens.shape[1]
        torch._check_is_size(start)
        torch._check(start + seq <= self.max_len)
        h = self.embed_tokens(tokens)
        cos = self.cos.narrow(0, start, seq).view(1, seq, 1, -1)
        sin = self.sin.narrow(0, start, seq).view(1, seq, 1, -1)
        for layer in self.layers:
            h = layer(h, start, cos, sin)
        last = h[:, -1, :]
        return self.lm_head(self.norm(last))
