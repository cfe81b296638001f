"""The shape of a decoder LLM: its family's layout and the sizes the planner and memory model count.

``FAMILIES`` is the one home of what edgekit knows about each model family it supports, keyed by
the Hugging Face ``model_type``. Every stage reads it: resolve refuses a family that is not here
before converting or downloading anything, the planner counts each family's real tensors (biases,
q/k norms, extra norms, fused projections, sliding-window KV), prune and the exporters build the
family's structure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edgekit.errors import ModelError

# Tokens of context when nobody says otherwise: what a student is sized and packaged for, what an
# ExecuTorch program's static cache holds, and what a config without max_position_embeddings is taken
# to have (Llama's own default).
DEFAULT_CONTEXT = 2048


@dataclass(frozen=True)
class Family:
    """What one model family looks like, beyond the sizes in its config."""

    name: str  # edgekit's name (recipes, README table)
    model_types: tuple[str, ...]  # Hugging Face config ``model_type`` values
    gguf_arch: str  # llama.cpp's architecture name (``general.architecture``)
    attn_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3, Gemma 3)
    norms_per_layer: int = 2  # Gemma 3 also normalises after attention and after the MLP: 4
    fused: bool = False  # one qkv projection and one gate_up projection (Phi-3)
    activation: str = "silu"  # gated MLP activation: SwiGLU or GeGLU (gelu_pytorch_tanh)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), not weight (Gemma)
    tokenizer: str = "byte-level BPE"  # what the family's checkpoints usually ship
    note: str = ""
    display: str = ""  # how model cards name it (default: the name)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "llama", display="Llama", note="Llama 2/3.x (llama3 rope scaling), SmolLM/SmolLM2"),
    Family("mistral", ("mistral",), "llama", tokenizer="SentencePiece BPE", display="Mistral", note="Mistral 7B v0.x, Ministral"),
    Family("qwen2", ("qwen2",), "qwen2", attn_bias=True, display="Qwen2", note="Qwen2, Qwen2.5"),
    Family("qwen3", ("qwen3",), "qwen3", qk_norm=True, display="Qwen3", note="Qwen3 dense"),
    Family("gemma3", ("gemma3_text",), "gemma3", qk_norm=True, norms_per_layer=4, activation="gelu_pytorch_tanh",
           embed_scale=True, norm_offset=True, tokenizer="SentencePiece BPE", display="Gemma 3",
           note="Gemma 3 text (270M, 1B)"),
    Family("phi3", ("phi3",), "phi3", fused=True, tokenizer="SentencePiece BPE", display="Phi-3",
           note="Phi-3/3.5-mini, Phi-4-mini"),
)}
MODEL_TYPES: dict[str, Family] = {mt: f for f in FAMILIES.values() for mt in f.model_types}
# model_types that look close to a supported family but are not one, with what to do instead.
_NEAR_MISSES = {
    "gemma3": "this is Gemma 3's multimodal config; use the text-only checkpoint (model_type gemma3_text, "
              "e.g. google/gemma-3-270m or gemma-3-1b)",
    "smollm3": "SmolLM3 skips rope in some layers (NoPE), which edgekit's exporters do not express yet",
}


# (teacher family, student family) pairs a recipe may ask for (``distill.student_family``): the student keeps
# the teacher's tokenizer, rope and sizes, and pruning copies every tensor the student's layout has.
CROSS_FAMILY = {
    ("qwen2", "llama"): "the teacher's q/k/v biases are dropped; distillation learns around them",
    ("qwen3", "llama"): "the teacher's per-head q/k norms are dropped; distillation learns around them",
    ("mistral", "llama"): "the same layout (a Mistral without a sliding window is a Llama)",
    ("llama", "mistral"): "the same layout",
}


def student_family(teacher: Architecture, family: str | None) -> Architecture:
    """``teacher`` as a student of ``family`` (its sizes unchanged), or a ModelError naming the pairs that work."""
    if family is None or family == teacher.family.name:
        return teacher
    if family not in FAMILIES:
        raise ModelError(f"unknown student family {family!r}; choose one of {', '.join(FAMILIES)}")
    why = CROSS_FAMILY.get((teacher.family.name, family))
    if why is None:
        pairs = ", ".join(f"{a} -> {b}" for a, b in CROSS_FAMILY)
        raise ModelError(f"a {family} student cannot be carved from a {teacher.family.name} teacher (the layouts "
                         f"differ in ways pruning cannot bridge); leave distill.student_family unset for a "
                         f"{teacher.family.name} student, or use a pair that works: {pairs}")
    return replace(teacher, model_type=FAMILIES[family].model_types[0], sliding_window=0, sliding_layers=0)


# llama.cpp architecture name -> the family whose HF layout it is (Mistral GGUFs are written as ``llama``).
GGUF_ARCHS = {f.gguf_arch: f for f in reversed(FAMILIES.values())}


def config_from_gguf(md: dict, tensor_names, vocab_size: int | None, source: str) -> dict:
    """An HF-style config dict from a GGUF's metadata (llama.cpp's keys); one ModelError line for a family
    edgekit does not handle. ``vocab_size`` when the caller already knows it (else from the metadata)."""
    a = md.get("general.architecture", "?")
    fam = GGUF_ARCHS.get(a)
    if fam is None:
        raise ModelError(f"{source}: GGUF architecture {a!r} is not supported (edgekit converts and exports "
                         f"{', '.join(sorted(GGUF_ARCHS))} GGUFs); nothing was converted")
    heads = md.get(f"{a}.attention.head_count")
    cfg = {"model_type": fam.model_types[0], "num_hidden_layers": md.get(f"{a}.block_count"),
           "hidden_size": md.get(f"{a}.embedding_length"), "intermediate_size": md.get(f"{a}.feed_forward_length"),
           "num_attention_heads": heads, "num_key_value_heads": md.get(f"{a}.attention.head_count_kv", heads),
           "head_dim": md.get(f"{a}.attention.key_length"),
           "vocab_size": vocab_size or md.get(f"{a}.vocab_size"),
           "tie_word_embeddings": "output.weight" not in set(tensor_names),
           "max_position_embeddings": md.get(f"{a}.context_length"),
           "sliding_window": md.get(f"{a}.attention.sliding_window"),
           "license": md.get("general.license")}
    if a == "gemma3":
        cfg["sliding_window_pattern"] = 6  # llama.cpp's gemma3 graph: every 6th layer is global
    elif a in ("llama", "phi3", "qwen2"):  # llama.cpp applies no window on these graphs (the export records none)
        cfg["sliding_window"] = None
    return cfg


def family_of(model_type: str, source: str = "config.json") -> Family:
    """The family of ``model_type``, or one ModelError line naming the supported ones."""
    fam = MODEL_TYPES.get(model_type)
    if fam is None:
        why = _NEAR_MISSES.get(model_type, "edgekit does not build or export that layout")
        raise ModelError(
            f"{source}: model_type {model_type!r} is not supported ({why}); edgekit handles "
            f"{', '.join(sorted(MODEL_TYPES))} ({', '.join(FAMILIES)} families)"
        )
    return fam


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    max_context: int = DEFAULT_CONTEXT
    model_type: str = "llama"
    # Sliding-window attention: ``sliding_layers`` of the layers see only the last ``sliding_window``
    # positions (Gemma 3: 5 of every 6), so their KV cache need not grow past the window.
    sliding_window: int = 0
    sliding_layers: int = 0

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> Architecture:
        model_type = cfg.get("model_type", "?")
        family_of(model_type, source)
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            window, sliding = _sliding(cfg, layers)
            return cls(
                layers=layers,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gemma3_text")),
                max_context=int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT),
                model_type=model_type,
                sliding_window=window,
                sliding_layers=sliding,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{source} lacks or mangles a required field ({e}); is this a causal LM config?") from e

    def with_shape(self, **changes) -> Architecture:
        if "layers" in changes and self.sliding_layers:
            # the family's pattern continues at the new depth: every layer slides (Mistral v0.1), or every
            # 6th is global (Gemma 3, as llama.cpp's gemma3 graph lays it out)
            n = changes["layers"]
            changes.setdefault("sliding_layers", n if self.sliding_layers == self.layers else n - n // 6)
        return replace(self, **changes)

    @property
    def family(self) -> Family:
        return family_of(self.model_type)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params_norms_per_layer(self) -> int:
        """Weights of the layer's norms, biases and q/k norms (the small 1-D tensors)."""
        fam = self.family
        n = fam.norms_per_layer * self.hidden_size
        if fam.attn_bias:
            n += self.q_dim + 2 * self.kv_dim
        if fam.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def params_per_layer(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        return attn + 3 * h * i + self.params_norms_per_layer

    @property
    def params_embedding(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """Unique parameters (a tied output head is not counted twice)."""
        head = 0 if self.tie_embeddings else self.params_embedding
        return self.params_embedding + head + self.layers * self.params_per_layer + self.hidden_size

    @property
    def params_non_embedding(self) -> int:
        return self.layers * self.params_per_layer + self.hidden_size

    @property
    def embedding_share(self) -> float:
        """Fraction of the parameters in the embedding table and LM head (most of a small 262k-vocab model)."""
        return (self.params - self.params_non_embedding) / self.params

    def kv_positions(self, context: int, window_cells: int | None = None) -> int:
        """Cached positions summed over layers: sliding layers hold ``window_cells`` (default: the
        window) when the runtime caches only the window, global layers the whole context."""
        if not self.sliding_layers or not self.sliding_window:
            return self.layers * context
        window = min(context, window_cells if window_cells is not None else self.sliding_window)
        return (self.layers - self.sliding_layers) * context + self.sliding_layers * window

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = self.params
        d["family"] = self.family.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        """The inverse of :meth:`to_dict` (derived keys such as ``params`` are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _sliding(cfg: dict, layers: int) -> tuple[int, int]:
    """(window, number of sliding layers) from a config's ``sliding_window`` and ``layer_types``."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return 0, 0
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return int(window), sum(1 for t in types if t == "sliding_attention")
    if cfg.get("model_type") == "gemma3_text":  # older configs: every sliding_window_pattern-th layer is global
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return int(window), sum(1 for i in range(layers) if (i + 1) % pattern)
    return int(window), layers  # Mistral v0.1 / Phi-3-mini-4k style: every layer slides
