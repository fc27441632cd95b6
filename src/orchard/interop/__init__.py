"""Exporters: a checkpoint as a Hugging Face model directory (`export`) or a GGUF file for llama.cpp (`gguf`)."""
