"""Data for alignment: preference pairs (a prompt with a chosen and a rejected reply) and prompts
with an optional reference answer, read from the same files as conversations (``.jsonl``, ``.json``
and ``.parquet``, ``.jsonl``/``.json`` optionally gzipped) by the same machinery
(`orchard.data.conversations.read_records`): sources ``path:line``, ``path: item N`` or
``path: row N``, ``on_error`` "error" or "skip", skips counted by reason in `ReadStats`.

Preference pairs, in four record shapes detected from each record's keys:

* strings: ``{"prompt": str, "chosen": str, "rejected": str, "system"?: str}``: one user turn (after
  the system prompt, if any) answered by one assistant turn each;
* explicit prompt (TRL conversational): ``{"prompt": [messages], "chosen": [messages], "rejected":
  [messages]}`` (a string in any of the three places stands for one user or assistant turn);
* implicit prompt (TRL conversational): ``{"chosen": [messages], "rejected": [messages]}``, two
  whole dialogues;
* HH-RLHF: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``, two whole
  dialogues as text, split into turns at ``\\n\\nHuman:`` and ``\\n\\nAssistant:``.

Two whole dialogues share their prompt: it is the longest common prefix that ends with a user turn,
and the replies are the rest of each. A pair is bad when a field is missing or not a string, the two
replies are identical, the prompt has no final user turn, or a reply is empty or does not end with
an assistant turn.

Prompts, for sampling replies (online methods, evaluation): ``{"prompt": str | [messages],
"answer"?: str | number, "system"?: str}``; ``{"messages": [...], "answer"?}`` whose trailing
assistant turn, if any, is the answer; GSM8K's ``{"question": str, "answer": "...\\n#### 72"}``. An
answer containing ``####`` is a worked solution and its final number is the answer (`gsm8k_answer`).
Any of them may list ``"rivals"``: the question's other possible answers, which a reply must not
name beside the answer (`orchard.data.synthetic.answer_matches`).
"""

from __future__ import annotations

import random
import sys

import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import OrchardError
from .conversations import (TRUNCATION, Conversation, TokenizedConversation, drop_oldest_prompt_exchange,
                            parse_messages, system_turns, tokenize_conversation)
from .records import BadRecord, ReadStats, json_type, read_records, string_field

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# GSM8K's final line: "#### 72", "#### 1,234", "#### -5"; its numbers are integers, decimals are allowed.
_GSM8K_ANSWER = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass
class PreferencePair:
    prompt: list[dict]
    """``{"role", "content"}`` messages ending with a user turn (system turns allowed first)."""
    chosen: list[dict]
    """The messages after the prompt in the preferred answer (usually one assistant message)."""
    rejected: list[dict]
    """The same for the dispreferred answer."""
    source: str
    """Where it came from, for error messages: ``path:line``, ``path: item N`` or ``path: row N``."""


@dataclass
class PromptItem:
    prompt: list[dict]
    """``{"role", "content"}`` messages ending with a user turn."""
    answer: str | None
    """The reference answer replies are checked against, or None."""
    source: str
    rivals: tuple[str, ...] | None = None
    """The question's other possible answers (a reply that names one beside the answer hedges), or
    None: replies are checked for the answer alone."""


# --- preference pairs ---------------------------------------------------------------------------------


def read_preference_pairs(paths, on_error: str = "error", stats: ReadStats | None = None,
                          key: str = "data.path") -> Iterator[PreferencePair]:
    """Yield every preference pair of the files ``paths`` names (a path, glob, directory or a list of
    them; ``key`` is the config key quoted in their errors), each record's shape detected from its
    keys (see the module docstring). ``on_error`` "error" makes a bad record an OrchardError naming
    it (``path:line: ...``), "skip" skips it and counts it in ``stats.reasons``."""
    for source, (prompt, chosen, rejected) in read_records(paths, _parse_pair, on_error, stats, key,
                                                           what="preference pairs"):
        yield PreferencePair(prompt, chosen, rejected, source)


def _parse_pair(record) -> tuple[list[dict], list[dict], list[dict]]:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {json_type(record)}")
    if "chosen" not in record and "rejected" not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise BadRecord("unrecognised record",
                         f"unrecognised record: expected 'chosen' and 'rejected' (keys: {keys})")
    if "prompt" in record:
        prompt = _prompt_messages(record)
        chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    else:
        prompt, chosen, rejected = _split_shared_prompt(_dialogue(record, "chosen"), _dialogue(record, "rejected"))
    _check_prompt(prompt)
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        _check_reply(name, reply)
    if chosen == rejected:
        raise BadRecord("identical responses", "'chosen' and 'rejected' are the same")
    return prompt, chosen, rejected


def _prompt_messages(record: dict) -> list[dict]:
    """A record's ``prompt``: a string is one user turn (after its ``system`` string, if any)."""
    if isinstance(record.get("prompt"), list):
        return parse_messages(record, "prompt")
    return system_turns(record) + [{"role": "user", "content": string_field(record, "prompt")}]


