"""Checkpoint directories: what a trained model is on disk.

A checkpoint is a directory that Hugging Face tools can read as it is:

    config.json              the architecture (Hugging Face Llama/Qwen2 field names)
    model.safetensors        the weights (Hugging Face tensor names; a tied lm_head is omitted)
    tokenizer.json           the tokenizer, and tokenizer_config.json with its chat template
    generation_config.json   default sampling settings
    orchard.json             the lineage record: stage, parent, recipe, data, compute, metrics
    training_state.pt        optimizer, schedule and data position (only where a run can resume)

Every write goes to a hidden temporary directory beside the target and is renamed into place
when complete, so a run killed at any moment leaves either the old checkpoint or the new one,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import OrchardError
from .model import CausalLM, ModelConfig
from .tokenizer import Tokenizer

RECORD_FILE = "orchard.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
FINAL_DIR = "final"
STEP_PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    model: CausalLM
    tokenizer: Tokenizer
    record: dict


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def atomic_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` into a fresh temporary directory, then move it to `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for child in tmp.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            # Two renames: a crash between them leaves the old copy under `.old`, which
            # `latest_checkpoint` never picks, and the previous checkpoint step still intact.
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Weights under Hugging Face names, without the tied lm_head (as `transformers` saves them)."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(path: str | Path, model: CausalLM, tokenizer: Tokenizer, record: dict,
                    training_state: dict | None = None) -> Path:
    """Write a complete checkpoint directory atomically; returns its path."""
    path = Path(path)
    config = model.config
    generation_config = {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
        "max_new_tokens": 256,
    }

    def write(tmp: Path) -> None:
        _write_json(tmp / "config.json", config.to_hf_dict())
        state = {k: v.to("cpu") for k, v in model_state_dict(model).items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save(tmp)
        _write_json(tmp / "generation_config.json", generation_config)
        _write_json(tmp / RECORD_FILE, {**record, "weights_sha256": file_sha256(tmp / WEIGHTS_FILE)})
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)

    atomic_directory(path, write)
    return path


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / WEIGHTS_FILE).is_file()


def step_checkpoints(run_dir: Path) -> list[Path]:
    """A run's periodic checkpoints (`step-000100`, ...), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its `final/`, else its latest step)."""
    path = Path(path)
    if not path.exists():
        raise OrchardError(f"{path}: no such checkpoint")
    if is_checkpoint(path):
        return path
    if is_checkpoint(path / FINAL_DIR):
        return path / FINAL_DIR
    steps = step_checkpoints(path)
    if steps:
        return steps[-1]
    raise OrchardError(f"{path}: not a checkpoint (no config.json and {WEIGHTS_FILE})")


def read_record(path: Path) -> dict:
    record_file = path / RECORD_FILE
    if not record_file.is_file():
        return {}
    try:
        return json.loads(record_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OrchardError(f"{record_file}: invalid JSON ({error})") from None


def read_model_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrchardError(f"{config_file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OrchardError(f"{config_file}: invalid JSON ({error})") from None
    try:
        return ModelConfig.from_hf_dict(data)
    except (TypeError, ValueError) as error:
        raise OrchardError(f"{config_file}: {error}") from None


def load_weights(model: CausalLM, weights_file: Path) -> None:
    try:
        state = load_file(weights_file)
    except FileNotFoundError:
        raise OrchardError(f"{weights_file}: no such file") from None
    except (SafetensorError, OSError) as error:
        raise OrchardError(f"{weights_file}: unreadable weights ({error})") from None
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise OrchardError(f"{weights_file}: weights do not match config.json ({what})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise OrchardError(f"{weights_file}: {name} has shape {tuple(tensor.shape)}, "
                               f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def check_tokenizer_matches(tokenizer: Tokenizer, config: ModelConfig, where: Path) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise OrchardError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                           f"vocab_size is {config.vocab_size}: they do not belong together")
    if tokenizer.eos_id != config.eos_token_id:
        raise OrchardError(f"{where}: tokenizer's end-of-text id is {tokenizer.eos_id} but the model's "
                           f"eos_token_id is {config.eos_token_id}: they do not belong together")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load model, tokenizer and lineage record from a checkpoint (or run) directory."""
    path = resolve_checkpoint(path)
    config = read_model_config(path)
    tokenizer = Tokenizer.load(path)
    check_tokenizer_matches(tokenizer, config, path)
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to_empty(device="cpu")
    model.model.rotary.reset()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, path / WEIGHTS_FILE)
    return Checkpoint(path=path, model=model.to(device).eval(), tokenizer=tokenizer, record=read_record(path))
