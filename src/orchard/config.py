"""Config as data: typed dataclasses, YAML recipes and dotted `key=value` overrides.

Every recipe is a tree of dataclasses whose fields carry defaults and a docstring (the string
literal under the field), which `orchard COMMAND --help` lists. `load_config` reads a YAML recipe,
applies overrides such as `train.max_steps=200` or `model.num_hidden_layers=4`, and checks each
value against its field's type. An unknown key or a bad value is an `OrchardError` naming the full
dotted key, never a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import OrchardError

T = TypeVar("T")


class Duration(float):
    """Seconds, written in recipes as `300`, `90s`, `5m`, `1h30m` or `2h`."""

    _PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")

    @classmethod
    def parse(cls, value: Any) -> "Duration":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            text = str(value).strip().lower().replace(" ", "")
            if re.fullmatch(r"\d+(?:\.\d+)?", text):
                seconds = float(text)
            elif text and re.fullmatch(r"(?:\d+(?:\.\d+)?[hms])+", text):
                seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in cls._PART.findall(text))
            else:
                raise ValueError(f"expected a duration such as 300, 90s, 5m or 1h30m, got {value!r}")
        if seconds <= 0:
            raise ValueError(f"expected a positive duration, got {value!r}")
        return cls(seconds)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (they are not kept at run time)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def reading_order(cls: type) -> list[dataclasses.Field]:
    """A config's fields as a reader wants them: its values first (in declaration order), then its
    sections, its own before those it inherits (`data` before a method config's `peft` and `train`)."""
    hints = _type_hints(cls)
    classes = [klass for klass in cls.__mro__ if dataclasses.is_dataclass(klass)]

    def key(f: dataclasses.Field) -> tuple[bool, int]:
        if not dataclasses.is_dataclass(hints[f.name]):
            return False, 0
        return True, max(i for i, klass in enumerate(classes) if f.name in klass.__dataclass_fields__)

    return sorted(dataclasses.fields(cls), key=key)


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "Duration": "a duration"}.get(tp.__name__, tp.__name__)
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where the meaning is unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise OrchardError(f"{key}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except OrchardError as error:
                errors.append(error)
        raise OrchardError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise OrchardError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and typing.get_origin(item) is typing.Literal:
            # Names from a fixed set hold no commas, so a list of them may be written a,b (or one name).
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise OrchardError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Duration:
        try:
            return Duration.parse(value)
        except ValueError as error:
            raise OrchardError(f"{key}: {error}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise OrchardError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads 3e-3 and 1e6 (no decimal point) as strings.
        try:
            value = float(value)
        except ValueError:
            raise OrchardError(f"{key}: expected {_type_name(tp)}, got {value!r}") from None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise OrchardError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise OrchardError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise OrchardError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    return value


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Make a `cls` from a nested dict, rejecting unknown keys and checking every value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OrchardError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for f in dataclasses.fields(cls):
        # A section set only in part keeps the other values of its parent's default, e.g. a method's
        # own TrainConfig(lr=1e-5, ...) when a recipe sets only train.max_steps.
        if isinstance(data.get(f.name), dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                section, base = data[f.name], to_dict(default)
                # A default that only stands in for a choice the section makes another way yields to
                # it (a method's default max_steps, when the recipe sets max_time).
                for name, others in getattr(type(default), "DEFAULTS_YIELD_TO", {}).items():
                    if name not in section and any(other in section for other in others):
                        base[name] = None
                data = {**data, f.name: _merged(base, section)}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = [n for n in sorted(names) if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise OrchardError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ValueError as error:
        message = str(error)
        raise OrchardError(message if "." in message.split(":")[0] else f"{prefix or 'config'}: {message}") from None


def _merged(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merged(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(value, dict) \
            else value
    return merged


def to_dict(config: Any) -> Any:
    """The plain-data form of a config (what a checkpoint's lineage records)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in reading_order(type(config))}
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    if isinstance(config, Duration):
        return float(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=200` -> (["train", "max_steps"], 200); the value is read as YAML."""
    if "=" not in text:
        raise OrchardError(f"{text}: an override is written key=value, e.g. train.max_steps=200")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise OrchardError(f"{text}: an override is written key=value, e.g. train.max_steps=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise OrchardError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise OrchardError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    except UnicodeDecodeError:
        raise OrchardError(f"{path}: invalid UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OrchardError(f"{path}: a recipe is a mapping of keys to values")
    return data


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from defaults, then the recipe file, then `key=value` overrides, in that order."""
    data = read_yaml(recipe) if recipe else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[keys[-1]] = value
    return build(cls, data)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field of a config tree, for `--help`.

    `defaults` is the instance a parent's default_factory makes (e.g. `TrainConfig(max_steps=1000)`),
    whose values override the class defaults."""
    rows = []
    docs = field_docs(cls)
    hints = _type_hints(cls)
    for f in reading_order(cls):
        key = f"{prefix}{f.name}"
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key + ".", default if dataclasses.is_dataclass(default) else None))
            continue
        rows.append((key, repr(default) if isinstance(default, str) else str(default), docs.get(f.name, "")))
    return rows


def import_callable(source: str, key: str):
    """The callable a recipe names as ``module:attribute`` (a module importable from the working
    directory too, as `python -m` would find one beside the recipe); a one-line error naming
    ``key`` otherwise."""
    module_name, _, attribute = source.partition(":")
    if sys.path[0] != "":
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise OrchardError(f"{key}: cannot import {module_name!r} for {source!r} ({error})") from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise OrchardError(f"{key}: {module_name} has no function {attribute!r}")
    return found
