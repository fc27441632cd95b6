"""The state of a resumable step checkpoint: counters, optimizer and RNG state as
`training_state.json` plus one `training_state.safetensors` for the tensors. Formats that hold data
only, so a training state planted in a shared run directory cannot run code when resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import OrchardError
from ..files import read_json, write_json
from .layout import LEGACY_TRAINING_STATE_FILE, TRAINING_STATE_FILE, TRAINING_TENSORS_FILE, read_weights



def write_training_state(directory: Path, state: dict) -> None:
    """A resumable run's state (nested dicts, lists and tuples of numbers, strings and tensors, as an
    optimizer's state_dict is) as JSON plus one safetensors file for the tensors: formats that hold
    data only, so a training state planted in a shared run directory cannot run code when resumed."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
            return {"tensor": key}
        if isinstance(value, dict):
            return {"dict": [[k, encode(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {type(value).__name__: [encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"training state {key}: cannot store a {type(value).__name__}")

    document = encode(state, "state")
    save_file(tensors, directory / TRAINING_TENSORS_FILE, metadata={"format": "pt"})
    write_json(directory / TRAINING_STATE_FILE, document)


def read_training_state(directory: Path, device: str | torch.device = "cpu") -> dict:
    """What `write_training_state` wrote; anything else (a missing or truncated file, a pickle left
    by an older orchard) is a one-line error naming the file."""
    if (directory / LEGACY_TRAINING_STATE_FILE).is_file() and not (directory / TRAINING_STATE_FILE).is_file():
        raise OrchardError(f"{directory / LEGACY_TRAINING_STATE_FILE}: a pickle written by an earlier orchard, which "
                           f"orchard does not load since a pickle can run code")
    document = read_json(directory / TRAINING_STATE_FILE)
    tensors = read_weights(directory / TRAINING_TENSORS_FILE)
    where = directory / TRAINING_STATE_FILE

    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            raise OrchardError(f"{where}: not a training state written by orchard")
        (kind, content), = value.items()
        try:
            if kind == "tensor":
                return tensors[content].to(device)
            if kind == "dict":
                return {k: decode(v) for k, v in content}
            if kind == "list":
                return [decode(v) for v in content]
            if kind == "tuple":
                return tuple(decode(v) for v in content)
        except (KeyError, TypeError, ValueError) as error:
            raise OrchardError(f"{where}: does not match {TRAINING_TENSORS_FILE} ({error!r})") from None
        raise OrchardError(f"{where}: not a training state written by orchard (unknown entry {kind!r})")

    state = decode(document)
    if not isinstance(state, dict):
        raise OrchardError(f"{where}: not a training state written by orchard")
    return state
