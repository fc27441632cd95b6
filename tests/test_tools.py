"""Tool use: the tool-call format (parsing what the model writes, rendering what it reads, exactly as
Qwen2.5's template), SFT labels of tool conversations, the calculator and lookup tools, the
environment's step (errors become tool messages and a failed episode, never an exception), and
multi-turn episodes whose tokens equal the rendered conversation, tool results masked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchard.data.conversations import Conversation, read_conversations, tokenize_conversation
from orchard.data.synthetic import World
from orchard.data.tool_calls import checked_tool_calls, content_end, parse_reply, reply_text
from orchard.data.records import BadRecord
from orchard.environments import (CALCULATOR, ToolEnvironment, ToolError, calculate, environment_factory,
                                  lookup_tool, run_episodes, tool_conversations, tool_questions, world_tools)
from orchard.errors import OrchardError
from orchard.losses.tokens import IGNORE_INDEX
from orchard.tokenizer.bpe import CHAT_TEMPLATE
from orchard.tokenizer.chat_template import render_chat

# Qwen2.5-Instruct's chat template (tokenizer_config.json), the reference for the tool format.
QWEN2_5_TEMPLATE = (Path(__file__).parent / "data" / "qwen2_5_chat_template.jinja").read_text()
TOOLS = [tool.schema() for tool in world_tools()]


def call(name, arguments, content=""):
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Anna has 37 apples and buys 45 more. How many?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "37 + 45"}}},
                    {"type": "function", "function": {"name": "lookup", "arguments": {"name": "Anna Stone"}}}]},
    {"role": "tool", "content": "82"},
    {"role": "tool", "content": "error: no one called 'Anna Stone'"},
    call("calculator", {"expression": "82 * 1"}, content="Checking."),
    {"role": "tool", "content": "82"},
    {"role": "assistant", "content": "82"},
]


# --- the format -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tools", [TOOLS, None], ids=["tools", "no-tools"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_the_template_renders_tool_conversations_as_qwen2_5(tools, generation_prompt):
    variables = dict(tools=tools, add_generation_prompt=generation_prompt)
    assert render_chat(CHAT_TEMPLATE, CONVERSATION, variables) == render_chat(QWEN2_5_TEMPLATE, CONVERSATION, variables)


def test_plain_conversations_render_as_chatml_and_tools_without_a_system_turn():
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(CHAT_TEMPLATE, plain, {}) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    rendered = render_chat(CHAT_TEMPLATE, plain, {"tools": TOOLS})
    # No default system prompt (Qwen adds its own): the tools header opens the system turn.
    assert rendered.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert rendered.count("<|im_start|>system") == 1 and json.dumps(TOOLS[0]) in rendered
    assert rendered.endswith("</tool_call><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")


def test_reply_text_is_what_the_template_renders_after_the_generation_prompt():
    for i in (2, 5):
        before = render_chat(CHAT_TEMPLATE, CONVERSATION[:i], {"tools": TOOLS, "add_generation_prompt": True})
        through = render_chat(CHAT_TEMPLATE, CONVERSATION[:i + 1], {"tools": TOOLS})
        assert through == before + reply_text(CONVERSATION[i]) + "<|im_end|>\n"


def test_parse_reply_reads_back_reply_text():
    for message in (CONVERSATION[2], CONVERSATION[5], {"role": "assistant", "content": "Just text."}):
        parsed = parse_reply(reply_text(message))
        assert parsed.errors == [] and parsed.message()["content"] == message["content"]
        assert parsed.message().get("tool_calls") == checked_tool_calls(message["tool_calls"], "") \
            if "tool_calls" in message else "tool_calls" not in parsed.message()
    # OpenAI's JSON-string arguments, compact JSON, and a missing arguments field.
    parsed = parse_reply('<tool_call>{"name":"calculator","arguments":"{\\"expression\\":\\"1+1\\"}"}</tool_call>'
                         '<tool_call>{"name": "now"}</tool_call>')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("calculator", {"expression": "1+1"}), ("now", {})]
    assert parsed.calls[0].as_openai("call_1") == {"id": "call_1", "type": "function", "function": {
        "name": "calculator", "arguments": '{"expression": "1+1"}'}}


@pytest.mark.parametrize("text, error", [
    ("<tool_call>\nnot json\n</tool_call>", "malformed tool call: Expecting value"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'malformed tool call: expected {"name"'),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "arguments must be an object, got a list"),
    ('<tool_call>{"name": "calculator", "arguments": "{oops"}</tool_call>', "arguments are not JSON"),
    ('<tool_call>{"name": "calculator", "arguments": {"expr', "<tool_call> is never closed"),
])
def test_malformed_calls_are_error_lines(text, error):
    parsed = parse_reply("Let me compute. " + text)
    assert parsed.calls == [] and len(parsed.errors) == 1 and error in parsed.errors[0]
    assert parsed.content == "Let me compute."


@pytest.mark.parametrize("text, content", [
    ("Sure", "Sure"), ("Sure.\n", "Sure."), ("Sure. <", "Sure."), ("Sure. <tool_cal", "Sure."),
    ("Sure.\n<tool_call>\n{", "Sure."), ("a < b", "a < b"), ("Sure. <tool_callz", "Sure. <tool_callz"),
    ("<tool_call>", ""),
])
def test_content_end_holds_back_what_may_begin_a_call(text, content):
    assert text[:content_end(text)] == content


def test_records_with_tool_calls_are_read_and_checked(tmp_path):
    path = tmp_path / "tools.jsonl"
    openai_style = {"messages": [{"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": None, "tool_calls": [
                                     {"id": "c1", "type": "function",
                                      "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'}}]},
                                 {"role": "tool", "tool_call_id": "c1", "content": "4"},
                                 {"role": "assistant", "content": "4"}], "tools": TOOLS[:1]}
    bad = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "calculator", "arguments": "[1]"}}]}]}
    path.write_text(json.dumps(openai_style) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(OrchardError, match=r"tools.jsonl:2: messages\[1\]: tool_calls\[0\]: arguments must be an object"):
        list(read_conversations(path))
    (conversation,) = list(read_conversations(path, on_error="skip"))
    assert conversation.tools == TOOLS[:1] and conversation.messages[1] == {
        "role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+2"}}}]}
    assert conversation.messages[2] == {"role": "tool", "content": "4", "tool_call_id": "c1"}
    with pytest.raises(BadRecord, match="tools\\[0\\] is not a function schema"):
        from orchard.data.tool_calls import checked_tools
        checked_tools([{"type": "function"}])


def test_sft_supervises_the_calls_and_answers_not_the_tool_results(chat_base):
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(chat_base.dir)
    example = tokenize_conversation(Conversation(CONVERSATION, "test", TOOLS), tokenizer, max_length=4096)
    assert example.input_ids == tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS))
    supervised, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            supervised.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    assert supervised == [reply_text(CONVERSATION[2]) + "<|im_end|>", reply_text(CONVERSATION[5]) + "<|im_end|>",
                          "82<|im_end|>"]


# --- tools and the environment ------------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [
    ("37 + 45", "82"), ("7 / 2", "3.5"), ("(2 + 3) * 4", "20"), ("2 ** 10", "1024"), ("2^10", "1024"),
    ("1,000 × 3", "3000"), ("$12.50 * 2", "25"), ("-3 - -5", "2"), ("10 // 3 + 10 % 3", "4"), ("1 / 3", "0.3333333333"),
])
def test_the_calculator_computes(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('echo hi')", "not Call"), ("open('x')", "not Call"), ("x + 1", "not Name"),
    ("(1).__class__", "not Attribute"), ("[1, 2]", "not List"), ("1 +", "cannot parse"), ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "result too large"), ("10 ** 20", "result too large"), ("(-8) ** 0.5", "not a real number"),
    ("1" * 201, "longer than 200"), ("", "non-empty"), ("True + 1", "not Constant"),
])
def test_the_calculator_refuses_what_is_not_arithmetic(expression, error):
    started = time.perf_counter()
    with pytest.raises(ToolError, match=error):
        calculate(expression)
    assert time.perf_counter() - started < 0.5  # refused before anything huge is computed


def test_lookup_answers_in_the_language_of_the_name():
    world = World()
    lookup = lookup_tool(world)
    person = world.by_kind("person")[0]
    assert lookup({"name": person.name_en.upper()}) == "\n".join(f.sentence("en") for f in world.facts_about(person))
    assert lookup({"name": person.name_zh}).splitlines()[0] == world.facts_about(person)[0].sentence("zh")
    with pytest.raises(ToolError, match="no one called 'Nobody Here'"):
        lookup({"name": "Nobody Here"})
    with pytest.raises(ToolError, match="lookup takes name; unknown: city; missing: name"):
        lookup({"city": "Paris"})


def test_the_environment_turns_every_failure_into_a_tool_message():
    environment = ToolEnvironment([CALCULATOR], max_turns=3)
    prompt = [{"role": "user", "content": "2+3?"}]
    assert environment.reset(prompt) == prompt
    step = environment.step('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>')
    assert not step.done and step.failure is None and step.messages[1] == {"role": "tool", "name": "calculator",
                                                                           "content": "5"}
    step = environment.step("5")
    assert step.done and step.final == "5" and step.failure is None and environment.calls == 1
    cases = [
        ("<tool_call>{oops}</tool_call>", "error: malformed tool call"),
        ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "error: unknown tool 'search' (tools: calculator)"),
        ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>', "error: calculator takes expression"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>', "error: division by zero"),
    ]
    for reply, message in cases:
        environment.reset(prompt)
        step = environment.step(reply)
        assert not step.done and step.messages[-1]["role"] == "tool"
        assert step.messages[-1]["content"].startswith(message)
        assert step.messages[-1]["content"] == "error: " + step.failure
        final = environment.step("5")  # a right answer after a failed call still fails the episode
        assert final.done and final.final == "5" and final.failure is not None
    environment.reset(prompt)
    for _ in range(2):
        assert not environment.step(cases[3][0].replace("1/0", "1+1")).done
    last = environment.step(cases[3][0].replace("1/0", "1+1"))
    assert last.done and last.final == "" and last.failure == "no final answer in 3 turns"


def test_environment_factory_names_and_errors(user_module):
    environment = environment_factory("calculator, lookup", max_turns=2)()
    assert [s["function"]["name"] for s in environment.schemas] == ["calculator", "lookup"] and environment.max_turns == 2
    with pytest.raises(OrchardError, match="environment: unknown tool 'search'; expected calculator, lookup"):
        environment_factory("calculator,search")
    with pytest.raises(OrchardError, match="environment: cannot import 'nowhere' for 'nowhere:make'"):
        environment_factory("nowhere:make")
    name = user_module("from orchard.environments import ToolEnvironment, CALCULATOR\n"
                       "def make():\n    return ToolEnvironment([CALCULATOR], max_turns=5)\n")
    assert environment_factory(f"{name}:make")().max_turns == 5


# --- episodes -------------------------------------------------------------------------------------------


def scripted(tokenizer, replies_by_row):
    """A sampler that writes each row's scripted replies, turn by turn, each ended by <|im_end|>."""
    end = tokenizer.token_to_id("<|im_end|>")
    seen = []

    def sample(contexts, rows, turn):
        seen.append((list(rows), turn, [list(c) for c in contexts]))
        out = []
        for row in rows:
            text, ended = replies_by_row[row][turn]
            out.append(tokenizer.encode(text) + ([end] if ended else []))
        return out
    return sample, seen


