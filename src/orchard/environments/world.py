"""The built-in world's tools and tool-use data: a calculator for its word problems, a lookup of
its people's facts, conversations that teach a model to call them (for `orchard sft`), and
questions to use them on (for `orchard grpo environment=...` and `orchard eval --tasks tools`).

A tool conversation offers both tools (so the model must pick one), calls one, reads its result and
answers as the plain instruction data does: the number of a word problem, the sentence of a fact::

    user       Anna has 37 apples and buys 45 more. How many apples does she have now?
    assistant  <tool_call>{"name": "calculator", "arguments": {"expression": "37 + 45"}}</tool_call>
    tool       82
    assistant  82

Questions and calls follow the instruction data's splits: held-out questions ask about held-out
facts and held-out operands, so a model is measured on calls it never saw.
"""

from __future__ import annotations

import random

from ..data.synthetic import World, instruction_conversations
from ..data.synthetic.instructions import word_problem_with_expression
from ..data.synthetic.world import LANGUAGES, checked_languages
from .base import Tool, ToolError, brief_listing, with_system_line
from .calculator import CALCULATOR, calculate

TOOL_TASKS = ("arithmetic", "lookup")


def lookup_tool(world: World) -> Tool:
    """Everything the world says about a person, in the language their name is written in."""
    people = {}
    for person in world.by_kind("person"):
        for lang in LANGUAGES:
            people[person.name(lang).casefold()] = (person, lang)

    def lookup(name: str) -> str:
        if not isinstance(name, str):
            raise ToolError("name must be a string")
        found = people.get(name.strip().casefold())
        if found is None:
            raise ToolError(f"no one called {name!r}")
        person, lang = found
        return "\n".join(fact.sentence(lang) for fact in world.facts_about(person))

    return Tool(name="lookup", description="Look up what is known about a person, by full name.",
                parameters={"type": "object",
                            "properties": {"name": {"type": "string", "description": "The person's full name"}},
                            "required": ["name"]},
                function=lookup)


def world_tools(world: World | None = None) -> list[Tool]:
    return [CALCULATOR, lookup_tool(world if world is not None else World())]


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool_questions(world: World, task: str, split: str = "held_out", seed: int = 0, num: int = 200,
                   languages=LANGUAGES) -> list[dict]:
    """``num`` questions of ``task`` (arithmetic: word problems; lookup: one fact of a person) from
    ``split``, as {"prompt": [user message], "answer", "call": (tool name, arguments) that answers
    it, "result": the tool's result, "reply": the expected final reply}."""
    if task not in TOOL_TASKS:
        raise ValueError(f"unknown tool task {task!r}; expected one of {', '.join(TOOL_TASKS)}")
    languages = checked_languages(languages)
    rng = random.Random(f"tools:{task}:{seed}:{split}")
    kept, held = world.split_facts()
    facts = kept if split == "train" else held
    lookup = lookup_tool(world)
    items = []
    for _ in range(num):
        lang = rng.choice(languages)
        if task == "arithmetic":
            question, answer, expression = word_problem_with_expression(world, rng, lang, split)
            call, result, reply = ("calculator", {"expression": expression}), calculate(expression), answer
        else:
            fact = rng.choice(facts)
            question, answer, reply = fact.question(lang), fact.answer(lang), fact.sentence(lang)
            call = ("lookup", {"name": fact.subject.name(lang)})
            result = lookup(call[1])
        items.append({"prompt": [{"role": "user", "content": question}], "answer": answer, "call": call,
                      "result": result, "reply": reply})
    return items


def tool_conversations(world: World | None = None, split: str = "train", seed: int = 0, num_conversations: int = 2000,
                       plain_fraction: float = 0.25, listing: str = "brief") -> list[dict]:
    """SFT records teaching the tool format: conversations that call the calculator or the lookup
    (half each) and answer from the result, offering both tools by ``listing`` (`ToolEnvironment`:
    "brief", a system line; "template", a "tools" key), and ``plain_fraction`` of the built-in
    instruction conversations with no tools offered, so the model keeps answering without them."""
    world = world if world is not None else World()
    tools = world_tools(world)
    schemas = [tool.schema() for tool in tools]
    num_plain = round(num_conversations * plain_fraction)
    num_tools = num_conversations - num_plain
    records = []
    for task, count in zip(TOOL_TASKS, (num_tools - num_tools // 2, num_tools // 2)):
        for item in tool_questions(world, task, split, seed, count):
            name, arguments = item["call"]
            messages = [*item["prompt"], _call(name, arguments),
                        {"role": "tool", "name": name, "content": item["result"]},
                        {"role": "assistant", "content": item["reply"]}]
            records.append({"messages": messages, "tools": schemas} if listing == "template" else
                           {"messages": with_system_line(messages, brief_listing(tools))})
    records += [{"messages": r["messages"]} for r in
                instruction_conversations(world, split=split, seed=seed, num_conversations=num_plain)]
    random.Random(f"tool-conversations:{seed}").shuffle(records)
    return records
