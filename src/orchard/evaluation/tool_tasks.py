"""`--tasks tools`: how a chat model uses the built-in world's tools, on held-out questions.

Each question of the task (arithmetic: word problems with held-out operands, for the calculator;
lookup: questions about held-out facts, for the lookup; `tools` alone runs both) is answered
twice, greedily: once as an episode with both tools offered (the brief listing the built-in tool
conversations teach, `orchard.environments`), once as a plain chat with no tools. Metrics:

* ``accuracy``: exact match of the episode's final answer (a failed tool call counts as wrong);
* ``accuracy (no tools)`` and ``accuracy_gain``: the plain answers' exact match, and the difference;
* ``call_rate``: the share of episodes that called a tool;
* ``correct_calls``: the share whose first call is the right tool and returns what answers the
  question (the calculator's result equals the answer; the lookup returns that person's facts);
* ``failed_calls``: the share of episodes with a malformed call, an unknown tool or a tool error.
"""

from __future__ import annotations

from ..data.synthetic import world_answer_matches
from ..environments import TOOL_TASKS, ToolEnvironment, run_episodes, tool_questions, world_tools
from ..serve.engine import Sampling
from .subject import EvalOptions, Subject, TaskResult, builtin_world, mean

MAX_TURNS = 3
REPLY_TOKENS = 96  # a call with two 2-digit numbers is ~65 tokens of the quickstart tokenizer


class ToolUse:
    def __init__(self, which: str | None = None, name: str = "tools"):
        self.tasks = [which] if which else list(TOOL_TASKS)
        self.name = name

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        world = builtin_world()
        tools = world_tools(world)
        metrics, examples, count = {}, [], 0
        for task in self.tasks:
            items = tool_questions(world, task, "held_out", options.seed, options.limit or 200)
            found = self._task(subject, options, world, items, tools, f"{self.name}:{task}")
            suffix = "" if len(self.tasks) == 1 else f" ({task})"
            metrics.update({f"{metric}{suffix}": value for metric, value in found[0].items()})
            examples += found[1]
            count += len(items)
        if len(self.tasks) > 1:
            for metric in ("accuracy", "accuracy (no tools)", "correct_calls"):
                metrics[metric] = mean(metrics[f"{metric} ({task})"] for task in self.tasks)
            metrics["accuracy_gain"] = metrics["accuracy"] - metrics["accuracy (no tools)"]
        return TaskResult(metrics, "accuracy", count, examples=examples)

    def _task(self, subject: Subject, options: EvalOptions, world, items: list[dict], tools, what: str):
        greedy = Sampling(REPLY_TOKENS, temperature=0.0)
        end_ids = subject.end_ids()
        positions = subject.model.config.max_position_embeddings

        def sample(contexts, rows, turn):
            texts = subject.replies(contexts, [greedy] * len(contexts), options, f"{what} turn {turn + 1}")
            return [subject.tokenizer.encode(text) + [end_ids[-1]] for text in texts]

        environments = [ToolEnvironment(tools, MAX_TURNS, listing="brief") for _ in items]
        prompts = [item["prompt"] for item in items]
        prompt_ids = [subject.chat_prompt(environment.reset(prompt)) for environment, prompt in zip(environments, prompts)]
        episodes = run_episodes(sample, subject.tokenizer, environments, prompts, prompt_ids, end_ids,
                                positions - REPLY_TOKENS)
        plain = subject.replies([subject.chat_prompt(p) for p in prompts], [greedy] * len(prompts), options,
                                f"{what} without tools")
        right = [e.failure is None and world_answer_matches(world, item["prompt"], e.final, item["answer"])
                 for e, item in zip(episodes, items)]
        right_plain = [world_answer_matches(world, item["prompt"], reply, item["answer"])
                       for reply, item in zip(plain, items)]
        metrics = {"accuracy": mean(right), "accuracy (no tools)": mean(right_plain),
                   "accuracy_gain": mean(right) - mean(right_plain),
                   "call_rate": mean(e.calls > 0 for e in episodes),
                   "correct_calls": mean(first_call_answers(e.messages, item) for e, item in zip(episodes, items)),
                   "failed_calls": mean(e.failure is not None for e in episodes)}
        examples = [{"question": item["prompt"][-1]["content"], "expected": item["answer"],
                     "episode": [m for m in e.messages if m["role"] != "system"][1:], "reply without tools": reply}
                    for e, item, reply in list(zip(episodes, items, plain))[:3]]
        return metrics, examples


def first_call_answers(messages: list[dict], item: dict) -> bool:
    """Whether the episode's first tool call is the question's tool and its result is the one that
    answers it."""
    for i, message in enumerate(messages):
        if message.get("tool_calls"):
            name = message["tool_calls"][0]["function"]["name"]
            result = messages[i + 1]["content"] if i + 1 < len(messages) else None
            return name == item["call"][0] and result == item["result"]
    return False
