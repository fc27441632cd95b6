"""Models as rewards: a reward model's score (RLHF), or a judge model's parsed grade (RLAIF)."""

from __future__ import annotations

import re

import torch

from ..checkpoint import load_checkpoint
from ..data.conversations import Conversation, collate_padded, tokenize_conversation
from ..errors import OrchardError
from ..model.generation import SamplingConfig, generate_text

JUDGE_PROMPT = ("Grade the answer to the question from 0 (wrong or unhelpful) to 10 (correct and helpful).\n"
                "Question: {question}\nAnswer: {answer}")
"""What a judge is asked, per reply. A judge trained with `judge_conversations` answers with the grade alone."""

_GRADE = re.compile(r"\b(10|[0-9])\b")
BATCH_SIZE = 32


def _dialogue(prompt: list[dict]) -> str:
    """The prompt's turns as plain text for the judge (system prompts left out)."""
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def parse_grade(judgement: str) -> float | None:
    """A judge's reply -> its first grade 0..10 scaled to [0, 1]; None when it gives none."""
    found = _GRADE.search(judgement)
    return int(found.group(1)) / 10 if found else None


def judge_conversations(pairs: list[dict], good: int = 10, bad: int = 0) -> list[dict]:
    """Training conversations for a judge, from preference pairs (`{"prompt", "chosen", "rejected"}`
    with message lists, as `orchard.data.synthetic.preference_pairs` makes): the chosen reply graded
    `good`, the rejected one `bad`."""
    conversations = []
    for pair in pairs:
        question = _dialogue(pair["prompt"])
        for reply, grade in ((pair["chosen"], good), (pair["rejected"], bad)):
            answer = reply[-1]["content"]
            conversations.append({"messages": [
                {"role": "user", "content": JUDGE_PROMPT.format(question=question, answer=answer)},
                {"role": "assistant", "content": str(grade)}]})
    return conversations


class RewardModelScorer:
    """The score an orchard reward model gives each (prompt, reply), read at the last token exactly
    as `orchard reward` trains it."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        checkpoint = load_checkpoint(path, device=device)
        if not checkpoint.model.config.num_labels:
            raise OrchardError(f"rewards: {checkpoint.path} has no score head; train one with `orchard reward`")
        self.model, self.tokenizer, self.path = checkpoint.model.eval(), checkpoint.tokenizer, checkpoint.path

    @torch.no_grad()
    def __call__(self, prompts, completions, answers=None, **kwargs) -> list[float | None]:
        scores: list[float | None] = [None] * len(completions)
        rows, examples = [], []
        limit = self.model.config.max_position_embeddings
        for i, (prompt, reply) in enumerate(zip(prompts, completions)):
            example = tokenize_conversation(Conversation(prompt + [{"role": "assistant", "content": reply}],
                                                         f"sample {i}"), self.tokenizer, limit,
                                            "last_assistant", "truncate_prompt")
            if example is not None:  # a reply longer than the reward model's context fails alone
                rows.append(i)
                examples.append(example)
        for start in range(0, len(examples), BATCH_SIZE):
            batch = collate_padded(examples[start:start + BATCH_SIZE], self.tokenizer.pad_id)
            device = self.model.lm_head.weight.device
            values = sequence_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for row, value in zip(rows[start:start + BATCH_SIZE], values.tolist()):
                scores[row] = value
        return scores


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) score-head output at each right-padded row's last real token."""
    scores = model(input_ids, attention_mask=attention_mask, compute_logits=False).scores[..., 0]
    last = attention_mask.sum(-1) - 1
    return scores[torch.arange(len(last), device=scores.device), last].float()


class JudgeScorer:
    """A chat model asked, for each reply, `JUDGE_PROMPT`; its greedy reply parsed by `parse_grade`.
    A reply with no grade in it is a failed reward."""

    def __init__(self, path: str, device: str | torch.device = "cpu", max_new_tokens: int = 6):
        checkpoint = load_checkpoint(path, device=device)
        self.model, self.tokenizer = checkpoint.model.eval(), checkpoint.tokenizer
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        self.turn_end = [i for i in (self.tokenizer.token_to_id("<|im_end|>"),) if i is not None]

    def judgements(self, prompts, completions) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": JUDGE_PROMPT.format(question=_dialogue(prompt), answer=reply.strip())}],
            add_generation_prompt=True) for prompt, reply in zip(prompts, completions)]
        replies = []
        for start in range(0, len(texts), BATCH_SIZE):
            replies += generate_text(self.model, self.tokenizer, texts[start:start + BATCH_SIZE], self.sampling,
                                     add_bos=False, end_token_ids=self.turn_end)
        return replies

    def __call__(self, prompts, completions, answers=None, **kwargs) -> list[float | None]:
        return [parse_grade(text) for text in self.judgements(prompts, completions)]

    def win_rate(self, prompts, replies: list[str], baseline: list[str]) -> dict[str, float]:
        """How often the judge grades `replies` above `baseline` (the same prompts' replies from
        another model): wins plus half the ties, over the prompts where both grades parsed."""
        grades = self(prompts, replies)
        baseline_grades = self(prompts, baseline)
        pairs = [(a, b) for a, b in zip(grades, baseline_grades) if a is not None and b is not None]
        wins = sum(a > b for a, b in pairs)
        ties = sum(a == b for a, b in pairs)
        return {"win_rate": (wins + ties / 2) / max(len(pairs), 1), "wins": wins, "ties": ties,
                "losses": len(pairs) - wins - ties, "unparsed": len(prompts) - len(pairs),
                "mean_grade": sum(a for a, _ in pairs) / max(len(pairs), 1),
                "baseline_mean_grade": sum(b for _, b in pairs) / max(len(pairs), 1)}
