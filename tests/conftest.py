"""Fixtures every test file uses."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# The catalog of checkpoints (orchard.lineage.catalog) goes to a folder of the session's, never the
# user's: session fixtures write checkpoints before any per-test setting applies.
os.environ["ORCHARD_HOME"] = tempfile.mkdtemp(prefix="orchard-home-")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Token caches, the built-in corpus and the catalog go to the test's own directory, never
    ~/.cache or ~/.local/share."""
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "home"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tests use tiny models: their matmuls gain nothing from threads, and on a busy machine
    # waiting for the other thread costs a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a tiny chat checkpoint shared by the alignment tests (test_dpo, test_reward_model, test_grpo, test_rewards)


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory):
    """A tiny, untrained chat checkpoint and small preference files, built once per session.

    `dir`: a byte-level BPE tokenizer (vocabulary 400, the ChatML template with `<|im_end|>`)
    trained on the built-in world's conversations, and a 2-layer, 32-wide model initialised with
    seed 0. `pairs` / `val_pairs`: 48 training and 16 held-out built-in preference pairs as JSONL,
    so a run need not tokenise and score all 336 built-in held-out pairs.
    """
    from types import SimpleNamespace

    from orchard.checkpoint import save_checkpoint
    from orchard.data.synthetic import World, instruction_conversations, write_preference_corpus
    from orchard.model import CausalLM, ModelConfig
    from orchard.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("chat-base")
    world = World()
    texts = [message["content"] for conversation in instruction_conversations(world, "train", num_conversations=400)
             for message in conversation["messages"]]
    tokenizer = Tokenizer.train(iter(texts), vocab_size=400)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = CausalLM(config)
    model.reset_parameters(seed=0)
    save_checkpoint(root / "base", model, tokenizer, record={"stage": "test"})
    return SimpleNamespace(dir=root / "base",
                           pairs=write_preference_corpus(root / "pairs.jsonl", world, "train", num_pairs=48),
                           val_pairs=write_preference_corpus(root / "val_pairs.jsonl", world, "held_out",
                                                             num_pairs=16))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module of reward functions into the working directory; returns its (unique) name."""
    import sys
    import uuid

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # Rewards puts "" first; undone after the test
    names = []

    def write(source: str) -> str:
        name = f"user_rewards_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
