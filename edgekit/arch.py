"""The shape of a Llama-family decoder: what the planner sizes and the memory model counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edgekit.errors import ModelError

# Architectures whose tensors follow the Llama layout (q/k/v/o + gated MLP, RMSNorm).
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2"}
# Tokens of context when nobody says otherwise: what a student is sized and packaged for, what an
# ExecuTorch program's static cache holds, and what a config without max_position_embeddings is taken
# to have (Llama's own default).
DEFAULT_CONTEXT = 2048


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

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> Architecture:
        model_type = cfg.get("model_type", "?")
        if model_type not in LLAMA_FAMILY:
            raise ModelError(
                f"{source}: model_type {model_type!r} is not supported yet; edgekit handles Llama-family "
                f"decoders ({', '.join(sorted(LLAMA_FAMILY))})"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_context=int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT),
                model_type=model_type,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{source} lacks or mangles a required field ({e}); is this a causal LM config?") from e

    def with_shape(self, **changes) -> Architecture:
        return replace(self, **changes)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        return attn + 3 * h * i + 2 * h  # + two RMSNorm weights

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = self.params
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        """The inverse of :meth:`to_dict` (derived keys such as ``params`` are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
