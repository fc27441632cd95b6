"""Rendering chat templates: the Jinja environment transformers uses (a copy of
transformers.utils.chat_template_utils, 5.x), so a template renders identically here and after
export, bounded, because a template comes with a checkpoint from whoever shared it.

`render_chat` is all a tokenizer needs: a template source, the messages and the variables a
template sees. The sandbox is transformers' (no attribute access to break out with, `namespace`
refusing underscore names) with three bounds of ours: `*` and `**` cannot make a value too large,
nothing can be included, imported or extended, and a rendering that passes TEMPLATE_MAX_CHARS of
output or TEMPLATE_MAX_SECONDS of time ends in a one-line error instead of hanging `chat`.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.utils
import numpy as np
from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import OrchardError

# Names a message's reasoning is passed under; chat templates read the first (transformers' aliasing).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat(source: str, messages: list[dict], variables: dict) -> str:
    """Render the template ``source`` for ``messages`` (message keys whose value is None dropped,
    reasoning fields aliased) with the template variables ``variables`` (tools, documents,
    add_generation_prompt, special tokens, ...), every value made plain data first."""
    if not all(isinstance(m, Mapping) for m in messages):
        raise OrchardError("chat template: each message must be a dict with 'role' and 'content'")
    chat = _alias_reasoning(_plain([{k: v for k, v in m.items() if v is not None} for m in messages]))
    template = _compile_template(source)
    try:
        return _render(template, {"messages": chat, **_plain(variables)})
    except jinja2.TemplateNotFound as e:
        raise OrchardError(f"chat template: it includes, imports or extends {e.name!r}; a chat template must be "
                           f"self-contained") from None
    except TemplateError as e:
        raise OrchardError(f"chat template: {e.message}") from None


def _raise_exception(message: str):
    raise OrchardError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: no HTML escaping (Jinja's own tojson escapes <, > and &), json.dumps options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict` as templates see it: calling and fromkeys only, no attribute access to break out with."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` that refuses underscore-prefixed attributes (no reaching CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                                f"but got {name!r}")


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text for transformers'
    assistant-token masks; rendering a string, transformers outputs the body unchanged, and so do we."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


# A chat template comes with a checkpoint, from whoever shared it: its rendering is bounded, so a
# template that loops (or builds a huge string) ends in a one-line error instead of hanging `chat`.
TEMPLATE_MAX_CHARS = 1 << 22
TEMPLATE_MAX_SECONDS = 10.0


class _TemplateTimeout(Exception):
    pass


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with `*` and `**` unable to make a string, list or number too large to
    render, and no loader: `{% include %}`, `{% import %}` and `{% extends %}` find no template."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) \
                        and len(sequence) * count > TEMPLATE_MAX_CHARS:
                    raise SecurityError(f"{operator} would make a value of {len(sequence) * count:,} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise SecurityError(f"exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


@contextmanager
def _time_limit(seconds: float):
    """Raise _TemplateTimeout in the main thread after `seconds` (elsewhere, signals cannot reach the
    work, and only the output bound applies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _render(template, context: dict) -> str:
    """`template.render(**context)`, within TEMPLATE_MAX_CHARS of output and TEMPLATE_MAX_SECONDS."""
    pieces, size = [], 0
    try:
        with _time_limit(TEMPLATE_MAX_SECONDS):
            for piece in template.generate(**context):
                size += len(piece)
                if size > TEMPLATE_MAX_CHARS:
                    raise OrchardError(f"chat template: rendered more than {TEMPLATE_MAX_CHARS:,} characters; "
                                       f"it does not stop")
                pieces.append(piece)
    except _TemplateTimeout:
        raise OrchardError(f"chat template: still rendering after {TEMPLATE_MAX_SECONDS:g} s; it does not stop") from None
    except RecursionError:
        raise OrchardError("chat template: recursion too deep; it does not stop") from None
    return "".join(pieces)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    # transformers' _compile_jinja_template's environment, so templates render identically, bounded.
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols],
                              loader=jinja2.DictLoader({}))
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise OrchardError(f"chat template: line {getattr(e, 'lineno', '?')}: {e.message}") from None


def _plain(value: Any) -> Any:
    """What a template may see: plain JSON-like data (transformers' _plain_template_data), so rich
    objects in the inputs expose no methods to the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Fill `reasoning_content` (and `thinking`) from whichever reasoning field a message uses."""
    aliased = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased
