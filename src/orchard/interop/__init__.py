"""Interoperability: Hugging Face checkpoints in and out, PEFT adapters, GGUF for llama.cpp."""
