"""Instruction conversations about the built-in world, for supervised fine-tuning, and the same items
as exact-match evaluation."""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Collection
from pathlib import Path

from .documents import write_jsonl
from .world import LANGUAGES, PRONOUNS, Entity, Fact, World, checked_languages

# --- instruction data ----------------------------------------------------------------------------
#
# Conversations in OpenAI "messages" form that ask about the world's facts and pose arithmetic word
# problems, for supervised fine-tuning; and the same items as (prompt, expected answer) pairs for
# exact-match evaluation. Nothing below changes what the document generators above produce.

# A fact's answer is its sentence: a fixed form that contains fact.answer(lang) exactly.
_SYSTEM_PROMPTS = {
    "en": ("You are a helpful assistant.", "Answer questions about the people you know briefly.",
           "You are a friendly assistant. Keep your answers short."),
    "zh": ("你是一个乐于助人的助手。", "请简短地回答关于你认识的人的问题。", "你是一个友好的助手，回答要简短。"),
}
_SYSTEM_PROMPT_RATE = 0.3
# Countable things for word problems: (English plural, Chinese, Chinese measure word).
_ITEMS = [("apples", "苹果", "个"), ("oranges", "橙子", "个"), ("pears", "梨", "个"), ("books", "书", "本"),
          ("pencils", "铅笔", "支"), ("stamps", "邮票", "张"), ("eggs", "鸡蛋", "个"), ("cups", "杯子", "个")]
_WORD_PROBLEMS = {
    "+": {"en": ("{name} has {a} {item} and buys {b} more. How many {item} does {he} have now?",
                 "{name} had {a} {item}. {friend} gave {him} {b} more. How many {item} does {name} have now?"),
          "zh": ("{name}有{a}{m}{item}，又买了{b}{m}。{ta}现在有多少{m}{item}？",
                 "{name}原来有{a}{m}{item}，{friend}又给了{ta}{b}{m}。{name}现在有多少{m}{item}？")},
    "-": {"en": ("{name} has {a} {item} and gives {b} to {friend}. How many {item} does {he} have left?",
                 "{name} had {a} {item} and lost {b} of them. How many {item} are left?"),
          "zh": ("{name}有{a}{m}{item}，给了{friend}{b}{m}。{ta}还剩多少{m}{item}？",
                 "{name}有{a}{m}{item}，丢了{b}{m}。还剩多少{m}{item}？")},
    "*": {"en": ("{name} has {a} boxes with {b} {item} in each box. How many {item} does {he} have in total?",
                 "{name} buys {a} bags of {item}, and each bag holds {b}. How many {item} is that?"),
          "zh": ("{name}有{a}个盒子，每个盒子里有{b}{m}{item}。{ta}一共有多少{m}{item}？",
                 "{name}买了{a}袋{item}，每袋{b}{m}。一共有多少{m}{item}？")},
}
_FOLLOW_UP = {"en": "And {q}", "zh": "那{q}"}
SPLITS = ("train", "held_out")
# One conversation in four is a word problem, one in four asks two questions about the same person.
_CONVERSATION_PATTERN = ("single", "multi", "single", "arithmetic")


def _arithmetic_split(op: str, a: int, b: int) -> str:
    """Which split a word problem's operands belong to: a stable hash puts about 20% in held_out."""
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return "held_out" if digest[0] % 5 == 0 else "train"


def _draw_operands(rng: random.Random, split: str) -> tuple[str, int, int, int]:
    """(op, a, b, result) drawn from ``split``'s problems: sums and differences of 1..99, times tables."""
    while True:
        op = rng.choice(("+", "-", "*"))
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            if op == "-" and b > a:
                a, b = b, a
        if _arithmetic_split(op, a, b) == split:
            return op, a, b, (a + b if op == "+" else a - b if op == "-" else a * b)


def word_problem(world: World, rng: random.Random, lang: str, split: str) -> tuple[str, str]:
    """(question, answer) of a word problem drawn from ``split``'s operands."""
    question, answer, _ = word_problem_with_expression(world, rng, lang, split)
    return question, answer


