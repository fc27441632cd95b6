"""Orchard checkpoints as plain Hugging Face model directories.

An orchard checkpoint is nearly one already (Hugging Face tensor and config field names, a
tokenizer.json); `export_hf` makes the rest exact, so that stock `transformers` loads it with
`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`: no custom code,
no warnings about missing or unexpected weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import (RECORD_FILE, WEIGHTS_INDEX_FILE, checked_weights, is_adapter_checkpoint, load_merged,
                          loaded_paths, read_model_config, read_record, resolve_checkpoint, save_checkpoint,
                          weights_files)
from ..files import atomic_directory, check_output, copy_regular_file, write_json
from ..lineage.catalog import record_written
from ..lineage.card import write_model_card
from ..lineage.record import parent_entry
from ..model import CausalLM

# Copied as they are when present (regular files only: never through a link that leaves the
# checkpoint). The lineage record goes along too, since transformers ignores files it does not
# know, with the export noted in it; the training state (the optimizer) stays behind.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "generation_config.json")


def export_note(source: Path, fmt: str) -> dict:
    """What an exported copy records of its making, so that exporting the same checkpoint again may
    replace it (and nothing else)."""
    return {"format": fmt, "source": parent_entry(source)}


def same_export(note: dict | None, source: Path, fmt: str) -> bool:
    """Whether `note` records an export in `fmt` of the checkpoint at `source` (whose weights may have
    changed since)."""
    return isinstance(note, dict) and note.get("format") == fmt and \
        (note.get("source") or {}).get("path") == str(source.resolve())


def export_hf(checkpoint_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """Write the checkpoint (or run's final checkpoint) `checkpoint_dir` to `out_dir` as a Hugging
    Face model directory, atomically; returns `out_dir`. An existing `out_dir` is replaced only when
    it is an earlier export of the same checkpoint (or with `force`), never when it holds the source."""
    source = resolve_checkpoint(checkpoint_dir)
    out_dir = Path(out_dir)
    note = export_note(source, "hf")
    check_output(out_dir, "--out", "export", owned=lambda target: same_export(read_record(target).get("export"),
                                                                                 source, "hf"),
                 inputs=loaded_paths(source), force=force)
    if is_adapter_checkpoint(source):
        return _export_merged(source, out_dir, note)
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
            copy_regular_file(source, name, tmp)
        write_json(tmp / RECORD_FILE, {**read_record(source), "export": note})
        write_model_card(tmp, out_dir, config)

    atomic_directory(out_dir, write)
    record_written(out_dir)
    return out_dir


def _export_merged(source: Path, out_dir: Path, note: dict) -> Path:
    """An adapter checkpoint is exported as its base with the adapter merged in: a plain model that
    any tool runs (the adapter alone, in PEFT's format, is in the checkpoint's `peft/` folder)."""
    checkpoint = load_merged(source)
    save_checkpoint(out_dir, checkpoint.model, checkpoint.tokenizer, {**checkpoint.record, "export": note})
    return out_dir