def test_episodes_are_the_rendered_conversation_with_tool_results_masked(chat_base):
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(chat_base.dir)
    end = tokenizer.token_to_id("<|im_end|>")
    prompts = [[{"role": "user", "content": "Anna has 37 apples and buys 45 more. How many?"}],
               [{"role": "user", "content": "What is 2 + 2?"}],
               [{"role": "user", "content": "Compute."}],
               [{"role": "user", "content": "Compute again."}]]
    good = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37 + 45"}}\n</tool_call>'
    replies = {0: [(good, True), ("82", True)],
               1: [("4", True)],                                    # answers at once
               2: [("<tool_call>{broken", True), ("4", True)],      # a malformed call, then an answer
               3: [('<tool_call>{"name": "calc', False)]}           # cut inside a call
    sample, seen = scripted(tokenizer, replies)
    environments = [ToolEnvironment([CALCULATOR]) for _ in prompts]
    prompt_ids = [tokenizer.encode(tokenizer.apply_chat_template(p, add_generation_prompt=True, tools=TOOLS[:1]))
                  for p in prompts]
    episodes = run_episodes(sample, tokenizer, environments, prompts, prompt_ids, [tokenizer.eos_id, end], 4096)
    assert [(rows, turn) for rows, turn, _ in seen] == [([0, 1, 2, 3], 0), ([0, 2], 1)]
    first = episodes[0]
    assert (first.final, first.failure, first.calls, first.turns) == ("82", None, 1, 2)
    # Prompt and episode are, token for token, the whole conversation as the template renders it.
    whole = tokenizer.apply_chat_template(first.messages, tools=TOOLS[:1])
    assert prompt_ids[0] + first.completion == tokenizer.encode(whole.removesuffix("\n"))
    generated = [t for t, g in zip(first.completion, first.generated) if g]
    read = [t for t, g in zip(first.completion, first.generated) if not g]
    assert generated == tokenizer.encode(good) + [end] + tokenizer.encode("82") + [end]
    assert tokenizer.decode(read, skip_special_tokens=False) == \
        "\n<|im_start|>user\n<tool_response>\n82\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    # The second turn's context is the first turn's, its reply and the tool result.
    assert seen[1][2][0] == prompt_ids[0] + first.completion[:len(first.completion) - len(tokenizer.encode("82")) - 1]
    assert episodes[1].final == "4" and episodes[1].failure is None and all(episodes[1].generated)
    assert episodes[2].final == "4" and episodes[2].failure.startswith("malformed tool call")
    assert episodes[3].failure == "reply cut by max_new_tokens inside a tool call" and episodes[3].turns == 1


