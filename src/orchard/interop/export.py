"""Orchard checkpoints as plain Hugging Face model directories.

An orchard checkpoint is nearly one already (Hugging Face tensor and config field names, a
tokenizer.json); `export_hf` makes the rest exact, so that stock `transformers` loads it with
`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`: no custom code,
no warnings about missing or unexpected weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..checkpoint import (RECORD_FILE, WEIGHTS_INDEX_FILE, atomic_directory, checked_weights, is_adapter_checkpoint,
                          load_merged, read_model_config, resolve_checkpoint, save_checkpoint, weights_files, write_json)
from ..model import CausalLM

# Copied as they are when present. orchard.json (the lineage) goes along, since transformers ignores
# files it does not know; training_state.pt (the optimizer) stays behind.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json", RECORD_FILE)


def export_hf(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Write the checkpoint (or run's final checkpoint) `checkpoint_dir` to `out_dir` as a Hugging
    Face model directory, atomically; returns `out_dir`."""
    source = resolve_checkpoint(checkpoint_dir)
    if is_adapter_checkpoint(source):
        return _export_merged(source, Path(out_dir))
    config = read_model_config(source)
    with torch.device("meta"):
        model = CausalLM(config)
    # Checks names and shapes before anything is written; the tensors' bytes are never read.
    state = checked_weights(model, source)
    dtype = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    files = weights_files(source)
    if len(files) > 1:
        files.append(source / WEIGHTS_INDEX_FILE)

    def write(tmp: Path) -> None:
        # Rewritten rather than copied: transformers reads the dtype and the rotary settings from it.
        write_json(tmp / "config.json", config.to_hf_dict(dtype))
        for name in [f.name for f in files] + [name for name in COPIED_FILES if (source / name).is_file()]:
            shutil.copyfile(source / name, tmp / name)

    out_dir = Path(out_dir)
    atomic_directory(out_dir, write)
    return out_dir


def _export_merged(source: Path, out_dir: Path) -> Path:
    """An adapter checkpoint is exported as its base with the adapter merged in: a plain model that
    any tool runs (the adapter alone, in PEFT's format, is in the checkpoint's `peft/` folder)."""
    checkpoint = load_merged(source)
    save_checkpoint(out_dir, checkpoint.model, checkpoint.tokenizer, checkpoint.record)
    return out_dir
