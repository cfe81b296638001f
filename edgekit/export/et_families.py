"""Which Hugging Face decoders the ExecuTorch exporter can express, checked from config.json alone.

No torch here: the export refuses an unsupported family or feature in one line before it loads anything.
``edgekit.export.et_model`` builds the program module for what passes.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgekit.errors import ModelError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")
# Activations (config ``hidden_act`` / ``hidden_activation``) et_model computes as HF's ACT2FN does.
ACTIVATION_NAMES = ("silu", "gelu_pytorch_tanh")
GEMMA = ("gemma3_text",)
# Rope types whose frequencies HF switches by sequence length past original_max_position_embeddings.
LENGTH_SWITCHED_ROPE = ("longrope",)


def activation_name(get, model_type: str) -> str:
    return get("hidden_activation") or get("hidden_act") or ("gelu_pytorch_tanh" if model_type in GEMMA else "silu")


def check_supported(config, context: int | None = None) -> None:
    """Raise ModelError naming the first feature of ``config`` (a config.json dict or HF config) this module
    cannot express; ``context`` (the export's positions) checks length-dependent RoPE too."""
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    mt = get("model_type", "?")
    if mt not in SUPPORTED:
        raise ModelError(f"ExecuTorch export handles {', '.join(SUPPORTED)} decoders, not model_type {mt!r}; "
                         "export this model to gguf or onnx instead")
    act = activation_name(get, mt)
    if act not in ACTIVATION_NAMES:
        raise ModelError(f"hidden_act {act!r} is not supported by the ExecuTorch exporter "
                         f"({', '.join(ACTIVATION_NAMES)} only); export to gguf or onnx instead")
    if get("attn_logit_softcapping"):
        raise ModelError(f"attn_logit_softcapping={get('attn_logit_softcapping')} is not supported by ExecuTorch's "
                         "custom_sdpa kernel; export to gguf or onnx instead")
    if get("use_bidirectional_attention"):
        raise ModelError("use_bidirectional_attention makes this an encoder, not a causal decoder; the ExecuTorch "
                         "exporter writes causal LMs only")
    rope = get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    original = get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if rope_type in LENGTH_SWITCHED_ROPE and context is not None and original and context > original:
        raise ModelError(f"{rope_type} RoPE switches from short to long factors past original_max_position_embeddings"
                         f" ({original}) depending on the whole sequence's length, which a static program cannot "
                         f"follow; export with context <= {original}")
