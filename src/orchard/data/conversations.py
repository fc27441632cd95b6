"""Conversations for supervised fine-tuning: reading them, tokenizing them with a chat template and
marking which tokens the loss covers, and batching them (packed or padded).

Reading. Records of ``.jsonl``, ``.json`` (JSONL or one list) and ``.parquet`` files, read by
`orchard.data.records`, in four shapes, detected per record from its keys:

* ``messages``: OpenAI's ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
  "tools"?: [function schemas]}``, assistant turns optionally with ``tool_calls`` (the tool-calling
  format of `orchard.data.tool_calls`: the calls are supervised, ``tool`` results are not);
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}`` (``from``
  may also be ``user``/``assistant``; an optional top-level ``system`` string is the system prompt);
* ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``: the user turn is the instruction,
  plus a blank line and the input when the input is not empty;
* ``prompt_completion``: ``{"prompt", "completion", "system"?}``: one user and one assistant turn.

A bad record (unknown role, missing field, content that is not a string, no assistant turn, an
empty assistant turn) is an ``OrchardError`` naming ``file:line`` (``file: item N`` in a JSON list,
``file: row N`` in Parquet), or with ``on_error="skip"`` a skip counted by reason in `ReadStats`.

Tokenizing. The conversation is rendered once with the tokenizer's chat template and tokenized
once (special tokens such as ``<|im_start|>`` become their ids). The supervised tokens of an
assistant turn are everything the model generates after the generation prompt: its content and
the template's turn-end token that follows it (``<|im_end|>`` in ChatML), so the model learns to
stop; never the ``<|im_start|>assistant\\n`` header, nor system or user tokens (where a template
puts no special token between header and reply, a token straddling both counts as the reply's). They are found by
rendering prefixes of the conversation and mapping character spans to tokens through the
tokenizer's offsets, so any prefix-stable template works.

Label convention -- read this before computing a loss:

* `TokenizedConversation.labels` are ALIGNED with ``input_ids`` (Hugging Face's convention):
  ``labels[t]`` is ``input_ids[t]`` when token t is supervised, else IGNORE_INDEX.
* Batches (`PackedExample`, `collate_packed`, `collate_padded`) carry SHIFTED labels:
  ``labels[t]`` is the target for the logits at position t, i.e. the aligned label of token t + 1
  of the same conversation (IGNORE_INDEX at a conversation's last token and at padding). So
  ``token_cross_entropy(model(...).logits, batch["labels"])`` is the loss, with no further shift.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import OrchardError
from ..losses.tokens import IGNORE_INDEX
from .records import BadRecord, ReadStats, json_type, read_records, string_field
from .tool_calls import checked_tool_calls, checked_tools, reply_text

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
TRAIN_ON = ("all_assistant", "last_assistant")
TRUNCATION = ("error", "skip", "truncate_prompt")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


# --- reading -------------------------------------------------------------------------------------


@dataclass
class Conversation:
    messages: list[dict]
    """``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` dicts; assistant turns may
    also hold ``tool_calls`` (checked, arguments as dicts), tool turns ``tool_call_id``/``name``."""
    source: str
    """Where it came from, for error messages: ``path:line``, ``path: item N`` or ``path: row N``."""
    tools: list[dict] | None = None
    """The function schemas offered to the model (rendered in the system turn), if any."""


def read_conversations(paths, format: str = "auto", on_error: str = "error", stats: ReadStats | None = None,
                       key: str = "data.path") -> Iterator[Conversation]:
    """Yield every conversation of the files ``paths`` names (a path, glob, directory or a list of
    them, as `orchard.data.corpus.resolve_paths`; ``key`` is the config key quoted in its errors).

    ``format`` is "auto" (each record's keys decide) or one of "messages", "sharegpt", "alpaca",
    "prompt_completion" (every record must be that one). ``on_error`` is "error" (a bad record
    raises an OrchardError naming it and the problem) or "skip" (it is skipped and counted in
    ``stats.reasons``). Problems with a file itself (unreadable, invalid UTF-8, a broken JSON list,
    no records at all) always raise. Validation happens while iterating.
    """
    if format not in FORMATS:
        raise OrchardError(f"data.format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    for source, (messages, tools) in read_records(paths, lambda record: _parse_record(record, format), on_error,
                                                  stats, key, what="conversations"):
        yield Conversation(messages, source, tools)


def detect_format(record: dict) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def _parse_record(record, format: str) -> tuple[list[dict], list[dict] | None]:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {json_type(record)}")
    kind = detect_format(record) if format == "auto" else format
    if kind is None:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise BadRecord("unrecognised record",
                         "unrecognised record: expected a 'messages' list, a 'conversations' list, "
                         f"'instruction'/'output' or 'prompt'/'completion' (keys: {keys})")
    messages = _PARSERS[kind](record)
    _check_conversation(messages)
    return messages, checked_tools(record.get("tools"))


def _turns(record: dict, list_key: str) -> list:
    turns = record.get(list_key)
    if turns is None:
        raise BadRecord("missing field", f"missing field '{list_key}'")
    if not isinstance(turns, list):
        raise BadRecord("missing field", f"field '{list_key}' is {json_type(turns)}, expected a list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("not an object", f"{list_key}[{i}] is {json_type(turn)}, expected an object")
    return turns


def system_turns(record: dict) -> list[dict]:
    """A record's optional top-level ``system`` string as a system turn (none when absent or empty)."""
    system = string_field(record, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def parse_messages(record: dict, list_key: str = "messages") -> list[dict]:
    """The OpenAI-style turns in ``record[list_key]``, checked; a `BadRecord` names the first bad one."""
    messages = []
    for i, turn in enumerate(_turns(record, list_key)):
        where = f"{list_key}[{i}]: "
        role = string_field(turn, "role", where)
        if role not in ROLES:
            raise BadRecord("unknown role", f"{where}unknown role {role!r} (expected system, user, assistant or tool)")
        calls = turn.get("tool_calls") if role == "assistant" else None
        # An assistant turn that only calls tools may have no content (OpenAI sends null).
        message = {"role": role, "content": string_field(turn, "content", where, required=not calls) or ""}
        if calls:
            message["tool_calls"] = checked_tool_calls(calls, where)
        for key in ("tool_call_id", "name") if role == "tool" else ():
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
        messages.append(message)
    return messages


def _parse_sharegpt(record: dict) -> list[dict]:
    messages = system_turns(record)
    for i, turn in enumerate(_turns(record, "conversations")):
        speaker = string_field(turn, "from", f"conversations[{i}]: ")
        if speaker not in _SHAREGPT_ROLES:
            raise BadRecord("unknown role", f"conversations[{i}]: unknown role {speaker!r} "
                                             "(expected human, gpt or system)")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": string_field(turn, "value", f"conversations[{i}]: ")})
    return messages


def _parse_alpaca(record: dict) -> list[dict]:
    instruction = string_field(record, "instruction")
    extra = string_field(record, "input", required=False)
    output = string_field(record, "output")
    user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    return system_turns(record) + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _parse_prompt_completion(record: dict) -> list[dict]:
    prompt, completion = string_field(record, "prompt"), string_field(record, "completion")
    return system_turns(record) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


_PARSERS = {"messages": parse_messages, "sharegpt": _parse_sharegpt, "alpaca": _parse_alpaca,
            "prompt_completion": _parse_prompt_completion}


def _check_conversation(messages: list[dict]) -> None:
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        raise BadRecord("no assistant turn", "conversation has no assistant turn")
    for n, i in enumerate(assistants):
        if not reply_text(messages[i]).strip():
            raise BadRecord("empty assistant turn", f"assistant turn {n + 1} (message {i + 1}) is empty")


# --- tokenizing ------------------------------------------------------------------------------------


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    """Aligned with input_ids: the token itself where supervised, IGNORE_INDEX elsewhere."""
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def render_with_labels(messages: list[dict], tokenizer, train_on: str = "all_assistant",
                       source: str = "conversation", tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, aligned labels) of ``messages`` rendered by ``tokenizer``'s chat template (with
    ``tools`` listed, if any). An assistant turn's supervised text is what the model generates:
    its content and its tool calls (`tool_calls.reply_text`)."""
    if train_on not in TRAIN_ON:
        raise OrchardError(f"data.train_on: expected one of {', '.join(TRAIN_ON)}, got {train_on!r}")

    def render(prefix, add_generation_prompt=False):
        return tokenizer.apply_chat_template(prefix, add_generation_prompt=add_generation_prompt, tools=tools)

    full = render(messages)
    last = _last_assistant(messages)
    spans = []  # (first char of the reply, end of its content, end of its turn)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (train_on == "last_assistant" and i != last):
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[:i + 1])
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise OrchardError(f"{source}: the chat template is not prefix-stable (rendering the first {i} "
                               f"message(s) does not give the start of the whole conversation), so assistant "
                               "tokens cannot be located")
        content = reply_text(message)
        # Where the reply starts right after the generation prompt (ChatML, Llama 3), that is it;
        # otherwise (a template that adds text first, e.g. an empty think block) its last occurrence.
        found = len(before) if through.startswith(content, len(before)) else through.rfind(content, len(before))
        if found < 0:
            raise OrchardError(f"{source}: the chat template does not render assistant message {i + 1}'s "
                               "content verbatim, so its tokens cannot be located")
        spans.append((len(before), found + len(content), len(through)))

    encoding = tokenizer._backend.encode(full, add_special_tokens=False)
    ids, offsets = list(encoding.ids), encoding.offsets
    labels = [IGNORE_INDEX] * len(ids)
    starts = [start for start, _ in offsets]
    ends = [end for _, end in offsets]
    for start, content_end, turn_end in spans:
        # The tokens overlapping the reply, then the first one after it: the turn-end token. A token
        # straddling the header/reply boundary (a template with no special token there, "...: Tom")
        # is supervised, so a reply is never cut; ChatML's header ends with a newline, which
        # never merges with the reply's first characters unless the reply starts with newlines.
        t = bisect.bisect_right(ends, start)
        while t < len(ids) and starts[t] < content_end:
            labels[t] = ids[t]
            t += 1
        if t < len(ids) and starts[t] < turn_end:
            labels[t] = ids[t]
    return ids, labels


def _drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """``messages`` without its oldest exchange (a run of user turns and the replies that follow,
    up to the next user turn), keeping the leading system messages and the final exchange (the
    last user turn before the last assistant turn, and what follows it); None when nothing is left
    to drop."""
    last = _last_assistant(messages)
    prompt = drop_oldest_prompt_exchange(messages[:last])
    return None if prompt is None else prompt + messages[last:]


def drop_oldest_prompt_exchange(prompt: list[dict]) -> list[dict] | None:
    """The messages before a reply without their oldest exchange, keeping the leading system
    messages and the last user turn (and what follows it); None when nothing is left to drop.
    Preference pairs truncate their shared prompt with it, so both replies keep the same one."""
    head = 0
    while head < len(prompt) and prompt[head]["role"] == "system":
        head += 1
    final = next((i for i in range(len(prompt) - 1, head - 1, -1) if prompt[i]["role"] == "user"), None)
    if final is None or final <= head:
        return None
    end = head + 1
    while end < final and not (prompt[end]["role"] == "user" and prompt[end - 1]["role"] != "user"):
        end += 1
    return prompt[:head] + prompt[end:]


def _tokenize(conversation: Conversation, tokenizer, max_length: int, train_on: str,
              truncation: str) -> tuple[TokenizedConversation | None, bool]:
    if truncation not in TRUNCATION:
        raise OrchardError(f"data.truncation: expected one of {', '.join(TRUNCATION)}, got {truncation!r}")
    source = conversation.source
    messages = conversation.messages
    try:
        last = _last_assistant(messages)
    except ValueError:
        raise OrchardError(f"{source}: conversation has no assistant turn") from None
    messages = messages[:last + 1]  # turns after the last answer teach nothing
    ids, labels = render_with_labels(messages, tokenizer, train_on, source, conversation.tools)
    truncated = False
    if len(ids) > max_length:
        if truncation == "error":
            raise OrchardError(f"{source}: conversation is {len(ids)} tokens, longer than "
                               f"data.max_length={max_length} (set data.truncation to skip or truncate_prompt)")
        if truncation == "skip":
            return None, False
        while len(ids) > max_length:
            shorter = _drop_oldest_exchange(messages)
            if shorter is None:
                return None, False  # even the final exchange does not fit: never cut the answer
            messages = shorter
            ids, labels = render_with_labels(messages, tokenizer, train_on, source, conversation.tools)
        truncated = True
    return TokenizedConversation(ids, labels, source), truncated


def tokenize_conversation(conversation: Conversation, tokenizer, max_length: int, train_on: str = "all_assistant",
                          truncation: str = "error") -> TokenizedConversation | None:
    """Tokens and aligned labels of one conversation (see the module docstring), or None when it is
    too long and ``truncation`` is "skip", or "truncate_prompt" and even the system prompt with the
    last user and assistant turns do not fit.

    ``train_on``: "all_assistant" supervises every assistant turn, "last_assistant" the final one.
    ``truncation`` for a conversation over ``max_length`` tokens: "error" raises an OrchardError
    naming it and its length; "skip" returns None; "truncate_prompt" drops the oldest user/assistant
    exchanges (never the system prompt, never the last exchange) until it fits. Messages after the
    last assistant turn are dropped (they carry no supervision).
    """
    return _tokenize(conversation, tokenizer, max_length, train_on, truncation)[0]


def tokenize_conversations(conversations, tokenizer, max_length: int, train_on: str = "all_assistant",
                           truncation: str = "error", stats: ReadStats | None = None) -> list[TokenizedConversation]:
    """`tokenize_conversation` over many, counting in ``stats`` the ones skipped ("too long") and
    truncated; ``stats.kept`` becomes the number returned."""
    stats = stats if stats is not None else ReadStats()
    examples = []
    for conversation in conversations:
        example, truncated = _tokenize(conversation, tokenizer, max_length, train_on, truncation)
        if example is None:
            stats.skip("too long")
            continue
        stats.truncated += truncated
        examples.append(example)
    stats.kept = len(examples)
    return examples


# --- batching -----------------------------------------------------------------------------------------


@dataclass
class PackedExample:
    """Whole conversations concatenated into one training sequence."""

    input_ids: list[int]
    labels: list[int]
    """SHIFTED: labels[t] is the target for the prediction at input t (IGNORE_INDEX at each
    conversation's last token, so nothing is predicted across a boundary)."""
    position_ids: list[int]
    """0, 1, ... restarting at each conversation."""
    document_ids: list[int]
    """Index (0, 1, ...) within this sequence of the conversation each token belongs to."""

    def __len__(self) -> int:
        return len(self.input_ids)


def shifted_labels(labels: list[int]) -> list[int]:
    """Aligned labels -> next-token targets: ``labels[1:] + [IGNORE_INDEX]``."""
    return list(labels[1:]) + [IGNORE_INDEX]


def pack_conversations(examples: list[TokenizedConversation], seq_len: int) -> list[PackedExample]:
    """Greedy first-fit, in order: each example goes into the first sequence with room for it (a new
    one when none has), so sequences hold whole examples and at most ``seq_len`` tokens. Deterministic.
    An example longer than ``seq_len`` is a ValueError (tokenize with max_length <= seq_len)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = len(examples)
    # A max-segment tree over the room left in each bin finds the leftmost bin that fits in log time;
    # bins not opened yet have room seq_len, so the leftmost fitting one is an open bin if any fits.
    size = 1
    while size < max(n, 1):
        size *= 2
    room = [0] * (2 * size)
    for i in range(size):
        room[size + i] = seq_len if i < n else -1
    for i in range(size - 1, 0, -1):
        room[i] = max(room[2 * i], room[2 * i + 1])
    bins: list[list[int]] = []
    for index, example in enumerate(examples):
        length = len(example.input_ids)
        if length > seq_len:
            raise ValueError(f"example {index} ({example.source or 'conversation'}) has {length} tokens, "
                             f"more than seq_len={seq_len}")
        if length == 0:
            continue
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(index)
        room[node] -= length
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    packed = []
    for members in bins:
        input_ids, labels, positions, documents = [], [], [], []
        for document, index in enumerate(members):
            example = examples[index]
            input_ids.extend(example.input_ids)
            labels.extend(shifted_labels(example.labels))
            positions.extend(range(len(example.input_ids)))
            documents.extend([document] * len(example.input_ids))
        packed.append(PackedExample(input_ids, labels, positions, documents))
    return packed


def collate_packed(packed: list[PackedExample], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """A batch of packed sequences, right padded to the longest (or to ``pad_to``):

    input_ids (B, T) long; labels (B, T) long, shifted, IGNORE_INDEX at padding; position_ids (B, T)
    long (0 at padding); document_ids (B, T) long, the conversation of each token in its row (-1 at
    padding), from which the model makes token i see token j iff both belong to the same
    conversation and j <= i (a padding token sees only itself), without a (T x T) mask per row on a
    GPU (orchard.model.attention).
    """
    if not packed:
        raise ValueError("collate_packed needs at least one sequence")
    T = max(len(p.input_ids) for p in packed)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({T})")
        T = pad_to
    B = len(packed)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    documents = torch.full((B, T), -1, dtype=torch.long)
    for row, p in enumerate(packed):
        n = len(p.input_ids)
        input_ids[row, :n] = torch.tensor(p.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(p.labels, dtype=torch.long)
        position_ids[row, :n] = torch.tensor(p.position_ids, dtype=torch.long)
        documents[row, :n] = torch.tensor(p.document_ids, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": documents}


def collate_padded(examples: list[TokenizedConversation], pad_id: int) -> dict[str, torch.Tensor]:
    """One conversation per row, right padded to the longest: input_ids (B, T) long, labels (B, T)
    long (shifted; IGNORE_INDEX at each row's last token and padding), attention_mask (B, T) long
    with 1 on real tokens, position_ids (B, T) long (0, 1, ... ; 0 at padding)."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(shifted_labels(example.labels), dtype=torch.long)
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": position_ids}


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose consecutive runs of ``batch_size`` hold similar
    lengths: shuffle (by seed and epoch), cut into mega-batches of 50 * batch_size, sort each by
    length (longest first, ties by index), cut into batches, shuffle the batches. Deterministic."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(f"length-grouped:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = 50 * batch_size
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: (-lengths[i], i))
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return [index for batch in batches for index in batch]
