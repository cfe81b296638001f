"""What the ExecuTorch exporter can express of each family in ``edgekit.arch.FAMILIES``, from config.json alone.

No torch here: the export refuses an unsupported family or feature in one line before it loads anything.
``edgekit.export.et_model`` builds the program module for what passes.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgekit.arch import family_of
from edgekit.errors import ModelError

# Activations (config ``hidden_act`` / ``hidden_activation``) et_model computes as HF's ACT2FN does.
ACTIVATION_NAMES = ("silu", "gelu_pytorch_tanh")
# Rope types whose frequencies HF switches by sequence length past original_max_position_embeddings.
LENGTH_SWITCHED_ROPE = ("longrope",)


def _getter(config):
    return config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))


def activation_name(config) -> str:
    """The MLP activation of ``config`` (a config.json dict or HF config); the family's when the config omits it."""
    get = _getter(config)
    return get("hidden_activation") or get("hidden_act") or family_of(get("model_type", "?")).activation


def gemma_norms(config) -> bool:
    """Whether RMSNorm weights are stored as ``w`` for ``x * (1 + w)`` (Gemma)."""
    return family_of(_getter(config)("model_type", "?")).name == "gemma3"


def check_supported(config, context: int | None = None) -> None:
    """Raise ModelError naming the first feature of ``config`` (a config.json dict or HF config) the exporter
    cannot express; ``context`` (the export's positions) checks length-dependent RoPE too."""
    get = _getter(config)
    family_of(get("model_type", "?"))
    act = activation_name(config)
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
