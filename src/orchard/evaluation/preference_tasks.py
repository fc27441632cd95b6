"""Tasks that compare replies: preference accuracy on held-out pairs (`pairs:PATH`) and a judge's
win rate against a reference checkpoint (`judge:PATH`)."""

from __future__ import annotations

import re
import sys

import torch

from ..data.conversations import collate_padded
from ..data.preferences import read_preference_pairs, read_prompts, tokenize_preference_pair
from ..errors import OrchardError
from ..rewards.models import JUDGE_PROMPT, parse_grade, sequence_scores
from ..serve.engine import Sampling
from .subject import EvalOptions, Subject, TaskResult, progress_bar

JUDGE_PAIR_PROMPT = ("Which answer to the question is better? Reply with A or B.\nQuestion: {question}\n"
                     "Answer A: {first}\nAnswer B: {second}")
_VERDICT = re.compile(r"\b([AB])\b")


class PreferencePairs:
    """Held-out preference pairs: a reward model (a checkpoint with a score head) is right when it
    scores the chosen reply above the rejected one; a policy when its implicit reward, its
    log-likelihood ratio to the reference (`options.reference`, else its parent: DPO's reference),
    is higher for the chosen reply."""

    def __init__(self, path, name: str):
        self.name = name
        self.pairs = list(read_preference_pairs(path, key=f"--tasks {name}"))

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        limit = subject.model.config.max_position_embeddings
        tokenized = [t for pair in self.pairs[:options.limit]
                     if (t := tokenize_preference_pair(pair, subject.tokenizer, limit, "skip")) is not None]
        if not tokenized:
            raise OrchardError(f"{self.name}: no pair fits in the model's {limit} positions")
        rows = [conversation for pair in tokenized for conversation in pair]  # chosen, rejected, chosen, ...
        if subject.model.config.num_labels:
            values = _batched(subject, rows, options, lambda m, b: sequence_scores(m, b["input_ids"], b["attention_mask"]))
            kind = "reward model"
        else:
            reference_path = options.reference or (subject.record.get("parent") or {}).get("path")
            if not reference_path:
                raise OrchardError(f"{self.name}: {subject.path} has no parent to be the reference of its implicit "
                                   "reward; name one with --reference")
            reference = Subject.load(reference_path, subject.runtime, chat=True)
            values = _batched(subject, rows, options, _summed_log_probs) - \
                _batched(reference, rows, options, _summed_log_probs)
            kind = f"implicit reward against {reference.path}"
        margins = values[0::2] - values[1::2]
        print(f"{self.name}: {subject.path}: {kind}", file=sys.stderr)
        return TaskResult({"accuracy": float((margins > 0).float().mean()), "mean_margin": float(margins.mean())},
                          "accuracy", len(tokenized))


def _summed_log_probs(model, batch) -> torch.Tensor:
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                 log_probs_of=batch["labels"]).log_probs.sum(-1)


@torch.no_grad()
def _batched(subject: Subject, rows, options: EvalOptions, score) -> torch.Tensor:
    device, values = subject.model.lm_head.weight.device, []
    with progress_bar(len(rows), f"scoring with {subject.path.parent.name}", "reply") as bar:
        for start in range(0, len(rows), options.batch_size):
            batch = {k: v.to(device) for k, v in collate_padded(rows[start:start + options.batch_size],
                                                                  subject.tokenizer.pad_id).items()}
            with subject.autocast():
                values.append(score(subject.model, batch).float().cpu())
            bar.update(len(batch["input_ids"]))
    return torch.cat(values)


