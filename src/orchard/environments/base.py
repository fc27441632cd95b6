"""Tools and the environment a model uses them in.

A `Tool` is a function of keyword arguments returning text, with the JSON schema the chat template
lists. A `ToolEnvironment` runs one episode: `reset` with the prompt's messages, then `step` with
each reply the model writes. A reply that calls tools (`orchard.data.tool_calls`) gets their
results back as ``tool`` messages and the episode goes on; a reply that calls none is the final
answer and ends it. Malformed calls, unknown tools, bad arguments and errors the tool raises
(`ToolError`) become tool messages saying so, and mark the episode failed: an RL reward of 0,
however right the final answer (`Step.failure`). An episode out of turns ends failed too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..data.tool_calls import ParsedReply, parse_reply


class ToolError(Exception):
    """A tool refused its input; the message goes back to the model."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    """The JSON schema of the keyword arguments (an "object" with "properties" and "required")."""
    function: Callable[..., str]

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, arguments: dict) -> str:
        """The tool's result for ``arguments``; missing or unknown arguments are a `ToolError`."""
        expected = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(expected))
        missing = [name for name in self.parameters.get("required", []) if name not in arguments]
        if unknown or missing:
            raise ToolError(f"{self.name} takes {', '.join(expected) or 'no arguments'}"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                            + (f"; missing: {', '.join(missing)}" if missing else ""))
        return self.function(**arguments)


@dataclass
class Step:
    messages: list[dict]
    """The reply as an assistant message, then the tool messages that answer its calls."""
    done: bool
    final: str | None = None
    """The final answer (the content of the reply that called no tool), when done."""
    failure: str | None = None
    """Why the episode failed (the first malformed call, unknown tool or tool error), if it did."""


def brief_listing(tools: list[Tool]) -> str:
    """One line naming the tools and their arguments: "Tools: calculator(expression), lookup(name)"."""
    return "Tools: " + ", ".join(f"{tool.name}({', '.join(tool.parameters.get('properties', {}))})"
                                 for tool in tools)


def with_system_line(messages: list[dict], line: str) -> list[dict]:
    """``messages`` with ``line`` ending their system turn (a new one first if they have none)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + line}, *messages[1:]]
    return [{"role": "system", "content": line}, *messages]


@dataclass
class ToolEnvironment:
    """One episode at a time with ``tools``, at most ``max_turns`` replies of the model.

    ``listing`` is how the prompt offers the tools: "template" gives their JSON schemas to the chat
    template (`schemas`), which lists them in the system turn as Qwen2.5's does (~100 tokens per
    tool and ~90 of instructions for a large vocabulary, ~700 in all for the built-in world's
    2,048-token one); "brief" adds one line naming them (`brief_listing`) to the system turn at
    `reset` instead, for models of a few hundred positions that learn the format from SFT (the
    built-in tool conversations are written that way)."""

    tools: list[Tool]
    max_turns: int = 3
    listing: Literal["template", "brief"] = "template"
    messages: list[dict] = field(default_factory=list)
    turns: int = 0
    failure: str | None = None
    calls: int = 0

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {self.max_turns}")
        if self.listing not in ("template", "brief"):
            raise ValueError(f"listing must be template or brief, got {self.listing!r}")
        self.by_name = {tool.name: tool for tool in self.tools}

    @property
    def schemas(self) -> list[dict] | None:
        """The tools for the chat template (None with the brief listing)."""
        return [tool.schema() for tool in self.tools] if self.listing == "template" else None

    def reset(self, messages: list[dict]) -> list[dict]:
        """Start an episode from the prompt's ``messages``; the conversation so far (with the
        brief listing, its system turn names the tools)."""
        messages = list(messages) if self.listing == "template" else with_system_line(messages, brief_listing(self.tools))
        self.messages, self.turns, self.failure, self.calls = messages, 0, None, 0
        return list(messages)

    def step(self, reply: str) -> Step:
        """Take the model's next reply: its tool calls' results, or the end of the episode."""
        self.turns += 1
        parsed = parse_reply(reply)
        results = self._results(parsed)
        step_messages = [parsed.message(), *results]
        self.messages += step_messages
        if not results:
            return Step(step_messages, done=True, final=parsed.content, failure=self.failure)
        if self.turns >= self.max_turns:
            self.failure = self.failure or f"no final answer in {self.max_turns} turns"
            return Step(step_messages, done=True, final="", failure=self.failure)
        return Step(step_messages, done=False, failure=self.failure)

    def _results(self, parsed: ParsedReply) -> list[dict]:
        results = [self._error(error) for error in parsed.errors]
        for call in parsed.calls:
            self.calls += 1
            tool = self.by_name.get(call.name)
            if tool is None:
                known = ", ".join(self.by_name) or "none"
                results.append(self._error(f"unknown tool {call.name!r} (tools: {known})", call.name))
                continue
            try:
                results.append({"role": "tool", "name": call.name, "content": tool(call.arguments)})
            except ToolError as e:
                results.append(self._error(str(e), call.name))
            except TypeError as e:  # arguments of the wrong type for the function
                results.append(self._error(f"bad arguments: {e}", call.name))
        return results

    def _error(self, text: str, name: str | None = None) -> dict:
        self.failure = self.failure or text
        return {"role": "tool", "content": f"error: {text}", **({"name": name} if name else {})}
