"""Reading the files of a Hugging Face tokenizer directory besides ``tokenizer.json``: its
``tokenizer_config.json``, the legacy ``special_tokens_map.json`` and the chat template wherever
transformers keeps it (``chat_template.jinja``, ``additional_chat_templates/``, the config's
``chat_template`` as a string or a list of named templates, ``chat_template.json``).

Every file is read through `contained_file` (no symlink out of the directory) and every problem is
an `OrchardError` naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import OrchardError
from ..files import contained_file

# Files besides tokenizer.json that transformers reads (names as in transformers.utils.hub).
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"


def read_text(path: Path) -> str:
    """A UTF-8 file's text; anything else is one line naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OrchardError(f"{path}: not UTF-8 text") from None


def read_json(path: Path) -> Any:
    """A JSON file's value; invalid JSON is one line naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise OrchardError(f"{path}: invalid JSON ({e})") from None


def token_text(value: Any, where: str) -> str | None:
    """A special token as configs write it: a string, null, or an AddedToken dict ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise OrchardError(f"{where}: expected a token string or {{\"content\": ...}}, got {json.dumps(value)[:80]}")


def _named_templates(value: Any, where: str) -> str | dict[str, str] | None:
    """A chat template entry: a string, a list of {"name", "template"} or a {name: template} dict."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        templates = {}
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise OrchardError(f"{where}: each named chat template needs a \"name\" and a \"template\" string")
            templates[item["name"]] = item["template"]
        return templates
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise OrchardError(f"{where}: expected a template string or a list of named templates")


def read_chat_templates(directory: Path, config: dict) -> str | dict[str, str] | None:
    """The directory's chat template: one source, {name: source} for named templates, or None."""
    # As transformers: template files win over the config entry; chat_template.json (the processor
    # file) is read last, for checkpoints that keep their template only there.
    files = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = read_text(contained_file(directory, CHAT_TEMPLATE_FILE))
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[file.name.removesuffix(".jinja")] = read_text(contained_file(directory,
                                                                                f"{CHAT_TEMPLATE_DIR}/{file.name}"))
    if files:
        return files["default"] if list(files) == ["default"] else files
    found = _named_templates(config.get("chat_template"), f"{directory / CONFIG_FILE}: chat_template")
    if found is None and (directory / LEGACY_CHAT_TEMPLATE_FILE).is_file():
        legacy_file = contained_file(directory, LEGACY_CHAT_TEMPLATE_FILE)
        legacy = read_json(legacy_file)
        if not isinstance(legacy, dict):
            raise OrchardError(f"{legacy_file}: expected a JSON object with a \"chat_template\" key")
        found = _named_templates(legacy.get("chat_template"), f"{legacy_file}: chat_template")
    return found
