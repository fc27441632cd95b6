"""Tool calls in conversations: Qwen2.5's (Hermes') format, which orchard's ChatML template renders.

An assistant message that calls tools carries them as OpenAI's ``tool_calls``::

    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "calculator",
                                                      "arguments": {"expression": "37 + 45"}}}]}

and the template renders (and the model writes) each call as JSON between tags after the content::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "37 + 45"}}
    </tool_call>

A tool's result comes back as ``{"role": "tool", "content": "82"}`` (optionally with the
``tool_call_id`` or ``name`` it answers), rendered as a user turn of ``<tool_response>`` blocks.
The tools on offer are JSON schemas (``{"type": "function", "function": {"name", "description",
"parameters"}}``) given to the template, which lists them in the system turn.

`reply_text` is the text the model generates for an assistant message, `parse_reply` its inverse
(what the server and the RL environments read back from a generation), `content_end` how much of
a reply being streamed is surely content, and `checked_tool_calls` / `checked_tools` the
validation the data readers and the server share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .records import BadRecord, json_type

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_OPEN = "<tool_call>"


def call_block(name: str, arguments: dict) -> str:
    """One call as the template renders it (transformers' ``tojson``: json.dumps with its defaults
    and ``ensure_ascii=False``)."""
    return f'{_OPEN}\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n</tool_call>'


def function_of(call: dict) -> dict:
    """The ``{"name", "arguments"}`` of an OpenAI tool call (``{"function": {...}}``) or a bare one."""
    return call["function"] if isinstance(call.get("function"), dict) else call


def reply_text(message: dict) -> str:
    """What the model generates for an assistant ``message`` after the generation prompt: its
    content, then one block per tool call, as the template renders them."""
    content = message.get("content") or ""
    calls = [call_block(function_of(c)["name"], function_of(c)["arguments"]) for c in message.get("tool_calls") or []]
    if not calls:
        return content
    return (content + "\n" if content else "") + "\n".join(calls)


@dataclass
class ToolCall:
    name: str
    arguments: dict

    def as_openai(self, call_id: str) -> dict:
        """The call as an OpenAI chat message's ``tool_calls`` item (arguments as a JSON string)."""
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ParsedReply:
    content: str
    """The reply's text before its first tool call (all of it when it calls none)."""
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """One line per malformed call (not JSON, no name, arguments not an object), in order."""

    def message(self) -> dict:
        """The reply as an assistant message (tool calls with dict arguments, as the template takes)."""
        message = {"role": "assistant", "content": self.content}
        if self.calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in self.calls]
        return message


def parse_reply(text: str) -> ParsedReply:
    """The content and tool calls of a generated reply. Each ``<tool_call>...</tool_call>`` block
    must hold ``{"name": str, "arguments": object}`` (arguments may also be a JSON string of an
    object, as OpenAI sends them); anything else is an error line, never an exception. An opening
    tag that is never closed (a reply cut by the length limit) is an error too."""
    start = text.find(_OPEN)
    if start < 0:
        return ParsedReply(text.strip())
    reply = ParsedReply(text[:start].strip())
    for match in _CALL.finditer(text, start):
        try:
            reply.calls.append(_call(json.loads(match.group(1))))
        except (json.JSONDecodeError, ValueError) as e:
            reply.errors.append(f"malformed tool call: {e}")
    if text.count(_OPEN) > len(_CALL.findall(text, start)):
        reply.errors.append("malformed tool call: <tool_call> is never closed by </tool_call>")
    return reply


def content_end(text: str) -> int:
    """How much of a reply still being generated is surely content: up to its first ``<tool_call>``,
    or else up to a tail that may be the start of one, less the whitespace before it (which
    `parse_reply` strips from the content of a reply that calls tools)."""
    start = text.find(_OPEN)
    if start < 0:
        tails = range(max(0, len(text) - len(_OPEN) + 1), len(text))
        start = next((i for i in tails if _OPEN.startswith(text[i:])), len(text))
    return len(text[:start].rstrip())


def _call(found) -> ToolCall:
    if not isinstance(found, dict) or not isinstance(found.get("name"), str) or not found["name"]:
        raise ValueError('expected {"name": "<tool>", "arguments": {...}}')
    return ToolCall(found["name"], _arguments(found.get("arguments", {})))


def _arguments(arguments) -> dict:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments are not JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be an object, got {json_type(arguments)}")
    return arguments


def checked_tool_calls(calls, where: str) -> list[dict]:
    """A message's ``tool_calls``, checked and normalised to ``{"type": "function", "function":
    {"name", "arguments": dict}}`` (OpenAI's JSON-string arguments decoded): a `BadRecord` names
    the first bad one."""
    if not isinstance(calls, list):
        raise BadRecord("bad tool call", f"{where}tool_calls is {json_type(calls)}, expected a list")
    checked = []
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise BadRecord("bad tool call", f"{where}tool_calls[{j}] is {json_type(call)}, expected an object")
        function = function_of(call)
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRecord("bad tool call", f"{where}tool_calls[{j}] has no function name")
        try:
            arguments = _arguments(function.get("arguments", {}))
        except ValueError as e:
            raise BadRecord("bad tool call", f"{where}tool_calls[{j}]: {e}") from None
        checked.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return checked


def checked_tools(tools, where: str = "") -> list[dict] | None:
    """A record's ``tools`` (JSON schemas of functions), checked: None when absent."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRecord("bad tools", f"{where}tools is {json_type(tools)}, expected a list")
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(function_of(tool).get("name"), str):
            raise BadRecord("bad tools", f"{where}tools[{j}] is not a function schema with a name")
    return tools
