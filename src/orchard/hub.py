"""Hugging Face Hub model ids wherever orchard takes a checkpoint path.

`hf:Qwen/Qwen2.5-0.5B` names the snapshot of that repository in the Hugging Face cache, downloaded
first if it is not there. The prefix is required: without it every argument is a local path, so a
mistyped `runs/typo` is an error naming it, never a download of a repository that happens to be
called that. `huggingface_hub` does the work, so the cache is the one `transformers`
shares, and `HF_HUB_OFFLINE=1`, `HF_HUB_CACHE` and `HF_TOKEN` behave as they do everywhere else.
Only what orchard reads is downloaded: configs, safetensors weights, the tokenizer and chat templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import OrchardError

# What `load_checkpoint` reads from a model repository; `pytorch_model.bin` and other formats stay behind.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]

# `org/name`, as the Hub spells repository ids: one slash, no leading dot or dash, no "..".
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


HUB_PREFIX = "hf:"


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not text.endswith(".")


def snapshot_repo_id(path: str | Path) -> str | None:
    """The Hub id of a snapshot directory in the Hugging Face cache
    (`.../models--ORG--NAME/snapshots/REV`), else None. The Hub allows no "--" in ids, so the
    folder's name reads back unambiguously."""
    snapshot = Path(path)
    repo = snapshot.parent.parent.name
    if snapshot.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/")


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local path, which must exist; or, for `hf:ORG/NAME`, the local snapshot directory of that
    Hub model. A missing path, a malformed id, or a model that can be neither found in the cache nor
    downloaded is an OrchardError."""
    text = str(name_or_path)
    if not text.startswith(HUB_PREFIX):
        path = Path(name_or_path)
        if path.exists():
            return path
        hint = f" (for the Hugging Face Hub model, write {HUB_PREFIX}{text})" if is_hub_id(text) else ""
        raise OrchardError(f"{text}: no such checkpoint{hint}")
    name = text[len(HUB_PREFIX):]
    if not is_hub_id(name):
        raise OrchardError(f"{text}: not a Hugging Face Hub model id (hf:ORG/NAME)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=DOWNLOAD_PATTERNS))
    except (OSError, ValueError) as error:
        # huggingface_hub's errors (repository not found or gated, offline and not cached, network
        # down) are OSErrors, an invalid id a ValueError; their class names say which, in one line.
        raise OrchardError(f"{text}: not in the Hugging Face cache and could not be downloaded from the Hub "
                           f"({type(error).__name__}; offline?)") from None
