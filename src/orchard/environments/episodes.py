"""Multi-turn episodes: a model's replies interleaved with tool results, as token sequences ready
for training.

Every episode of a batch advances together: each turn, the model replies to each unfinished
episode's context (prompt, its own earlier replies, the tool results); each reply goes to the
episode's environment; replies that call tools get the results appended, rendered by the chat
template exactly as the conversation would render them, and the episode goes on. The model's
own tokens are kept as it generated them (never re-tokenized), and marked, so a loss covers them
and not the tool results, which the model only reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import import_callable
from ..errors import OrchardError
from .base import Step, ToolEnvironment
from .world import world_tools


class Environment(Protocol):
    """What an episode needs of an environment (`ToolEnvironment` is one); an optional ``calls``
    attribute (tool calls so far) is reported as the episode's."""

    schemas: list[dict] | None
    messages: list[dict]
    """The conversation so far, as `reset` and `step` built it (the chat template renders it)."""

    def reset(self, messages: list[dict]) -> list[dict]: ...

    def step(self, reply: str) -> Step: ...


@dataclass
class Episode:
    completion: list[int] = field(default_factory=list)
    """Every token after the prompt: the model's replies and the tool results between them."""
    generated: list[bool] = field(default_factory=list)
    """True on the tokens the model generated (and its turn ends), False on tool results."""
    final: str = ""
    """The final answer; empty when the episode ended without one."""
    failure: str | None = None
    calls: int = 0
    turns: int = 0
    messages: list[dict] = field(default_factory=list)


def environment_factory(spec: str, max_turns: int = 3, listing: str = "template") -> Callable[[], Environment]:
    """A maker of fresh environments from a recipe's ``environment``: built-in tool names joined by
    commas (``calculator``, ``lookup``: a `ToolEnvironment` of them, offered by ``listing``), or
    ``module:function`` returning a new environment (reset/step/schemas) at each call."""
    if ":" in spec:
        return import_callable(spec, "environment")
    tools = {tool.name: tool for tool in world_tools()}
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in tools]
    if not names or unknown:
        raise OrchardError(f"environment: unknown tool {', '.join(map(repr, unknown)) or repr(spec)}; expected "
                           f"{', '.join(tools)} (comma-separated) or module:function")
    chosen = [tools[name] for name in names]
    return lambda: ToolEnvironment(chosen, max_turns, listing)


def run_episodes(sample: Callable[[list[list[int]], list[int], int], list[list[int]]], tokenizer,
                 environments: Sequence[Environment], prompts: Sequence[list[dict]],
                 prompt_ids: Sequence[list[int]], end_ids: Sequence[int], max_length: int) -> list[Episode]:
    """Run one episode per prompt (``prompts[i]`` its messages, ``prompt_ids[i]`` the rendering of
    what the environment's `reset` makes of them, with its tools and the generation prompt) in
    ``environments[i]``.
    ``sample(contexts, rows, turn)`` returns one reply (token ids, its end token kept) per context.
    An episode ends with a reply that calls no tool, a reply cut before its turn ended, an
    environment out of turns, or a context that would pass ``max_length`` tokens."""
    episodes = [Episode() for _ in prompts]
    contexts = [list(ids) for ids in prompt_ids]
    for environment, messages in zip(environments, prompts):
        environment.reset(list(messages))
    active, turn = list(range(len(prompts))), 0
    while active:
        replies = sample([contexts[i] for i in active], active, turn)
        still = []
        for i, reply in zip(active, replies):
            episode, environment = episodes[i], environments[i]
            ended = bool(reply) and reply[-1] in end_ids
            text = tokenizer.decode([t for t in reply if t not in end_ids])
            episode.completion += reply
            episode.generated += [True] * len(reply)
            contexts[i] += reply
            episode.turns += 1
            if not ended:  # cut by the length limit: what it wrote is its answer
                episode.final = text.strip()
                if "<tool_call>" in text:
                    episode.failure = "reply cut by max_new_tokens inside a tool call"
                continue
            step = environment.step(text)
            episode.calls = getattr(environment, "calls", episode.calls)
            if step.done:
                episode.final, episode.failure = step.final or "", step.failure
                continue
            segment = _results_segment(tokenizer, environment, len(step.messages), reply[-1])
            if len(contexts[i]) + len(segment) >= max_length:
                episode.failure = step.failure or f"tool results would pass the context of {max_length} tokens"
                continue
            episode.completion += segment
            episode.generated += [False] * len(segment)
            contexts[i] += segment
            still.append(i)
        active, turn = still, turn + 1
    for episode, environment in zip(episodes, environments):
        episode.messages = list(environment.messages)
    return episodes


def _results_segment(tokenizer, environment: Environment, step_size: int, end_id: int) -> list[int]:
    """The tokens after a reply's end token up to the next generation prompt: the rest of the
    reply's turn, the tool results' turn, the assistant header, as the chat template renders them."""
    messages, tools = environment.messages, environment.schemas
    before = tokenizer.apply_chat_template(messages[:len(messages) - step_size + 1], tools=tools)
    after = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    end_text = tokenizer.decode([end_id], skip_special_tokens=False)
    if not after.startswith(before) or end_text not in before:
        raise OrchardError("chat template: rendering tool results changes what comes before them (not "
                           "prefix-stable), so they cannot be appended to a reply")
    return tokenizer.encode(before[before.rfind(end_text) + len(end_text):] + after[len(before):])
