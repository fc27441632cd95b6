"""Batched sampling with the KV cache: greedy, temperature, top-k, top-p, repetition penalty,
stop strings and a token budget.

Prompts of different lengths are left-padded into one batch; the attention mask hides the padding
and position ids start at each prompt's first real token, so a prompt is continued the same way
alone or in a batch. `use_cache=False` recomputes the whole sequence every step; greedy decoding
gives the same tokens either way (tested), which is how the cache is checked.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import CausalLM, causal_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    """Most tokens to generate per sequence."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy decoding."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p; 1 disables."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (as in CTRL and transformers)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sequence; the output is cut before them."""
    seed: int | None = None
    """Seed of the sampler, for repeatable samples."""
    compile: bool = False
    """Decode with a static KV cache and a compiled step (torch.compile): on the CPU ~1.5x the tokens/s
    at batch 1, for a first call that compiles (seconds; again for each new batch size or length
    bucket). The same tokens as uncompiled decoding, within floating-point rounding."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must not be negative, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits (multiply negative ones) of tokens marked in `seen` (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, config: SamplingConfig,
                generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row from (B, V) logits; `generator` is one for the batch, or one per row.

    Sampled by inverse transform: one uniform number per row, placed on the cumulative
    probabilities. That draws one random number a row rather than the vocabulary's worth that
    `torch.multinomial` draws (on the CPU, 16 rows of a 2k vocabulary: ~0.6 ms a step, 13% of a GRPO
    rollout); a token of probability 0 (filtered out) is never chosen."""
    if config.temperature == 0:
        return logits.argmax(-1)
    probabilities = filter_top_k_top_p(logits.float() / config.temperature, config.top_k, config.top_p).softmax(-1)
    if isinstance(generator, list):
        uniform = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generator])
    else:
        uniform = torch.rand(len(probabilities), generator=generator, device=logits.device)
    cumulative = probabilities.cumsum(-1)
    # Scaled by each row's total, which rounding leaves a little off 1.
    tokens = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)[:, 0]
    return tokens.clamp_(max=logits.size(-1) - 1)


def packs_weights(model: CausalLM, rows: int) -> bool:
    """Whether decoding `rows` rows a step multiplies by packed weights (`packed_linears`): fp32 on a
    CPU with MKL, two rows or more (for one row MKL takes another kernel, whose results differ)."""
    weight = model.lm_head.weight
    return (rows >= 2 and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkl.is_available() and not torch.is_autocast_enabled("cpu"))


def _packed_linear(linear: nn.Linear, packed: torch.Tensor, rows: int, any_rows: bool,
                   x: torch.Tensor) -> torch.Tensor:
    count = x.numel() // x.size(-1)
    if count != rows and not any_rows:  # the prompts' pass: more rows than a decoding step's
        return F.linear(x, linear.weight, linear.bias)
    return torch.ops.mkl._mkl_linear(x, packed, linear.weight, linear.bias, count)


@contextlib.contextmanager
def packed_linears(model: CausalLM, rows: int, any_rows: bool = False) -> Iterator[None]:
    """While decoding, every plain fp32 linear layer of `model` multiplies a step's `rows` rows by its
    weight packed once for them (MKL's sgemm_pack), which sgemm otherwise redoes at every call: at
    batch 16 the 13.8M benchmark model's matmuls alone take 2.8 instead of 4.9 ms a step, and its
    greedy decoding runs ~13% faster, with the same results bit for bit (tested). The packed copies
    cost the weights' size again, for the call.

    `any_rows`: every call multiplies by the packed weights, whatever its row count. A row's result
    then does not depend on how many rows there are, from two up (plain sgemm's changes at 16 rows;
    tested for the server, whose batches grow and shrink)."""
    linears = [m for m in model.modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32 and "forward" not in m.__dict__]
    for linear in linears:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)
        linear.forward = functools.partial(_packed_linear, linear, packed, rows, any_rows)
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward


STATIC_CACHE_MIN_SLOTS = 64
"""A compiled decoder's cache holds a power of two of slots, at least this many, so that prompts and
budgets of nearby lengths (the turns of a chat) share one compilation."""


def _decode_step(model: CausalLM, tokens: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache) -> torch.Tensor:
    return model(tokens, attention_mask=mask, position_ids=position_ids, cache=cache, logits_to_keep=1).logits[:, -1]


