"""Shared by the safety tests: a tiny corpus, model and settings, and a pickle that proves it ran."""

from __future__ import annotations

from pathlib import Path

from orchard.model import CausalLM, ModelConfig
from orchard.tokenizer import Tokenizer

SENTENCES = ["The quick brown fox jumps over the lazy dog.\n", "Orchards grow apples, pears and plums.\n",
             "敏捷的棕色狐狸跳过了懒狗。\n", "A small model learns the shape of the text it reads.\n"]

TINY_MODEL = ["tokenizer.vocab_size=300", "model.hidden_size=32", "model.intermediate_size=64",
              "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
              "data.seq_len=16", "train.batch_size=2", "train.precision=fp32", "train.progress=false"]
"""Overrides that make `orchard pretrain` train a 2-layer, 32-wide model in seconds."""


class Payload:
    """A pickle that creates `marker` when unpickled: proof that loading a file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_corpus(path: Path) -> Path:
    path.write_text("".join(SENTENCES * 60), encoding="utf-8")
    return path


def tiny_model(tokenizer: Tokenizer, seed: int = 0) -> CausalLM:
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = CausalLM(config)
    model.reset_parameters(seed=seed)
    return model
