"""The model: architecture config, the transformer, and sampling from it. Imports no training code."""

from .config import ModelConfig
from .transformer import CausalLM, KVCache, ModelOutput

__all__ = ["CausalLM", "KVCache", "ModelConfig", "ModelOutput"]
