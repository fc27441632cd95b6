"""The tasks `orchard eval --tasks` runs: each reads local files only, checks them when it is named
(a malformed file fails before any model loads, naming its file and line), and returns its metrics
for one checkpoint at a time.

- ``bpb:PATH``: bits per byte, perplexity and loss over windows of any corpus orchard reads;
- ``gsm8k[:PATH]``: GSM8K's test split (``../shared/data/math/gsm8k_test.jsonl`` by default): chat
  models answer zero-shot in their template, base models after k worked examples from the train
  split beside it; exact match on the final number, and with ``samples`` > 1 maj@k, pass@k and
  mean@k over sampled answers;
- ``mc:PATH``: multiple choice by log-likelihood (``question``, ``choices``, ``answer``), acc and
  length-normalised acc_norm as lm-evaluation-harness defines them;
- ``world``: the built-in world's held-out items (facts in English and Chinese, sums);
- ``pairs:PATH``: preference accuracy: a reward model's scores, or a policy's implicit reward
  against its reference (log-likelihood ratio, as DPO defines it);
- ``judge:PATH``: win rate against a reference checkpoint's replies, judged by a judge checkpoint
  shown both replies twice, in both orders.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..data.packing import PackedSequences
from ..data.preferences import read_prompts
from ..data.records import BadRecord, json_type, read_records, resolve_paths, string_field
from ..data.synthetic import exact_match_items, world_answer_matches
from ..data.tokens import build_token_cache
from ..environments import TOOL_TASKS
from ..errors import OrchardError
from ..rewards.functions import final_number
from ..serve.engine import Sampling
from .completion import is_correct, world_completion_tasks
from .language_modeling import evaluate_language_modeling
from .preference_tasks import JudgeWinRate, PreferencePairs
from .scoring import continuation_log_likelihoods
from .subject import EvalOptions, Subject, TaskResult, builtin_world, mean, progress_bar
from .tool_tasks import ToolUse

DEFAULT_GSM8K = Path("../shared/data/math/gsm8k_test.jsonl")


class BitsPerByte:
    """Bits per byte over windows of `seq_len` tokens of a corpus (`paths`), or of the windows
    `windows(tokenizer)` makes (the quickstart's validation split); at most `max_windows` of them
    (else `options.limit`)."""

    def __init__(self, paths=None, windows: Callable[[object], PackedSequences] | None = None, name: str = "bpb",
                 text_field: str = "text", key: str | None = None, max_windows: int | None = None):
        self.name, self.windows, self.text_field, self.max_windows = name, windows, text_field, max_windows
        self.paths = resolve_paths(paths, key=key or f"--tasks {name}") if paths is not None else None

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        if self.windows is not None:
            sequences = self.windows(subject.tokenizer)
        else:
            if options.seq_len > subject.model.config.max_position_embeddings:
                raise OrchardError(f"--seq-len: {options.seq_len} exceeds the model's "
                                   f"{subject.model.config.max_position_embeddings} positions")
            cache = build_token_cache(self.paths, subject.tokenizer, self.text_field)
            sequences = PackedSequences(cache.tokens, options.seq_len)
            if len(sequences) == 0:
                raise OrchardError(f"{self.name}: {len(cache)} tokens are fewer than one window of "
                                   f"--seq-len {options.seq_len}")
        windows = min(len(sequences), self.max_windows or options.limit or len(sequences))
        with subject.autocast(), progress_bar(windows, self.name, "window") as bar:
            lm = evaluate_language_modeling(subject.model, sequences, subject.tokenizer.token_byte_lengths(),
                                            options.batch_size, windows, progress=bar.update)
        metrics = {"bits_per_byte": lm["val_bpb"], "perplexity": lm["val_perplexity"], "loss": lm["val_loss"]}
        return TaskResult(metrics, "bits_per_byte", int(lm["val_tokens"]))


def _gsm8k_shot(record) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {json_type(record)}")
    return string_field(record, "question"), string_field(record, "answer")


class GSM8K:
    """Grade-school math word problems answered by generation, scored on the final number."""

    def __init__(self, path=None, name: str = "gsm8k"):
        self.name = name
        path = Path(path) if path else DEFAULT_GSM8K
        if not path.exists():
            raise OrchardError(f"--tasks {name}: no such file '{path}'" +
                               ("" if name != "gsm8k" else " (name the test file: gsm8k:PATH)"))
        self.items = list(read_prompts(path, key=f"--tasks {name}"))
        if any(item.answer is None for item in self.items):
            missing = next(item for item in self.items if item.answer is None)
            raise OrchardError(f"{missing.source}: no answer to check replies against")
        self.path = path
        train = path.with_name(path.name.replace("test", "train"))
        self.shots_file = train if train != path and train.exists() else None

    def shots(self, count: int) -> tuple[list[tuple[str, str]], int]:
        """(question, worked solution) examples for base models: the first `count` of the train split
        beside the test file, or else of the test file itself, whose first `count` problems are then
        not evaluated (returned: how many to skip)."""
        if count == 0:
            return [], 0
        source = self.shots_file or self.path
        records = read_records(source, _gsm8k_shot, key=f"--tasks {self.name}")
        shots = [shot for _, (_, shot) in zip(range(count), records)]
        return shots, 0 if self.shots_file else len(shots)

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        shots, skip = ([], 0) if subject.chat else self.shots(options.shots)
        items = self.items[skip:][:options.limit]
        if subject.chat:
            prompts = [subject.chat_prompt(item.prompt) for item in items]
            stop = []
        else:
            header = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
            prompts = [subject.tokenizer.encode(f"{header}Question: {item.prompt[-1]['content']}\nAnswer:",
                                                add_bos=subject.tokenizer.adds_bos_by_default) for item in items]
            stop = ["Question:", "\n\n"]
        k = options.samples
        samplings = [Sampling(options.max_new_tokens, temperature=0.0, stop=stop) for _ in items]
        if k > 1:
            samplings += [Sampling(options.max_new_tokens, temperature=options.temperature,
                                   seed=options.seed + i * k + j, stop=stop) for i in range(len(items)) for j in range(k)]
            prompts = prompts + [p for p in prompts for _ in range(k)]
        replies = subject.replies(prompts, samplings, options, self.name)
        greedy = [final_number(reply) for reply in replies[:len(items)]]
        truth = [final_number(item.answer) for item in items]
        metrics = {"exact_match": mean([g is not None and g == t for g, t in zip(greedy, truth)])}
        if k > 1:
            sampled = [[final_number(r) for r in replies[len(items) + i * k:len(items) + (i + 1) * k]]
                       for i in range(len(items))]
            metrics.update(sampled_answer_metrics(sampled, truth, k))
        examples = [{"question": item.prompt[-1]["content"], "expected": t, "reply": r, "extracted": g}
                    for item, t, r, g in list(zip(items, truth, replies, greedy))[:5]]
        return TaskResult(metrics, "exact_match", len(items), examples=examples)


def sampled_answer_metrics(sampled: list[list[str | None]], truth: list[str], k: int) -> dict[str, float]:
    """maj@k (the most frequent extracted answer of k samples is right; a tie goes to the one
    sampled first; no answer never wins), pass@k (any is right) and mean@k (the fraction right)."""
    def majority(answers: list[str | None]) -> str | None:
        counts = Counter(a for a in answers if a is not None)
        return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None

    return {f"maj@{k}": mean([majority(s) == t for s, t in zip(sampled, truth)]),
            f"pass@{k}": mean([t in s for s, t in zip(sampled, truth)]),
            f"mean@{k}": mean([sum(a == t for a in s) / k for s, t in zip(sampled, truth)])}


def _choice_record(record) -> tuple[str, list[str], int]:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {json_type(record)}")
    question = string_field(record, "question")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise BadRecord("bad choices", "field 'choices' must be a list of at least two non-empty strings")
    answer = record.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadRecord("bad answer", f"field 'answer' must be the index of a choice (0..{len(choices) - 1}) "
                                      f"or one of the choices, got {answer!r}")
    return question, choices, answer


class MultipleChoice:
    """Each choice scored as the continuation ' CHOICE' of 'Question: QUESTION\\nAnswer:' (the
    format of lm-eval's ARC and SciQ tasks); acc picks the highest log-likelihood, acc_norm the
    highest per character of the choice (lm-eval's acc_norm)."""

    def __init__(self, path, name: str):
        self.name = name
        self.items = [item for _, item in read_records(path, _choice_record, key=f"--tasks {name}",
                                                         what="multiple-choice items")]

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        items = self.items[:options.limit]
        requests, owners = [], []
        for index, (question, choices, _) in enumerate(items):
            for choice in choices:
                requests.append(encode_pair(subject.tokenizer, f"Question: {question}\nAnswer:", f" {choice}"))
                owners.append(index)
        with subject.autocast(), progress_bar(len(requests), self.name, "choice") as bar:
            scores = continuation_log_likelihoods(subject.model, requests, options.batch_size, progress=bar.update)
        per_item: list[list[float]] = [[] for _ in items]
        for owner, (log_likelihood, _) in zip(owners, scores):
            per_item[owner].append(log_likelihood)
        acc, acc_norm = [], []
        for (_, choices, answer), lls in zip(items, per_item):
            acc.append(max(range(len(lls)), key=lambda i: lls[i]) == answer)
            acc_norm.append(max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == answer)
        return TaskResult({"acc": mean(acc), "acc_norm": mean(acc_norm)}, "acc", len(items))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval splits them: spaces at the context's end move to the
    continuation, the whole is encoded at once and the continuation is what follows the context's
    own encoding (a token may span the boundary otherwise)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    add_bos = tokenizer.adds_bos_by_default
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    context_ids = tokenizer.encode(context, add_bos=add_bos)
    return context_ids, whole[len(context_ids):]


class WorldTask:
    """The built-in world's items of one split ("held_out": about facts no fine-tuning data mentions;
    "train"): chat models answer its questions in their template, base models complete its facts
    (English, Chinese) and sums; greedy exact match, overall and by kind."""

    def __init__(self, split: str = "held_out", name: str = "world"):
        self.split, self.name = split, name

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        world = builtin_world()
        if subject.chat:
            items = exact_match_items(world, self.split)[:options.limit]
            english = {i for i, (messages, _) in enumerate(items) if messages[-1]["content"].isascii()}
            groups = {"questions, en": sorted(english),
                      "questions, zh": [i for i in range(len(items)) if i not in english]}
            prompts = [subject.chat_prompt(messages) for messages, _ in items]
            max_tokens = 40

            def matches(i: int, reply: str) -> bool:
                return world_answer_matches(world, items[i][0], reply, items[i][1])
        else:
            kinds = {kind: pairs[:options.limit] for kind, pairs in world_completion_tasks(world, self.split).items()}
            items = [pair for pairs in kinds.values() for pair in pairs]
            groups, start = {}, 0
            for kind, pairs in kinds.items():
                groups[kind] = list(range(start, start + len(pairs)))
                start += len(pairs)
            add_bos = subject.tokenizer.adds_bos_by_default
            prompts = [subject.tokenizer.encode(prompt, add_bos=add_bos) for prompt, _ in items]
            max_tokens = 12

            def matches(i: int, reply: str) -> bool:
                return is_correct(reply, items[i][1])
        replies = subject.replies(prompts, [Sampling(max_tokens, temperature=0.0) for _ in prompts], options,
                                  self.name)
        correct = [matches(i, reply) for i, reply in enumerate(replies)]
        metrics = {"exact_match": mean(correct)}
        metrics.update({f"exact_match ({kind})": mean([correct[i] for i in rows]) for kind, rows in groups.items()
                        if rows})
        return TaskResult(metrics, "exact_match", len(items))


TASKS = {"bpb": BitsPerByte, "gsm8k": GSM8K, "mc": MultipleChoice, "world": WorldTask, "pairs": PreferencePairs,
         "judge": JudgeWinRate, "tools": ToolUse}
TASK_SPECS = "bpb:PATH, gsm8k[:PATH], mc:PATH, world, tools[:arithmetic|lookup], pairs:PATH, judge:PATH"


def parse_tasks(text: str, text_field: str = "text") -> list:
    """`--tasks`: comma-separated task names, each with its file after a colon where it takes one
    (`text_field`: the text of bpb's .jsonl/.parquet records)."""
    tasks = []
    for spec in [s.strip() for s in text.split(",") if s.strip()] or [""]:
        kind, _, argument = spec.partition(":")
        if kind not in TASKS:
            raise OrchardError(f"--tasks: unknown task '{kind or spec}' (known: {TASK_SPECS})")
        if kind == "world":
            if argument:
                raise OrchardError(f"--tasks: 'world' takes no file, got '{spec}'")
            tasks.append(WorldTask())
        elif kind == "gsm8k":
            tasks.append(GSM8K(argument or None, name=spec))
        elif kind == "tools":
            if argument and argument not in TOOL_TASKS:
                raise OrchardError(f"--tasks: 'tools' takes {' or '.join(TOOL_TASKS)}, got '{spec}'")
            tasks.append(ToolUse(argument or None, name=spec))
        elif not argument:
            raise OrchardError(f"--tasks: '{kind}' needs a file: {kind}:PATH")
        elif kind == "bpb":
            tasks.append(BitsPerByte(argument, name=spec, text_field=text_field))
        else:
            tasks.append(TASKS[kind](argument, name=spec))
    return tasks


def run_task(task, subject: Subject, options: EvalOptions) -> TaskResult:
    started = time.perf_counter()
    result = task.run(subject, options)
    result.seconds = time.perf_counter() - started
    return result