def test_an_episode_stops_before_its_context_is_full(chat_base):
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(chat_base.dir)
    end = tokenizer.token_to_id("<|im_end|>")
    call_ = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 1"}}\n</tool_call>'
    sample, _ = scripted(tokenizer, {0: [(call_, True)] * 3})
    prompt = [{"role": "user", "content": "Go."}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tools=TOOLS[:1]))
    (episode,) = run_episodes(sample, tokenizer, [ToolEnvironment([CALCULATOR])], [prompt], [ids],
                              [end], max_length=len(ids) + len(tokenizer.encode(call_)) + 5)
    assert episode.turns == 1 and episode.failure.startswith("tool results would pass the context")


# --- built-in data --------------------------------------------------------------------------------------


def test_tool_conversations_and_questions_follow_the_splits():
    world = World()
    records = tool_conversations(world, num_conversations=40, plain_fraction=0.25)
    with_tools = [r for r in records if any("tool_calls" in m for m in r["messages"])]
    assert len(records) == 40 and len(with_tools) == 30
    assert tool_conversations(world, num_conversations=4, plain_fraction=0, listing="template")[0]["tools"] == TOOLS
    for record in with_tools:
        system, user, called, result, answer = record["messages"]
        assert system == {"role": "system", "content": "Tools: calculator(expression), lookup(name)"}
        function = called["tool_calls"][0]["function"]
        tool = {t.name: t for t in world_tools(world)}[function["name"]]
        assert result["content"] == tool(function["arguments"]) and answer["role"] == "assistant"
    arithmetic = tool_questions(world, "arithmetic", "held_out", num=50)
    assert all(calculate(q["call"][1]["expression"]) == q["answer"] for q in arithmetic)
    train_calls = {q["call"][1]["expression"] for q in tool_questions(world, "arithmetic", "train", num=400)}
    assert not train_calls & {q["call"][1]["expression"] for q in arithmetic}
    held_facts = {(f.subject.name("en"), f.answer("en")) for f in world.split_facts()[1]}
    lookups = [q for q in tool_questions(world, "lookup", "held_out", num=50, languages=["en"])]
    assert all((q["call"][1]["name"], q["answer"]) in held_facts and q["reply"] in q["result"] for q in lookups)