@functools.cache
def _compiled_decode_step(device_type: str) -> Callable:
    """On the CPU the C++ wrapper calls the step's kernels with no Python between them; on CUDA the
    step replays as one CUDA graph (the static cache's buffers are marked static, so the graph
    writes into them rather than into copies)."""
    options = {"triton.cudagraphs": True} if device_type == "cuda" else {"cpp_wrapper": True}
    return torch.compile(_decode_step, dynamic=False, options=options)


class _Decoder:
    """The model over the prompts, then over one new token per row at a time, with a KV cache: a
    growing one, or (compiled) a static one that every step attends over whole, under a mask of the
    slots written so far, so that each step has the same shapes and runs one compiled graph."""

    def __init__(self, model: CausalLM, attention_mask: torch.Tensor, max_new_tokens: int, compiled: bool):
        self.model, self.compiled = model, compiled
        batch_size, longest = attention_mask.shape
        self.padded = not bool(attention_mask.all())
        if compiled:
            slots = max(STATIC_CACHE_MIN_SLOTS, 2 ** math.ceil(math.log2(longest + max_new_tokens)))
            self.cache = model.new_cache(batch_size, slots, static=True)
            # Which slots each row's queries may see: its prompt's real tokens, then each new token.
            self.visible = torch.zeros(batch_size, slots, dtype=torch.bool, device=attention_mask.device)
            self.visible[:, :longest] = attention_mask.bool()
            self.next_position = attention_mask.sum(1, keepdim=True)  # (B, 1) position of a row's next token
            self.slot = longest
        else:
            self.cache = model.new_cache(batch_size, longest + max_new_tokens)
        self.attention_mask = attention_mask

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits after the prompts."""
        if not self.compiled:
            mask = self.attention_mask if self.padded else None  # one length: causal attention needs none
            return self.model(input_ids, attention_mask=mask, cache=self.cache, logits_to_keep=1).logits[:, -1]
        T = input_ids.size(1)
        position_ids = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.positions = torch.arange(T, device=input_ids.device)
        mask = causal_mask(self.visible, position_ids, 0, self.visible.size(1))
        return self.model(input_ids, attention_mask=mask, position_ids=position_ids, cache=self.cache,
                          logits_to_keep=1).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits after one more token per row, `tokens` (B,)."""
        if not self.compiled:
            mask = None
            if self.padded:
                self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens[:, None])], dim=1)
                mask = self.attention_mask
            return self.model(tokens[:, None], attention_mask=mask, cache=self.cache, logits_to_keep=1).logits[:, -1]
        self.cache.positions = torch.full((1,), self.slot, device=tokens.device)
        self.visible[:, self.slot] = True
        step = _compiled_decode_step(tokens.device.type)
        logits = step(self.model, tokens[:, None], self.next_position, self.visible[:, None, None, :], self.cache)
        self.slot += 1
        self.next_position = self.next_position + 1
        return logits


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], config: SamplingConfig, eos_id: int | Sequence[int],
             pad_id: int, use_cache: bool = True, is_finished: Callable[[int, list[int]], bool] | None = None,
             on_tokens: Callable[[torch.Tensor], None] | None = None, keep_end_token: bool = False,
             row_seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each, up to (not including) an end token;
    `keep_end_token` includes it (RL trains the policy to end its replies too).

    `eos_id` is one end token or several (a chat model's turn ends at `<|im_end|>` as well).

    `is_finished(row, tokens)` lets the caller end a row early (stop strings); `on_tokens` receives
    each step's (B,) new tokens, for streaming. `row_seeds` seeds each row's sampler on its own
    (instead of `config.seed` seeding the batch's), so a row samples the same tokens in any batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    end_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    device = model.lm_head.weight.device
    batch_size, longest = len(prompts), max(len(p) for p in prompts)
    if longest + config.max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds the "
                         f"model's {model.config.max_position_embeddings} positions")
    input_ids = torch.full((batch_size, longest), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[row, longest - len(prompt):] = 1
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    if row_seeds is not None:
        if len(row_seeds) != batch_size:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {batch_size} prompts")
        generator = [torch.Generator(device=device).manual_seed(seed) for seed in row_seeds]
    penalised = config.repetition_penalty != 1.0
    if penalised:
        seen = torch.zeros((batch_size, model.config.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, attention_mask.bool())

    decoder = _Decoder(model, attention_mask, config.max_new_tokens, config.compile) if use_cache else None
    # Not compiled: inductor takes a packed weight only as a constant of the graph.
    packs = use_cache and not config.compile and packs_weights(model, batch_size)
    with packed_linears(model, batch_size) if packs else contextlib.nullcontext():
        outputs: list[list[int]] = [[] for _ in range(batch_size)]
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        tokens = input_ids[:, -1]  # (B,) each step's new tokens
        for new in range(config.max_new_tokens):
            if decoder is None:
                mask = None if bool(attention_mask.all()) else attention_mask  # causal attention needs none
                logits = model(input_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            elif new == 0:
                logits = decoder.prefill(input_ids)
            else:
                logits = decoder.step(tokens)
            if penalised:
                logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
            tokens = next_tokens(logits, config, generator)
            tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
            if on_tokens is not None:
                on_tokens(tokens)
            for row, token in enumerate(tokens.tolist()):
                if finished[row]:
                    continue
                if token in end_ids:
                    finished[row] = True
                    if keep_end_token:
                        outputs[row].append(token)
                    continue
                outputs[row].append(token)
                if is_finished is not None and is_finished(row, outputs[row]):
                    finished[row] = True
            if bool(finished.all()):
                break
            if penalised:
                seen[torch.arange(batch_size, device=device), tokens] = True
            if decoder is None:
                input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
                attention_mask = torch.cat([attention_mask, torch.ones_like(tokens[:, None])], dim=1)
    return outputs


def generate_text(model: CausalLM, tokenizer, prompts: list[str], config: SamplingConfig,
                  on_text: Callable[[str], None] | None = None, add_bos: bool | None = None,
                  end_token_ids: Sequence[int] = ()) -> list[str]:
    """Continue text prompts; with `on_text`, the first prompt's continuation is streamed to it.
    Generation ends at end-of-text, at any of `end_token_ids`, or at a stop string.

    `tokenizer` is anything with encode/decode/eos_id/pad_id (orchard's Tokenizer). Stop strings are
    matched on decoded text, since a stop string need not fall on token boundaries.
    """
    if add_bos is None:
        # Models whose tokenizer puts BOS first (Llama, Mistral) expect it; chat prompts whose
        # template writes the BOS itself pass add_bos=False.
        add_bos = getattr(tokenizer, "adds_bos_by_default", False)
    encoded = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    if any(not ids for ids in encoded):
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        encoded = [ids or [start] for ids in encoded]

    def stop_index(text: str) -> int:
        hits = [text.find(s) for s in config.stop if s and s in text]
        return min(hits) if hits else -1

    def is_finished(row: int, tokens: list[int]) -> bool:
        return stop_index(tokenizer.decode(tokens)) >= 0

    streamed = {"tokens": [], "printed": 0}

    def stream(tokens: torch.Tensor) -> None:
        streamed["tokens"].append(int(tokens[0]))
        text = tokenizer.decode([t for t in streamed["tokens"] if t not in (tokenizer.eos_id, tokenizer.pad_id)])
        cut = stop_index(text)
        visible = text if cut < 0 else text[:cut]
        if cut < 0:
            # Hold back a trailing replacement character: the rest of a multi-byte character is coming.
            visible = visible.rstrip("\ufffd")
            # Hold back an ending that may be the start of a stop string, until it is known not to be.
            held = max((n for s in config.stop for n in range(1, len(s)) if visible.endswith(s[:n])), default=0)
            visible = visible[:len(visible) - held]
        if len(visible) > streamed["printed"]:
            on_text(visible[streamed["printed"]:])
            streamed["printed"] = len(visible)

    outputs = generate(model, encoded, config, [tokenizer.eos_id, *end_token_ids], tokenizer.pad_id,
                       is_finished=is_finished if config.stop else None,
                       on_tokens=stream if on_text else None)
    texts = []
    for tokens in outputs:
        text = tokenizer.decode(tokens)
        cut = stop_index(text)
        texts.append(text if cut < 0 else text[:cut])
    if on_text is not None and len(texts[0]) > streamed["printed"]:
        on_text(texts[0][streamed["printed"]:])  # what was held back, now that no more is coming
    return texts
