"""The model's architecture, with Hugging Face's Llama/Qwen2/Qwen3 field names.

Field names match `transformers`' `LlamaConfig`/`Qwen2Config`/`Qwen3Config`, so an orchard
`config.json` reads as a Hugging Face one and a Hugging Face one (Llama, Qwen2, Qwen3, or Mistral
without a sliding window) reads as ours. Anything in a Hugging Face config that would make the model
compute something orchard does not is rejected by name rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

# Hugging Face model types whose computation orchard reproduces, and the class transformers loads for each.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}

# Rotary scalings orchard implements, with the keys each needs besides rope_type.
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

# What transformers assumes when a config.json leaves these out, where that differs from orchard's defaults.
_HF_DEFAULTS = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


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
    rope_scaling: dict | None = None
    """Stretching of the rotary frequencies for longer contexts: null, {rope_type: linear, factor: F} or
    Llama 3.1's {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    tie_word_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (True for Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before the rotation (True for Qwen3)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    """End-of-text id; Hugging Face models may list several (Llama 3 instruct) or none."""
    pad_token_id: int | None = 2
    num_labels: int = 0
    """Outputs of a linear `score` head on the final hidden states (transformers'
    ...ForSequenceClassification): 1 for a reward model or a value head, 0 for a plain language model."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_labels < 0:
            raise ValueError(f"model.num_labels must not be negative, got {self.num_labels}")
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
        if self.qk_norm and self.attention_bias:
            # Qwen3, the one architecture with q/k norms, puts a bias on o_proj too when it has biases.
            raise ValueError("model.qk_norm with model.attention_bias is not supported")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"model.rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") == "default":
            self.rope_scaling = None  # plain rotary embeddings, spelled the way Hugging Face configs do
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_SCALING_KEYS:
                raise ValueError(f"model.rope_scaling: rope type {kind!r} is not supported "
                                 f"(only default, {', '.join(ROPE_SCALING_KEYS)})")
            missing = [key for key in ROPE_SCALING_KEYS[kind] if key not in self.rope_scaling]
            if missing:
                raise ValueError(f"model.rope_scaling: rope type {kind!r} needs {', '.join(missing)}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (no model needed)."""
        d, hd = self.hidden_size, self.resolved_head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0) \
            + (2 * hd if self.qk_norm else 0)
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

    @property
    def model_type(self) -> str:
        """The Hugging Face architecture that computes what this config does."""
        return "qwen3" if self.qk_norm else "qwen2" if self.attention_bias else "llama"

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The `config.json` content, readable by `transformers` as a Llama, Qwen2 or Qwen3 config.

        transformers 5 reads the rotary settings from `rope_parameters`; `rope_theta` and
        `rope_scaling` are written too, in agreement, for readers that predate it (transformers 4,
        llama.cpp's converter). `dtype` names the dtype of the weights file.
        """
        model_type = self.model_type
        architectures = [ARCHITECTURES[model_type]]
        if self.num_labels:
            architectures.append(ARCHITECTURES[model_type].replace("CausalLM", "SequenceClassification"))
        return {
            "architectures": architectures,
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,  # a copy: readers may add to it
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "use_cache": True,
            **({"num_labels": self.num_labels} if self.num_labels else {}),
        }

    @classmethod
    def from_hf_dict(cls, data: dict) -> "ModelConfig":
        """Read a `config.json` (orchard's or a Hugging Face model's), ignoring the fields that do not
        change what the model computes; raises ValueError naming any that would."""
        model_type = data.get("model_type", "llama")
        _check_supported(model_type, data)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {**_HF_DEFAULTS, **{k: v for k, v in data.items() if k in known}}
        # transformers gives every config a num_labels; only a sequence classifier has the head.
        classifier = any(a.endswith("ForSequenceClassification") for a in data.get("architectures") or [])
        kwargs["num_labels"] = int(data.get("num_labels", 1)) if classifier else 0
        if kwargs.get("num_key_value_heads") is None:  # older Llama configs: one key/value head per query head
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        kwargs["qk_norm"] = model_type == "qwen3"
        if model_type == "qwen2":
            kwargs["attention_bias"] = True  # Qwen2 always has q/k/v biases; its configs omit the field
        # transformers 5 writes `rope_parameters` (theta included); older configs `rope_theta` and
        # `rope_scaling`. transformers lets `rope_scaling` win where both are present, and so do we.
        rope = dict(data.get("rope_scaling") or data.get("rope_parameters") or {})
        kwargs["rope_theta"] = float(rope.pop("rope_theta", data.get("rope_theta", 10000.0)))
        partial = rope.pop("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} is not supported")
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if kind == "llama3":  # as transformers: the pretraining context defaults to the model's
            context = kwargs.get("max_position_embeddings", cls.max_position_embeddings)
            rope.setdefault("original_max_position_embeddings", data.get("original_max_position_embeddings", context))
        kwargs["rope_scaling"] = {"rope_type": kind, **rope}
        return cls(**kwargs)


def _check_supported(model_type: str, data: dict) -> None:
    """Raise ValueError naming the first thing in a Hugging Face config that orchard would not compute."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported (only {', '.join(ARCHITECTURES)})")
    if data.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={data['hidden_act']} is not supported (only silu)")
    if data.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if model_type in ("llama", "mistral", "qwen3") and data.get("attention_bias"):
        # These put a bias on o_proj as well, which orchard's attention does not have.
        raise ValueError(f"attention_bias=true is not supported for model_type {model_type!r}")
    # Mistral slides its window whenever it has one; Qwen only when use_sliding_window says so.
    window = data.get("sliding_window", 4096 if model_type == "mistral" else None)
    if model_type in ("qwen2", "qwen3") and not data.get("use_sliding_window"):
        window = None
    # A window as long as the context never slides.
    if window is not None and window < data.get("max_position_embeddings", ModelConfig.max_position_embeddings):
        raise ValueError(f"sliding_window={window} is not supported")
