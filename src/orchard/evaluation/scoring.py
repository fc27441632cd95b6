"""The two primitives of every evaluation: the log-likelihood of a continuation given a context,
and replies generated for many prompts at once.

`continuation_log_likelihoods` is what multiple choice, preference accuracy and lm-evaluation-
harness's `loglikelihood` ask for: requests are sorted longest first (so a batch pads little and
the first batch shows at once whether memory suffices, as lm-eval's own `hf` model does), padded
on the right (causal attention: padding after a row changes nothing before it), and the output
projection runs only on the positions that predict a continuation.

`generate_replies` runs prompts through the serving engine's continuous batching: a reply that
ends early frees its row for the next prompt, so a task whose replies range from 3 to 256 tokens
runs at the batch size, not at the pace of its longest reply per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..peft.lora import active_adapter
from ..serve.engine import Delta, Engine, Sampling, Sequence as EngineSequence


@torch.no_grad()
def continuation_log_likelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                                 batch_size: int = 16, max_length: int | None = None,
                                 progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation
    after the context, and whether greedy decoding would have produced it (lm-eval's `is_greedy`).
    A pair longer than `max_length` (default: the model's positions) loses tokens from the left of
    its context, as lm-eval's models do. `progress(n)` is called after each batch of n requests."""
    if any(not continuation for _, continuation in requests):
        raise ValueError("every continuation needs at least one token")
    if any(not context for context, _ in requests):
        raise ValueError("every context needs at least one token (a BOS or end-of-text token for none)")
    limit = max_length or model.config.max_position_embeddings
    device = model.lm_head.weight.device
    rows = []  # (input ids, continuation ids) with the input cut to `limit` tokens from the left
    for context, continuation in requests:
        whole = list(context) + list(continuation)
        rows.append((whole[-(limit + 1):-1], list(continuation)[-limit:]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        longest = len(rows[chunk[0]][0])
        ids = torch.zeros(len(chunk), longest, dtype=torch.long, device=device)
        for row, index in enumerate(chunk):
            ids[row, :len(rows[index][0])] = torch.tensor(rows[index][0], device=device)
        hidden = model(ids, compute_logits=False, output_hidden_states=True).hidden_states[-1]
        # The output projection only on the positions that predict a continuation token, all rows at once.
        lengths = [len(rows[index][1]) for index in chunk]
        batch_rows = torch.tensor([row for row, n in enumerate(lengths) for _ in range(n)], device=device)
        positions = torch.tensor([p for index in chunk for p in range(len(rows[index][0]) - len(rows[index][1]),
                                                                     len(rows[index][0]))], device=device)
        targets = torch.tensor([t for index in chunk for t in rows[index][1]], device=device)
        logits = model.lm_head(hidden[batch_rows, positions]).float()
        token_log_probs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        hits = logits.argmax(-1) == targets
        sums = torch.zeros(len(chunk), device=device).index_add_(0, batch_rows, token_log_probs)
        misses = torch.zeros(len(chunk), dtype=torch.long, device=device).index_add_(0, batch_rows, (~hits).long())
        for index, total, missed in zip(chunk, sums.tolist(), misses.tolist()):
            results[index] = (total, missed == 0)
        if progress is not None:
            progress(len(chunk))
    return results


def generate_replies(model, tokenizer, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling],
                     end_ids: Sequence[int], batch_size: int = 32, autocast=None,
                     progress: Callable[[int], None] | None = None) -> list[str]:
    """The reply to each prompt (token ids), each with its own sampling settings (greedy at
    temperature 0, a seed for reproducible samples), through the serving engine on this thread.
    A prompt too long for the model keeps its last tokens, leaving room for its `max_tokens`. An
    adapter checkpoint replies with its adapter (`active_adapter`).
    `progress(1)` is called as each reply ends."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size, max_queue=max(len(prompts), 1),
                    default_adapter=active_adapter(model), **({"autocast": autocast} if autocast is not None else {}))
    texts = [""] * len(prompts)
    finished = [False] * len(prompts)

    def receiver(index: int):
        def on_delta(delta: Delta) -> None:
            texts[index] += delta.text
            if delta.finish_reason is not None:
                finished[index] = True
                if delta.finish_reason == "error":
                    raise RuntimeError(f"generation failed on prompt {index}")
                if progress is not None:
                    progress(1)
        return on_delta

    sequences = []
    for index, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        room = max(engine.max_model_len - sampling.max_tokens, 1)
        sequences.append(EngineSequence(list(prompt)[-room:], sampling, frozenset(end_ids), receiver(index)))
    if not sequences:
        return []
    engine.submit(sequences)
    engine.after_step = lambda: engine.busy() or engine.stop()
    engine.run()
    if not all(finished):
        raise RuntimeError(f"generation stopped with {finished.count(False)} replies unfinished")
    return texts
