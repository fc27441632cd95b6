"""The model's architecture, with Hugging Face's Llama/Qwen2 field names.

Field names match `transformers`' `LlamaConfig`/`Qwen2Config`, so an orchard `config.json` reads as
a Hugging Face one and a Hugging Face one reads as ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    """Number of token ids; set from the tokenizer when a run trains one."""
    hidden_size: int = 256
    """Width of the residual stream."""
    intermediate_size: int = 688
    """Width of the SwiGLU MLP's hidden layer (Llama uses about 8/3 of hidden_size)."""
    num_hidden_layers: int = 4
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads per attention layer; head_dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int = 4
    """Key/value heads (grouped-query attention): must divide num_attention_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads (as Llama)."""
    max_position_embeddings: int = 2048
    """Longest sequence the KV cache is sized for."""
    rms_norm_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding's frequencies (Qwen2 uses 1e6)."""
    tie_word_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (True for Qwen2)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"model.num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must divide "
                f"model.hidden_size ({self.hidden_size})")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dimension must be even for rotary embeddings, got {self.resolved_head_dim}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        d, hd = self.hidden_size, self.resolved_head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * d * self.intermediate_size
        per_layer = attention + mlp + 2 * d
        body = self.num_hidden_layers * per_layer + d
        if not include_embeddings:
            return body
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return body + embeddings

    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward plus backward FLOPs per token: 6 per weight that multiplies (the output
        projection included, the embedding lookup not) plus attention's 12 * layers * width * seq_len
        (the PaLM paper's estimate)."""
        matmul_weights = self.num_parameters(include_embeddings=False) + self.vocab_size * self.hidden_size
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.resolved_head_dim * seq_len
        return 6 * matmul_weights + attention

    def to_hf_dict(self) -> dict:
        """The `config.json` content, readable by `transformers` as a Llama (or Qwen2) config."""
        qwen = self.attention_bias
        return {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, data: dict) -> "ModelConfig":
        """Read a `config.json`, ignoring the fields orchard does not use."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        if data.get("model_type") == "qwen2" and "attention_bias" not in data:
            kwargs["attention_bias"] = True  # Qwen2 configs omit it: the bias is implied
        return cls(**kwargs)
