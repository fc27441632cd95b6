"""The serving engine: one thread owns the model and decodes every running sequence together
(continuous batching).

A sequence joins between two decoding steps: its prompt is run (prefill; with the others that
arrived meanwhile, where that cannot change its numbers) into a free slot of the KV cache, and from
the next step on it decodes with the others. It leaves when it ends (an end
token, a stop string, its token budget), when its client goes away (`cancel`) or at its deadline;
its slot is free at once for the next waiting sequence.

Each request gets the text it would get alone, whatever else is in the batch (greedy, fp32;
tested): a matmul's rounding may depend on its row count, so a decoding step runs at least as many
rows as make it stop depending on it (`Engine.min_rows`, empty rows padding), adapters are applied
over all rows and kept in their own (`adapter_routing`), and each row attends over its own keys
only (`SlotCache.attend`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..model import CausalLM
from ..model.generation import SamplingConfig, next_tokens, packed_linears, packs_weights
from ..peft.lora import adapter_routing


PREFILL_TOKENS_PER_STEP = 512
"""Prompt tokens run between two decoding steps: a burst of new requests joins over a few steps
instead of stalling the running ones for all of its prompts."""


class SlotCache:
    """Keys and values of up to `slots` sequences, each in its own slot of `capacity` positions and
    with its own length. The model hands it each layer's new keys and values (`attends`): it writes
    them at each row's length and attends that row's queries over that row's keys alone, so a row
    computes the same numbers in any batch. `begin` says which slot each row of the next forward
    pass is (rows after those pad, and their output is zero)."""

    attends = True
    length = 0  # the model's notion of a shared past; the engine passes positions itself

    def __init__(self, model: CausalLM, slots: int, capacity: int):
        config, weight = model.config, model.lm_head.weight
        shape = (slots, config.num_key_value_heads, capacity, config.resolved_head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = [0] * slots
        self.begin([], weight.device)

    def begin(self, slots: list[int], device: torch.device, prompts: list[int] | None = None) -> None:
        """The slots of the next forward pass's rows (any rows after them pad); for a pass over
        prompts, the slot and length of each prompt, laid end to end in one row."""
        self.slots = slots
        self.prompts = prompts
        self.slot_index = torch.tensor(self.slots, device=device)
        self.position_index = torch.tensor([self.lengths[slot] for slot in self.slots], device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) attention output of the queries over their own slot's keys (zero at
        padding)."""
        T, real = q.size(2), len(self.slots)
        keys, values = self.keys[layer], self.values[layer]
        gqa = keys.size(1) != q.size(1)
        if self.prompts is None:  # a decoding step (T = 1): every row's new key and value in one write
            keys[self.slot_index, :, self.position_index] = k[:real, :, 0]
            values[self.slot_index, :, self.position_index] = v[:real, :, 0]
            queries = q.split(1)
            # One row at a time, over exactly its own keys: its numbers do not depend on the other rows.
            outputs = [F.scaled_dot_product_attention(queries[row], keys[slot, :, :self.lengths[slot] + 1][None],
                                                      values[slot, :, :self.lengths[slot] + 1][None], enable_gqa=gqa)
                       for row, slot in enumerate(self.slots)]
        else:  # prompts laid end to end in one row, each from position 0, causal
            outputs, start = [], 0
            for slot, length in zip(self.slots, self.prompts):
                keys[slot, :, :length] = k[0, :, start:start + length]
                values[slot, :, :length] = v[0, :, start:start + length]
                outputs.append(F.scaled_dot_product_attention(
                    q[:, :, start:start + length], keys[slot, :, :length][None], values[slot, :, :length][None],
                    is_causal=True, enable_gqa=gqa))
                start += length
            if start < T:  # padding after the prompts
                outputs.append(q.new_zeros(1, q.size(1), T - start, q.size(3)))
            return torch.cat(outputs, dim=2)
        if real < q.size(0):
            outputs.append(q.new_zeros(q.size(0) - real, *q.shape[1:]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def advance(self, tokens: int) -> None:
        for row, slot in enumerate(self.slots):
            self.lengths[slot] += tokens if self.prompts is None else self.prompts[row]


@dataclass
class Sampling:
    """One sequence's sampling settings."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None
    """None: no log-probs; else the log-prob of each chosen token and of this many alternatives."""


@dataclass
class Delta:
    """What a sequence produced since its last delta: new text, the log-probs of its new tokens
    (when asked), and finally why it ended ("stop" or "length")."""
    text: str
    logprobs: list[dict]
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: Sampling
    end_ids: frozenset[int]
    on_delta: Callable[[Delta], None]
    """Called on the engine's thread; must not block."""
    adapter: str | None = None
    deadline: float | None = None
    """time.monotonic() after which the sequence ends ("length")."""
    cancelled: bool = False
    """Set by the caller (its client left): the engine drops the sequence at its next step."""
    submitted_at: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    emitted_chars: int = 0
    generator: torch.Generator | None = None


class QueueFull(Exception):
    """`submit` found no room in the queue for the sequences (the server answers 429)."""


class Engine:
    """Owns `model` on one thread (`run` or `start`); `submit` queues sequences for it from any thread.
    `autocast` makes the context each forward pass runs in (a runtime's bf16 autocast)."""

    def __init__(self, model: CausalLM, tokenizer, max_batch_size: int = 32, max_queue: int = 256,
                 max_model_len: int | None = None, autocast: Callable = contextlib.nullcontext,
                 default_adapter: str | None = None):
        self.model, self.tokenizer, self.autocast = model.eval(), tokenizer, autocast
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_model_len = min(max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings)
        self.cache = SlotCache(model, max_batch_size, self.max_model_len)
        self.adapted = any(hasattr(m, "lora") for m in model.modules())
        self.default_adapter = default_adapter
        """The adapter of sequences that name none: an adapter checkpoint's own (None: the base alone)."""
        # A matmul's rounding may depend on its row count, so a decoding step runs at least
        # `min_rows` rows (the missing ones padding), from where a row's numbers stop depending on
        # the count: 2 when every matmul is a plain fp32 linear layer with MKL's packed weights
        # (`packed_linears(any_rows=True)`), else 16 (plain sgemm; adapters, quantized layers).
        plain = all(type(m) is nn.Linear and m.weight.dtype == torch.float32
                    for m in model.modules() if "Linear" in type(m).__name__)
        with autocast():  # as the forward passes will run (no packing under bf16 autocast)
            packable = packs_weights(model, max_batch_size)
        self.min_rows = 2 if plain and packable and not self.adapted else min(16, max_batch_size)
        # Prompts run together only where every matmul has packed weights: a prompt alone is then
        # computed as in company (plain sgemm's rounding would change with the rows' count).
        self.batched_prefill = self.min_rows == 2
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch_size))
        self.wake = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.alive = False
        """True while the engine's loop runs (`start` or `run`)."""
        self.tokens_generated = 0
        self.token_times: deque[float] = deque(maxlen=16384)
        """When each of the latest tokens was generated: tokens/s over a recent window (metrics)."""
        self.after_step: Callable[[], None] | None = None
        """Called on the engine's thread after each step, once its sequences have had their deltas
        (the server wakes its event loop once per step, not once per token)."""
        self.on_first_token: Callable[[float], None] | None = None
        """Called with each sequence's time to first token, in seconds (metrics)."""
        self.failures = 0
        """Steps that raised (their sequences ended with finish_reason \"error\")."""

    # --- the callers' side -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the engine on a thread of its own (in-process use; `orchard serve` calls `run`)."""
        self.thread = threading.Thread(target=self.run, name="orchard-engine", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """Serve sequences on the calling thread until `stop`. `orchard serve` gives it the main
        thread: there PyTorch's CPU thread pool stays warm between the many small ops of a decoding
        step, where on another thread each op waits for the pool to wake (a batch-32 step of the
        quickstart model: 8 ms on the main thread, 21 ms on another)."""
        self.alive = True
        packs = self.min_rows == 2
        try:
            with packed_linears(self.model, self.max_batch_size, any_rows=True) if packs else contextlib.nullcontext():
                self._loop()
        finally:
            self.alive = False

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue `sequences` (all or none: QueueFull when the queue lacks room for them)."""
        with self.wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (at most {self.max_queue})")
            self.waiting.extend(sequences)
            self.wake.notify()

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop the thread, after letting queued and running sequences finish for up to
        `drain_seconds`."""
        deadline = time.monotonic() + drain_seconds
        while self.busy() and time.monotonic() < deadline and self.alive:
            time.sleep(0.02)
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    # --- the engine's thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopping:
                    return
            try:
                self._drop_finished()
                self._admit()
                if self.running:
                    self._decode_step()
            except Exception:  # a bug: fail the sequences it touched, log it, serve the next ones
                traceback.print_exc()
                self.failures += 1
                for sequence in list(self.running):
                    self._release(sequence)
                    sequence.on_delta(Delta("", [], finish_reason="error"))
            if self.after_step is not None:
                self.after_step()

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for sequence in list(self.running):
            if sequence.cancelled:
                self._release(sequence)
            elif sequence.deadline is not None and now > sequence.deadline:
                self._finish(sequence, "length")

    def _admit(self) -> None:
        """Prefill waiting sequences into free slots until this step's PREFILL_TOKENS_PER_STEP are
        spent (at least one sequence a step, while there is a slot): together, in one pass, where
        every matmul's rows are independent of their count (`batched_prefill`), else one by one."""
        budget, group = PREFILL_TOKENS_PER_STEP, []
        while self.free_slots and budget > 0:
            with self.wake:
                if not self.waiting:
                    break
                sequence = self.waiting.popleft()
            if sequence.cancelled:
                continue
            if sequence.deadline is not None and time.monotonic() > sequence.deadline:
                sequence.on_delta(Delta("", [], finish_reason="length"))
                continue
            budget -= len(sequence.prompt_ids)
            sequence.slot = self.free_slots.pop(0)
            self.cache.lengths[sequence.slot] = 0
            sequence.generator = torch.Generator(device=self.model.lm_head.weight.device)
            if sequence.sampling.seed is None:
                sequence.generator.seed()
            else:
                sequence.generator.manual_seed(sequence.sampling.seed)
            self.running.append(sequence)
            group.append(sequence)
            if not self.batched_prefill:
                self._prefill(group)
                group = []
        if group:
            self._prefill(group)

    @torch.no_grad()
    def _prefill(self, group: list[Sequence]) -> None:
        """Run the prompts of `group` laid end to end in one row (no padding between them to compute;
        at least `min_rows` tokens and output rows when batched), and take each one's first token."""
        device = self.model.lm_head.weight.device
        lengths = [len(s.prompt_ids) for s in group]
        minimum = self.min_rows if self.batched_prefill else 1
        ids = [token for s in group for token in s.prompt_ids]
        ids = torch.tensor([ids + [0] * (minimum - len(ids))], device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        positions = torch.cat([positions, positions.new_zeros(ids.size(1) - len(positions))])[None]
        ends = torch.tensor(lengths, device=device).cumsum(0) - 1
        ends = torch.cat([ends, ends.new_zeros(max(0, minimum - len(ends)))])  # padding rows of the head
        self.cache.begin([s.slot for s in group], device, lengths)
        with self._routing(group), self.autocast():
            hidden = self.model(ids, position_ids=positions, cache=self.cache, compute_logits=False,
                                output_hidden_states=True).hidden_states[-1][0]
            logits = self.model.lm_head(hidden[ends]).float()
        now = time.monotonic()
        for row, sequence in enumerate(group):
            self._take(sequence, logits[row])
            if self.on_first_token is not None:
                self.on_first_token(now - sequence.submitted_at)

    def _decode_step(self) -> None:
        """One new token for every running sequence, in a batch of at least `min_rows` rows."""
        device = self.model.lm_head.weight.device
        rows = list(self.running)
        tokens = torch.zeros(max(self.min_rows, len(rows)), 1, dtype=torch.long, device=device)
        tokens[:len(rows), 0] = torch.tensor([s.tokens[-1] for s in rows], device=device)
        logits = self._forward(tokens, rows)
        for row, sequence in enumerate(rows):
            self._take(sequence, logits[row])

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """(B, V) next-token logits after one more token per row, `ids` (B, 1); rows past
        `sequences` pad."""
        padding = ids.size(0) - len(sequences)
        self.cache.begin([s.slot for s in sequences], ids.device)
        starts = [self.cache.lengths[s.slot] for s in sequences] + [0] * padding
        positions = torch.tensor(starts, device=ids.device)[:, None]
        with self._routing(sequences, padding), self.autocast():  # autocast is per thread: entered here
            out = self.model(ids, position_ids=positions, cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _routing(self, sequences: list[Sequence], padding: int = 0):
        """Each row's adapter (none for padding rows), where the model has adapters."""
        if not self.adapted:
            return contextlib.nullcontext()
        return adapter_routing(self.model, [s.adapter or self.default_adapter for s in sequences] + [None] * padding)

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Choose the sequence's next token from its (V,) logits, and tell its caller."""
        sampling = sequence.sampling
        if sampling.temperature == 0:
            token = int(logits.argmax())
        else:
            config = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p)
            token = int(next_tokens(logits[None], config, sequence.generator)[0])
        logprobs = [] if sampling.top_logprobs is None else [self._logprobs(logits, token, sampling.top_logprobs)]
        self.tokens_generated += 1
        self.token_times.append(time.monotonic())
        if token in sequence.end_ids:
            self._finish(sequence, "stop", logprobs)
            return
        sequence.tokens.append(token)
        text = self.tokenizer.decode(sequence.tokens)
        stop_at = _first_stop(text, sampling.stop, sequence.emitted_chars)
        if stop_at is not None:
            self._finish(sequence, "stop", logprobs, text[:stop_at])
            return
        full = (len(sequence.tokens) >= sampling.max_tokens
                or len(sequence.prompt_ids) + len(sequence.tokens) >= self.max_model_len)
        if full:
            self._finish(sequence, "length", logprobs, text)
            return
        # Hold back what may be the start of a stop string, or of a character cut between tokens.
        held = max((len(s) - 1 for s in sampling.stop), default=0)
        ready = len(text) - held
        while ready > sequence.emitted_chars and text[ready - 1] == "\ufffd":
            ready -= 1
        new_text = text[sequence.emitted_chars:ready] if ready > sequence.emitted_chars else ""
        sequence.emitted_chars += len(new_text)
        if new_text or logprobs:
            sequence.on_delta(Delta(new_text, logprobs, completion_tokens=len(sequence.tokens)))

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> dict:
        """OpenAI's log-prob entry of the chosen token: the model's own distribution (before
        temperature and top-p), with the `top` most likely tokens."""
        log_probs = logits.log_softmax(-1)
        entry = self._token_entry(token, float(log_probs[token]))
        values, ids = log_probs.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        entry["top_logprobs"] = [self._token_entry(int(i), float(v)) for v, i in zip(values, ids)]
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0),
                "bytes": list(raw)}

    def _finish(self, sequence: Sequence, reason: str, logprobs: list[dict] | None = None,
                text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(sequence.tokens)
        rest = text[sequence.emitted_chars:]
        sequence.emitted_chars = len(text)
        self._release(sequence)
        sequence.on_delta(Delta(rest, logprobs or [], finish_reason=reason, completion_tokens=len(sequence.tokens)))

    def _release(self, sequence: Sequence) -> None:
        if sequence in self.running:
            self.running.remove(sequence)
            self.cache.lengths[sequence.slot] = 0
            self.free_slots.append(sequence.slot)
            self.free_slots.sort()
            sequence.slot = None


def _first_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Where the first stop string starts in `text`, looking from just before what is emitted."""
    found = [i for stop in stops if (i := text.find(stop, max(0, emitted - len(stop) + 1))) >= 0]
    return min(found) if found else None