def _reply(record: dict, name: str) -> list[dict]:
    """A reply after an explicit prompt: a message list, or a string that is one assistant turn."""
    if isinstance(record.get(name), list):
        return parse_messages(record, name)
    return [{"role": "assistant", "content": string_field(record, name)}]


def _dialogue(record: dict, name: str) -> list[dict]:
    """A whole dialogue: a message list, or HH-RLHF text."""
    value = record.get(name)
    if not isinstance(value, str):
        return parse_messages(record, name)
    parts = _HH_TURN.split("\n\n" + value.lstrip())
    if parts[0].strip() or len(parts) == 1:
        raise BadRecord("missing field", f"missing field 'prompt' (field '{name}' is a string but not an "
                                          "HH-RLHF dialogue starting with 'Human:')")
    return [{"role": _HH_ROLES[speaker], "content": text.strip()} for speaker, text in zip(parts[1::2], parts[2::2])]


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen reply, rejected reply): the prompt is the longest common prefix of the two
    dialogues that ends with a user turn."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    users = [i for i in range(common) if chosen[i]["role"] == "user"]
    if not users:
        raise BadRecord("no user turn", "'chosen' and 'rejected' share no prompt ending with a user turn")
    end = users[-1] + 1
    return chosen[:end], chosen[end:], rejected[end:]


def _check_prompt(prompt: list[dict]) -> None:
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("no user turn", "the prompt does not end with a user turn")


def _check_reply(name: str, reply: list[dict]) -> None:
    if not reply or reply[-1]["role"] != "assistant":
        raise BadRecord("no final assistant turn", f"'{name}' does not end with an assistant turn")
    for i, message in enumerate(reply):
        if message["role"] == "assistant" and not message["content"].strip():
            raise BadRecord("empty assistant turn", f"'{name}': assistant turn (message {i + 1}) is empty")


def tokenize_preference_pair(pair: PreferencePair, tokenizer, max_length: int, truncation: str = "truncate_prompt",
                             ) -> tuple[TokenizedConversation, TokenizedConversation] | None:
    """(chosen, rejected): prompt + reply rendered with ``tokenizer``'s chat template, labels on the
    final assistant reply and its turn-end token (`tokenize_conversation` with
    ``train_on="last_assistant"``); both start with the same prompt tokens.

    ``truncation`` when either is over ``max_length`` tokens: "error" raises an OrchardError naming
    the pair; "skip" returns None; "truncate_prompt" drops the oldest exchanges of the prompt (never
    the system prompt, never the last user turn) from both until both fit, and returns None if even
    that does not fit. The replies are never cut.
    """
    if truncation not in TRUNCATION:
        raise OrchardError(f"data.truncation: expected one of {', '.join(TRUNCATION)}, got {truncation!r}")
    per_reply = "error" if truncation == "error" else "skip"  # the prompt is truncated here, the same for both
    prompt = pair.prompt
    while True:
        chosen, rejected = (tokenize_conversation(Conversation(prompt + reply, pair.source), tokenizer, max_length,
                                                  train_on="last_assistant", truncation=per_reply)
                            for reply in (pair.chosen, pair.rejected))
        if chosen is not None and rejected is not None:
            return chosen, rejected
        prompt = drop_oldest_prompt_exchange(prompt) if truncation == "truncate_prompt" else None
        if prompt is None:
            return None


# --- unpaired examples (KTO) --------------------------------------------------------------------------


@dataclass
class UnpairedExample:
    prompt: list[dict]
    completion: list[dict]
    """The messages after the prompt (usually one assistant message)."""
    desirable: bool
    source: str


def read_unpaired(paths, on_error: str = "error", stats: ReadStats | None = None,
                  key: str = "data.path") -> Iterator[UnpairedExample]:
    """Yield every unpaired example of the files ``paths`` names, TRL's unpaired preference format:
    ``{"prompt": str | [messages], "completion": str | [messages], "label": true | false}`` (label:
    whether the completion is desirable); ``on_error``, ``stats`` and ``key`` as in
    `read_preference_pairs`."""
    for source, (prompt, completion, label) in read_records(paths, _parse_unpaired, on_error, stats, key,
                                                            what="unpaired examples"):
        yield UnpairedExample(prompt, completion, label, source)


def unpaired_from_pairs(pairs: list[PreferencePair]) -> list[UnpairedExample]:
    """Each pair as two unpaired examples: its chosen reply desirable, its rejected one not."""
    return [UnpairedExample(pair.prompt, reply, desirable, pair.source)
            for pair in pairs for reply, desirable in ((pair.chosen, True), (pair.rejected, False))]


