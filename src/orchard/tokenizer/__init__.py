"""Tokenizer: byte-level BPE trained on the user's corpus, stored in Hugging Face's format."""

from orchard.tokenizer.bpe import CHAT_TEMPLATE, MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

__all__ = ["CHAT_TEMPLATE", "MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "Tokenizer"]