class JudgeWinRate:
    """The checkpoint's greedy replies against the reference checkpoint's (`options.reference`),
    judged by `options.judge`, in one of two ways (`options.judge_mode`):

    - "pairwise": the judge sees both replies (`JUDGE_PAIR_PROMPT`) twice, once with each first; a
      win needs it to prefer the checkpoint's reply in both orders, a loss the reference's in both,
      anything else is a tie (a judge that prefers whichever comes first decides nothing);
    - "grade": the judge grades each reply alone, 0 to 10 (`JUDGE_PROMPT`, what orchard's RLAIF
      judges are trained on, `orchard.rewards.models.judge_conversations`); the higher grade wins,
      equal grades tie. Each reply is judged alone, so there is no position to swap.

    Win rate = (wins + ties / 2) / judged, over the items whose verdicts all parsed."""

    def __init__(self, path, name: str):
        self.name = name
        self.items = list(read_prompts(path, key=f"--tasks {name}"))

    def run(self, subject: Subject, options: EvalOptions) -> TaskResult:
        if not options.judge or not options.reference:
            raise OrchardError(f"{self.name}: a win rate needs --judge CHECKPOINT and --reference CHECKPOINT")
        items = self.items[:options.limit]
        replies = _chat_replies(subject, items, options)
        baseline = _chat_replies(Subject.load(options.reference, subject.runtime, chat=True), items, options)
        judge = Subject.load(options.judge, subject.runtime, chat=True)
        questions = [_question(item.prompt) for item in items]
        if options.judge_mode == "grade":
            asks = [JUDGE_PROMPT.format(question=q, answer=r.strip()) for q, r in zip(questions * 2, replies + baseline)]
        else:
            asks = [JUDGE_PAIR_PROMPT.format(question=q, first=a.strip(), second=b.strip())
                    for q, (a, b) in zip(questions * 2, [*zip(replies, baseline), *zip(baseline, replies)])]
        judgements = judge.replies([judge.chat_prompt([{"role": "user", "content": ask}]) for ask in asks],
                                   [Sampling(6, temperature=0.0) for _ in asks], options, "judging")
        if options.judge_mode == "grade":
            grades = [parse_grade(text) for text in judgements]
            outcomes = graded_outcomes(grades[:len(items)], grades[len(items):])
        else:
            verdicts = [parse_verdict(text) for text in judgements]
            outcomes = pairwise_outcomes(verdicts[:len(items)], verdicts[len(items):])
        examples = [{"question": q, "reply": a, "reference": b, "judgements": [j1, j2], "outcome": o}
                    for q, a, b, j1, j2, o in list(zip(questions, replies, baseline, judgements,
                                                       judgements[len(items):], outcomes))[:5]]
        return TaskResult(win_rate(outcomes), "win_rate", len(items), examples=examples)


def _chat_replies(subject: Subject, items, options: EvalOptions) -> list[str]:
    prompts = [subject.chat_prompt(item.prompt) for item in items]
    return subject.replies(prompts, [Sampling(options.max_new_tokens, temperature=0.0) for _ in prompts],
                           options, f"replies of {subject.path.parent.name}")


def _question(messages: list[dict]) -> str:
    turns = [m for m in messages if m["role"] != "system"]
    return turns[0]["content"] if len(turns) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def parse_verdict(text: str) -> str | None:
    """The judge's first standalone 'A' or 'B', or None."""
    found = _VERDICT.search(text)
    return found.group(1) if found else None


def pairwise_outcomes(first: list[str | None], swapped: list[str | None]) -> list[str | None]:
    """Each item's outcome from its two verdicts, `first` with the checkpoint's reply as A and
    `swapped` with it as B: "win" when both prefer it, "loss" when both prefer the reference, "tie"
    when they disagree (position bias), None when either did not parse."""
    if len(first) != len(swapped):
        raise ValueError(f"{len(first)} verdicts in one order, {len(swapped)} in the other")
    outcomes = {("A", "B"): "win", ("B", "A"): "loss", ("A", "A"): "tie", ("B", "B"): "tie"}
    return [outcomes.get((a, b)) for a, b in zip(first, swapped)]


def graded_outcomes(grades: list[float | None], baseline: list[float | None]) -> list[str | None]:
    """Each item's outcome from the grades of the checkpoint's reply and of the reference's."""
    return [None if a is None or b is None else "win" if a > b else "loss" if a < b else "tie"
            for a, b in zip(grades, baseline)]


def win_rate(outcomes: list[str | None]) -> dict[str, float]:
    """(wins + ties / 2) / judged; `unparsed` items are left out."""
    wins, losses, ties = (outcomes.count(kind) for kind in ("win", "loss", "tie"))
    judged = wins + losses + ties
    return {"win_rate": (wins + ties / 2) / judged if judged else float("nan"), "wins": wins, "losses": losses,
            "ties": ties, "unparsed": len(outcomes) - judged}