def _parse_unpaired(record) -> tuple[list[dict], list[dict], bool]:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {json_type(record)}")
    if not isinstance(record.get("label"), bool):
        raise BadRecord("bad label", f"field 'label' must be true or false, got {record.get('label')!r}")
    prompt, completion = _prompt_messages(record), _reply(record, "completion")
    _check_prompt(prompt)
    _check_reply("completion", completion)
    return prompt, completion, record["label"]


# --- prompts -----------------------------------------------------------------------------------------


def read_prompts(paths, on_error: str = "error", stats: ReadStats | None = None,
                 key: str = "data.path") -> Iterator[PromptItem]:
    """Yield every prompt of the files ``paths`` names, with its reference answer if the record has
    one (see the module docstring for the record shapes); ``on_error``, ``stats`` and ``key`` as in
    `read_preference_pairs`."""
    for source, (prompt, answer, rivals) in read_records(paths, _parse_prompt, on_error, stats, key,
                                                         what="prompts"):
        yield PromptItem(prompt, answer, source, rivals)


def gsm8k_answer(solution: str) -> str | None:
    """The final answer of a GSM8K worked solution, the number after its last ``####`` with commas
    removed (``"... #### 1,234"`` -> ``"1234"``), or None if there is none."""
    found = _GSM8K_ANSWER.search(solution[solution.rfind("####"):]) if "####" in solution else None
    return found.group(1).replace(",", "") if found else None


def _parse_prompt(record) -> tuple[list[dict], str | None, tuple[str, ...] | None]:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {json_type(record)}")
    if "messages" in record:
        prompt = parse_messages(record)
        answer = None
        if prompt and prompt[-1]["role"] == "assistant":
            answer = prompt.pop()["content"].strip()
        if "answer" in record:
            answer = _answer(record)
    elif "prompt" in record:
        prompt, answer = _prompt_messages(record), _answer(record)
    elif "question" in record:
        prompt = system_turns(record) + [{"role": "user", "content": string_field(record, "question")}]
        if record.get("answer") is None:
            raise BadRecord("missing field", "missing field 'answer'")
        answer = _answer(record)
    else:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise BadRecord("unrecognised record", "unrecognised record: expected a 'prompt', a 'messages' list or "
                                                f"'question'/'answer' (keys: {keys})")
    _check_prompt(prompt)
    rivals = record.get("rivals")
    if rivals is not None and (not isinstance(rivals, list) or not all(isinstance(r, str) and r for r in rivals)):
        raise BadRecord("bad rivals", "field 'rivals' must be a list of non-empty strings")
    return prompt, answer, None if rivals is None else tuple(rivals)


def _answer(record: dict) -> str | None:
    """A record's ``answer`` as text: a number as written ("72", "2.5"), the final number of a
    worked solution containing ``####``, or the stripped string."""
    value = record.get("answer")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        raise BadRecord("non-string content",
                         f"field 'answer' is {json_type(value)}, expected a string or a number")
    if "####" not in value:
        return value.strip() or None
    answer = gsm8k_answer(value)
    if answer is None:
        raise BadRecord("no final answer", "field 'answer' has '####' but no number after its last one")
    return answer


def checked_split(train: list, val: list, too_long: int, noun: str, length_key: str, max_length: int,
                  source: str) -> dict:
    """The data record of tokenized training and held-out items (``noun``: pair, prompt); how many
    were dropped for being longer than ``length_key`` is printed, and an empty side is one line."""
    if too_long:
        print(f"skipped {too_long} {noun}(s) longer than {length_key}={max_length}", file=sys.stderr)
    if not train or not val:
        raise OrchardError(f"data.path: {len(train)} usable training and {len(val)} held-out {noun}(s) in {source}; "
                           f"need at least one of each")
    return {"source": source, f"train_{noun}s": len(train), f"val_{noun}s": len(val), "skipped_too_long": too_long}


def read_split(read, path, val_path, on_error: str, limit: int | None, val_fraction: float,
               seed: int) -> tuple[list, list]:
    """(training records, held-out records) for a method's `data` section: `read` (e.g.
    `read_prompts`) over `path` (at most `limit` records) and over `val_path`; with no `val_path`,
    a seeded `val_fraction` of `path`'s records (at least one) is held out. Skipped records are
    counted on stderr."""
    train = read_limited(read, path, on_error, "data.path", limit)
    if val_path is not None:
        return train, read_limited(read, val_path, on_error, "data.val_path", None)
    random.Random(seed).shuffle(train)
    held = max(1, int(len(train) * val_fraction))
    return train[held:], train[:held]


def read_limited(read, path, on_error: str, key: str, limit: int | None) -> list:
    """The first `limit` records `read` yields from `path` (all with None), skips reported."""
    stats = ReadStats()
    records = []
    for record in read(path, on_error=on_error, stats=stats, key=key):
        records.append(record)
        if limit and len(records) >= limit:
            break
    if stats.skipped:
        print(f"{key}: skipped {stats.skipped} malformed record(s): {stats.describe()}", file=sys.stderr)
    return records
