"""How a task is scored: greedy exact match on built-in tasks, likelihood on the others."""

from __future__ import annotations

import math

import torch

from ...data.conversations import collate_padded
from ...data.packing import PackedSequences
from ...evaluation.completion import chat_exact_match
from ...evaluation.language_modeling import evaluate_language_modeling
from ...losses.tokens import IGNORE_INDEX
from ...training.objectives import summed_token_loss
from .tasks import Task


def mean_likelihood(model, examples: list, pad_id: int, batch_size: int = 16) -> float:
    """exp(-mean token loss) on the supervised tokens of `examples`."""
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_padded(examples[start:start + batch_size], pad_id).items()}
            loss_sum += summed_token_loss(model, batch).item()
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    return math.exp(-loss_sum / max(tokens, 1))


def score_task(model, tokenizer, task: Task) -> float:
    """Higher is better, in [0, 1]: exact match, or the held-out likelihood per token (conversations)
    or per byte (text: 2 ** -bits_per_byte)."""
    if task.text is not None:
        windows = PackedSequences(task.text.scored, task.text.window)
        model.eval()
        bpb = evaluate_language_modeling(model, windows, task.text.token_bytes, batch_size=16)["val_bpb"]
        return 2.0 ** -bpb
    if task.items is not None:
        return chat_exact_match(model, tokenizer, task.items).accuracy
    return mean_likelihood(model, task.scored, tokenizer.pad_id)


def task_value(task: Task, score: float) -> float:
    """A score in the task's own unit: bits per byte for text (lower is better), else the score."""
    return -math.log2(score) if task.text is not None else score


def format_value(task: Task, score: float) -> str:
    return f"{task_value(task, score):.3f} bpb" if task.text is not None else f"{score:.0%}"
