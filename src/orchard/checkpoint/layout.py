"""Where things are in a checkpoint directory, and reading its small files: which directory a path
names (a checkpoint, a run's final or latest step, a Hub id), what kind of checkpoint it is, its
record, config, quantization layout and weights files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import OrchardError
from ..files import file_sha256, read_json
from ..hub import resolve_model_path
from ..model import ModelConfig

RECORD_FILE = "orchard.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TRAINING_STATE_FILE = "training_state.json"
TRAINING_TENSORS_FILE = "training_state.safetensors"
LEGACY_TRAINING_STATE_FILE = "training_state.pt"
ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_SETTINGS_FILE = "adapters.json"
QUANTIZATION_FILE = "quantization.json"
PEFT_DIR = "peft"
FINAL_DIR = "final"
STEP_PREFIX = "step-"
SHARDS_DIR = "shards"
"""Of a step checkpoint of a sharded run: every process's shards of the weights and optimizer state."""


def is_checkpoint(path: Path) -> bool:
    weights = (path / WEIGHTS_FILE).is_file() or (path / WEIGHTS_INDEX_FILE).is_file()
    return ((path / "config.json").is_file() and weights) or is_adapter_checkpoint(path)


def is_adapter_checkpoint(path: Path) -> bool:
    return (path / ADAPTER_WEIGHTS_FILE).is_file() and (path / ADAPTER_SETTINGS_FILE).is_file()


def is_quantized_checkpoint(path: Path) -> bool:
    return (Path(path) / QUANTIZATION_FILE).is_file()


def has_training_state(directory: Path) -> bool:
    return (directory / TRAINING_STATE_FILE).is_file() or (directory / LEGACY_TRAINING_STATE_FILE).is_file()


def step_checkpoints(run_dir: Path) -> list[Path]:
    """A run's periodic checkpoints (`step-000100`, ...), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its `final/`, else its latest step), or a Hugging Face
    Hub model id (its snapshot in the local cache, downloaded if need be)."""
    path = resolve_model_path(path)
    if is_checkpoint(path):
        return path
    if is_checkpoint(path / FINAL_DIR):
        return path / FINAL_DIR
    steps = step_checkpoints(path)
    readable = [step for step in steps if is_checkpoint(step)]
    if readable:
        return readable[-1]
    if steps:
        raise OrchardError(f"{path}: its step checkpoints hold a sharded run's shards, which only resuming the run "
                           f"reads; run its command again to finish it and write final/")
    raise OrchardError(f"{path}: not a checkpoint (no config.json and {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})")


def read_record(path: Path) -> dict:
    record_file = path / RECORD_FILE
    return read_json(record_file) if record_file.is_file() else {}


def read_model_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    data = read_json(config_file)
    try:
        return ModelConfig.from_hf_dict(data)
    except (TypeError, ValueError) as error:
        raise OrchardError(f"{config_file}: {error}") from None


def read_quantization(path: Path) -> dict | None:
    """A checkpoint's quantization.json, or None when it is not quantized."""
    return read_json(path / QUANTIZATION_FILE) if is_quantized_checkpoint(path) else None


def weights_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: `model.safetensors`, or the shards its
    index lists (as `save_pretrained` writes large models)."""
    index_file = path / WEIGHTS_INDEX_FILE
    if (path / WEIGHTS_FILE).is_file() or not index_file.is_file():
        return [path / WEIGHTS_FILE]
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise OrchardError(f"{index_file}: not a safetensors index ({error!r})") from None
    return [path / name for name in sorted(set(weight_map.values()))]


def weights_sha256(path: Path) -> str:
    """The hash of a checkpoint's weights: of `model.safetensors`, or of its shards' hashes."""
    files = weights_files(path)
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (or of one safetensors file), memory-mapped: a
    tensor's bytes are read from disk when first used, and never copied."""
    state = {}
    for weights_file in weights_files(path) if path.is_dir() else [path]:
        try:
            with safe_open(weights_file, framework="pt") as handle:
                state.update((name, handle.get_tensor(name)) for name in handle.keys())
        except FileNotFoundError:
            raise OrchardError(f"{weights_file}: no such file") from None
        except (SafetensorError, OSError) as error:
            raise OrchardError(f"{weights_file}: unreadable weights ({error})") from None
    return state


def inference_only_error(path: Path, purpose: str) -> OrchardError:
    """The one-line refusal to train, export or re-quantize a quantized checkpoint: `purpose` its parent."""
    parent = (read_record(path).get("parent") or {}).get("path")
    source = f"its parent {parent}" if parent else "the checkpoint it was quantized from"
    return OrchardError(f"{path}: a quantized checkpoint is for inference (eval, generate, chat); {purpose} "
                        f"{source}")


def output_beside(source: str | Path, resolved: Path, suffix: str) -> Path:
    """Where a command that derives a checkpoint from `source` (quantize, grow) writes it without
    --out: beside the checkpoint, named NAME{suffix}; for a Hub model, in the working directory, never
    into the Hugging Face cache."""
    if Path(source).exists():
        return resolved.parent / f"{resolved.name}{suffix}"
    return Path(str(source).rstrip("/").rpartition("/")[2] + suffix)


def loaded_paths(path: Path) -> tuple[Path, ...]:
    """The directories that loading the checkpoint `path` reads, which a command's output must never
    replace: the checkpoint, and an adapter checkpoint's base."""
    parent = (read_record(path).get("parent") or {}).get("path") if is_adapter_checkpoint(path) else None
    return (path, Path(parent)) if parent else (path,)