def word_problem_with_expression(world: World, rng: random.Random, lang: str, split: str) -> tuple[str, str, str]:
    """(question, answer, the arithmetic that solves it, e.g. "37 + 45"), drawing as `word_problem`."""
    op, a, b, result = _draw_operands(rng, split)
    people = world.by_kind("person")
    person = rng.choice(people)
    friend = world.fact(person, "friend_of").value_entity
    item_en, item_zh, measure = rng.choice(_ITEMS)
    fields = {"name": person.name(lang), "friend": friend.name(lang), "a": a, "b": b,
              "item": item_en if lang == "en" else item_zh, "m": measure}
    fields.update(PRONOUNS[lang][person.attributes["gender"]])
    return rng.choice(_WORD_PROBLEMS[op][lang]).format(**fields), str(result), f"{a} {op} {b}"


def _follow_up(question: str, lang: str) -> str:
    return _FOLLOW_UP[lang].format(q=question[0].lower() + question[1:] if lang == "en" else question)


def instruction_items(world: World, split: str, seed: int, languages, num_conversations: int | None,
                       held_out_fraction: float) -> list[tuple[list[dict], str]]:
    """(messages ending with the assistant's answer, expected answer string) for every conversation."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    languages = checked_languages(languages)
    kept, held = world.split_facts(held_out_fraction)
    facts = kept if split == "train" else held
    if not facts:
        raise ValueError(f"the {split} split has no facts (held_out_fraction={held_out_fraction})")
    if num_conversations is None:
        # Enough that every (fact, language) pair is asked once as a single question.
        num_conversations = 2 * len(facts) * len(languages)
    if num_conversations < 0:
        raise ValueError(f"num_conversations must be >= 0, got {num_conversations}")

    rng = random.Random(f"instructions:{seed}:{split}")
    deck: list[tuple[Fact, str]] = []  # single questions come from a shuffled deck, refilled when empty
    by_person: dict[Entity, list[Fact]] = {}
    for fact in facts:
        by_person.setdefault(fact.subject, []).append(fact)
    pairs_of = [person for person, found in by_person.items() if len(found) >= 2]

    items = []
    for n in range(num_conversations):
        kind = _CONVERSATION_PATTERN[n % len(_CONVERSATION_PATTERN)]
        if kind == "multi" and not pairs_of:
            kind = "single"
        if kind == "single":
            if not deck:
                deck = [(fact, lang) for fact in facts for lang in languages]
                rng.shuffle(deck)
            fact, lang = deck.pop()
            turns = [(fact.question(lang), fact.sentence(lang))]
            expected = fact.answer(lang)
        elif kind == "multi":
            lang = rng.choice(languages)
            first, second = rng.sample(by_person[rng.choice(pairs_of)], 2)
            turns = [(first.question(lang), first.sentence(lang)),
                     (_follow_up(second.question(lang), lang), second.sentence(lang))]
            expected = second.answer(lang)
        else:
            lang = rng.choice(languages)
            question, expected = word_problem(world, rng, lang, split)
            turns = [(question, expected)]
        messages = []
        if rng.random() < _SYSTEM_PROMPT_RATE:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS[lang])})
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        items.append((messages, expected))
    return items


def instruction_conversations(world: World, split: str = "train", seed: int = 0,
                              languages: tuple[str, ...] | list[str] = LANGUAGES,
                              num_conversations: int | None = None,
                              held_out_fraction: float = 0.2) -> list[dict]:
    """Deterministic instruction conversations, ``[{"messages": [...]}, ...]`` in OpenAI form.

    Repeating ``single, multi, single, arithmetic``:

    * single: one question about a fact (``fact.question(lang)``) answered by its sentence
      (``fact.sentence(lang)``, "Tom Snow lives in Greenfield.", which contains ``fact.answer(lang)``);
      the (fact, language) pairs are dealt from a shuffled deck, so the default count
      (``2 * facts * languages``) asks every one exactly once;
    * multi: two questions about the same person, the second a follow-up ("And what is ...?");
    * arithmetic: a word problem about a person of the world ("Tom Snow has 12 apples and buys 7
      more. How many apples does he have now?"), answered by the bare number ("19").

    About 30% start with a system prompt in the conversation's language. ``split`` "train" asks
    about the facts `World.split_facts` keeps, "held_out" about the held-out ones (which the
    pretraining corpus still states: held-out tests the question format on facts SFT never showed,
    not unseen knowledge); word problems are split by a hash of their operation and operands, so no
    problem is in both. The first ``k`` conversations of a longer list are the ``k``-conversation
    list. Fact questions and their answers are written in the conversation's language.
    """
    items = instruction_items(world, split, seed, languages, num_conversations, held_out_fraction)
    return [{"messages": messages} for messages, _ in items]


def exact_match_items(world: World, split: str = "held_out", seed: int = 0,
                      languages: tuple[str, ...] | list[str] = LANGUAGES,
                      num_items: int | None = None,
                      held_out_fraction: float = 0.2) -> list[tuple[list[dict], str]]:
    """``(messages up to and including the final user turn, expected answer)`` for evaluation: the
    conversations of `instruction_conversations` with the same arguments, without the final answer.

    The expected answer is ``fact.answer(lang)`` ("Greenfield", "34") or the word problem's result
    ("19"). Prompt the model with the chat template and the generation prompt, and judge its greedy
    reply with `answer_matches`.
    """
    items = instruction_items(world, split, seed, languages, num_items, held_out_fraction)
    return [(messages[:-1], expected) for messages, expected in items]


def _mention(text: str, answer: str) -> re.Match | None:
    """The first occurrence of ``answer`` in ``text`` as a whole token: not preceded or followed by
    an ASCII letter or digit where ``answer`` starts or ends with one, so "19" is not found in "119",
    "190" or "19.5", and "orange" not in "oranges"; Chinese text has no word boundaries and is
    matched as a substring."""
    left = r"(?<![A-Za-z0-9])(?<![0-9][.,])" if answer[0].isascii() and answer[0].isalnum() else ""
    right = r"(?![A-Za-z0-9])(?![.,][0-9])" if answer[-1].isascii() and answer[-1].isalnum() else ""
    return re.search(left + re.escape(answer) + right, text)


_SENTENCE_END = re.compile(r"[.!?。！？](?!\d)")
_NUMBER_RUN = re.compile(r"\d+")


def answer_matches(reply: str, expected: str, rivals: Collection[str] | None = None, question: str = "") -> bool:
    """Whether ``reply`` is correct: its first non-empty line contains ``expected`` as a whole token.

    With ``rivals`` (the question's other possible answers, `rival_answers`), the claim, the first
    line up to the end of the sentence that first names ``expected``, must also name none of them,
    nor, for a numeric answer, any number but it and those of ``question``: a reply that lists
    candidates ("turtle horse parrot") hedges and is wrong. Without this, RL on this check learns
    within a hundred steps to list every value of the asked kind.
    """
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    if not lines or not expected:
        return False
    found = _mention(lines[0], expected)
    if found is None or rivals is None:
        return found is not None
    end = _SENTENCE_END.search(lines[0], found.end())
    claim = lines[0][:end.end() if end else len(lines[0])]
    if expected.isdigit() and set(_NUMBER_RUN.findall(claim)) - {expected} - set(_NUMBER_RUN.findall(question)):
        return False
    return not any(_mention(claim, rival) for rival in rivals)


def rival_answers(world: World, question: str, expected: str) -> tuple[str, ...]:
    """The other answers a question whose answer is ``expected`` could have, for `answer_matches`:
    the names, in both languages, of the world's other entities of the answer's kind that
    ``question`` (the prompt's text) does not itself name; none for a number (any other number
    is a rival there)."""
    kinds = {e.kind for e in world.entities if expected in (e.name_en, e.name_zh)}
    return tuple(sorted({name for e in world.entities if e.kind in kinds for name in (e.name_en, e.name_zh)
                         if name != expected and name not in question}))


def world_answer_matches(world: World, prompt: str | list[dict], reply: str, expected: str) -> bool:
    """`answer_matches` for a question about ``world`` (``prompt``: its text or messages), with the
    question's rivals: a reply that lists candidates is wrong."""
    question = prompt_text(prompt)
    return answer_matches(reply, expected, rival_answers(world, question, expected), question)


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt's text (every message's), for `answer_matches`'s ``question``."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if isinstance(m.get("content"), str))


def write_instruction_corpus(path: str | os.PathLike, world: World | None = None, split: str = "train",
                             seed: int = 0, **kwargs) -> Path:
    """Write `instruction_conversations` as ``{"messages": [...]}`` JSONL lines, atomically;
    ``kwargs`` go to `instruction_conversations`; ``world`` defaults to ``World()``."""
    records = instruction_conversations(world if world is not None else World(), split=split, seed=seed,
                                        **kwargs)  # bad arguments fail before anything is written
    return write_jsonl(path, records)