# --- orchard eval --tasks tools -------------------------------------------------------------------------


def test_the_tools_task_counts_by_hand(chat_base):
    """A scripted model: it calls the calculator right on the first 3 of 4 word problems (a wrong
    expression on the 4th), answers from the tool's result, and answers 0 without tools."""
    from types import SimpleNamespace

    from orchard.evaluation.subject import EvalOptions
    from orchard.evaluation.tool_tasks import ToolUse, first_call_answers
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(chat_base.dir)
    items = tool_questions(World(), "arithmetic", "held_out", seed=0, num=4)
    by_question = {item["prompt"][0]["content"]: item for item in items}

    def replies(prompts, samplings, options, what):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids, skip_special_tokens=False)
            item = next(item for question, item in by_question.items() if question in text)
            if "<tool_response>" in text:
                out.append(text.rsplit("<tool_response>\n", 1)[1].split("\n</tool_response>")[0])
            elif "Tools: calculator(expression), lookup(name)" in text:
                wrong = item is items[3]
                expression = "1 + 1" if wrong else item["call"][1]["expression"]
                out.append(f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>')
            else:
                out.append("0")
        return out

    subject = SimpleNamespace(tokenizer=tokenizer, model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512)),
                              end_ids=lambda: [tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")],
                              chat_prompt=lambda m: tokenizer.encode(tokenizer.apply_chat_template(m, add_generation_prompt=True)),
                              replies=replies)
    result = ToolUse("arithmetic").run(subject, EvalOptions(limit=4))
    assert result.metrics == {"accuracy": 0.75, "accuracy (no tools)": 0.0, "accuracy_gain": 0.75, "call_rate": 1.0,
                              "correct_calls": 0.75, "failed_calls": 0.0}
    assert result.count == 4 and result.headline == "accuracy"
    assert not first_call_answers([{"role": "assistant", "content": "2"}], items[0])
