"""Hugging Face Hub model ids wherever orchard takes a checkpoint path.

`Qwen/Qwen2.5-0.5B` names the snapshot of that repository in the Hugging Face cache, downloaded
first if it is not there. `huggingface_hub` does the work, so the cache is the one `transformers`
shares, and `HF_HUB_OFFLINE=1`, `HF_HUB_CACHE` and `HF_TOKEN` behave as they do everywhere else.
Only what orchard reads is downloaded: configs, safetensors weights, the tokenizer and chat templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import OrchardError

# What `load_checkpoint` reads from a model repository; `pytorch_model.bin` and other formats stay behind.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]

# `org/name`, as the Hub spells repository ids: one slash, no leading dot or dash, no "..".
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not text.endswith(".")


def resolve_model_path(name_or_path: str | Path) -> Path:
    """An existing local path as it is; otherwise the local snapshot directory of the Hub model
    `name_or_path` names. Anything else, or a model that can be neither found in the cache nor
    downloaded, is an OrchardError."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise OrchardError(f"{name}: no such checkpoint")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=DOWNLOAD_PATTERNS))
    except (OSError, ValueError) as error:
        # huggingface_hub's errors (repository not found or gated, offline and not cached, network
        # down) are OSErrors, an invalid id a ValueError; their class names say which, in one line.
        raise OrchardError(f"{name}: not found locally and could not be downloaded from the Hugging Face Hub "
                           f"({type(error).__name__}; offline?)") from None
