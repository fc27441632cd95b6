"""Documents about the built-in world, for pretraining: generators ``(world, rng, lang) -> text``
registered by name in `DOCUMENT_KINDS`, a deterministic mix of them, and corpus files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Iterator

from ...files import atomic_file
from .world import LANGUAGE_WEIGHTS, LANGUAGES, PRONOUNS, Entity, World, article, check_language, checked_languages

DocumentGenerator = Callable[[World, random.Random, str], str]
DOCUMENT_KINDS: dict[str, DocumentGenerator] = {}


def document_kind(name: str) -> Callable[[DocumentGenerator], DocumentGenerator]:
    """Register a generator under ``name`` so :func:`generate_documents` can draw it."""

    def register(fn: DocumentGenerator) -> DocumentGenerator:
        DOCUMENT_KINDS[name] = fn
        return fn

    return register


_SEPARATOR = {"en": " ", "zh": ""}

# Story beats, in the order they happen during the day; "food" is always told so every story
# states at least the person's city and favourite food.
_STORY_BEATS = ("pet", "colour", "work", "food", "friend")
_STORY = {
    "en": {
        "open": ("{name} woke up early in {city}.",
                 "It was a quiet morning in {city}, and {name} was already awake.",
                 "{name} opened the window and looked out over {city}."),
        "pet": ("{He} fed {his} {pet} before breakfast.",
                "{His} {pet} followed {him} around the house."),
        "colour": ("{He} put on a {colour} coat, because {colour} is {his} favourite colour.",
                   "{He} painted {his} front door {colour}, {his} favourite colour."),
        "work": ("Then {he} went to work at {place}, where {he} works as {a_job} {job}.",
                 "As {a_job} {job}, {he} spent the day at {place}."),
        "food": ("For lunch {he} ate some {food}, {his} favourite food.",
                 "{He} bought some {food} at the market, since {he} loves {food} more than "
                 "anything."),
        "friend": ("In the afternoon {he} visited {his} best friend {friend}, who lives in "
                   "{friend_city}.",
                   "{He} wrote a letter to {his} best friend {friend}, {a_friend_job} {friend_job} "
                   "in {friend_city}."),
        "close": ("At night {he} went to sleep happy.", "It was a good day.",
                  "{He} smiled and went home."),
    },
    "zh": {
        "open": ("一天早上，{name}在{city}的家里醒来。", "{name}住在{city}，今天天气很好。",
                 "{name}打开窗户，看着外面的{city}。"),
        "pet": ("早饭前，{ta}喂了家里的{pet}。", "{ta}的{pet}一直跟着{ta}。"),
        "colour": ("{ta}穿上了一件{colour}的外套，因为{ta}最喜欢{colour}。",
                   "{ta}把家门刷成了{colour}，这是{ta}最喜欢的颜色。"),
        "work": ("然后{ta}去{place}上班，{ta}是一名{job}。", "作为一名{job}，{ta}在{place}忙了一整天。"),
        "food": ("中午{ta}吃了{food}，这是{ta}最喜欢的食物。", "{ta}去市场买了{food}，因为{ta}最爱吃{food}。"),
        "friend": ("下午，{ta}去{friend_city}看望了最好的朋友{friend}。",
                   "{ta}给最好的朋友{friend}写了一封信，{friend}是{friend_city}的一名{friend_job}。"),
        "close": ("晚上，{ta}开开心心地睡着了。", "这真是美好的一天。", "{ta}笑着回家了。"),
    },
}


def _person_context(world: World, person: Entity, lang: str) -> dict[str, str]:
    """Template fields for a story about ``person``, all taken from the world's facts."""

    def value(who: Entity, relation: str) -> str:
        return world.fact(who, relation).answer(lang)

    friend = world.fact(person, "friend_of").value_entity
    job = world.fact(person, "job").value_entity
    context = {
        "name": person.name(lang), "city": value(person, "lives_in"),
        "food": value(person, "favourite_food"), "colour": value(person, "favourite_colour"),
        "pet": value(person, "pet"), "job": value(person, "job"),
        "a_job": article(job.name_en), "place": job.attributes[f"place_{lang}"],
        "friend": friend.name(lang), "friend_city": value(friend, "lives_in"),
        "friend_job": value(friend, "job"),
        "a_friend_job": article(world.fact(friend, "job").value_en),
    }
    context.update(PRONOUNS[lang][person.attributes["gender"]])
    return context


@document_kind("story")
def story(world: World, rng: random.Random, lang: str, person: Entity | None = None) -> str:
    """A 4-6 sentence day in the life of one person (and their best friend), true to the world."""
    check_language(lang)
    if person is None:
        person = rng.choice(world.by_kind("person"))
    context = _person_context(world, person, lang)
    extra = rng.sample([b for b in _STORY_BEATS if b != "food"], rng.randint(1, 3))
    beats = ["open"] + [b for b in _STORY_BEATS if b in extra or b == "food"] + ["close"]
    templates = _STORY[lang]
    sentences = [rng.choice(templates[b]).format(**context) for b in beats]
    return _SEPARATOR[lang].join(sentences)


@document_kind("facts")
def facts_paragraph(world: World, rng: random.Random, lang: str) -> str:
    """Four or more of one person's facts, in a random order, stated plainly."""
    check_language(lang)
    facts = world.facts_about(rng.choice(world.by_kind("person")))
    chosen = rng.sample(facts, rng.randint(4, len(facts)))
    return _SEPARATOR[lang].join(f.sentence(lang) for f in chosen)


_TOWN = {
    "en": {"open": ("{city} is a small town.", "Many people live in {city}."),
           "resident": ("{name} is {a_job} {job} there.",
                        "{name} lives there and works as {a_job} {job}.")},
    "zh": {"open": ("{city}是一座小城。", "很多人住在{city}。"),
           "resident": ("{name}在那里当{job}。", "{name}住在那里，是一名{job}。")},
}


@document_kind("town")
def town(world: World, rng: random.Random, lang: str) -> str:
    """A city and some of the people who live there: the facts seen from the other side."""
    check_language(lang)
    cities = [c for c in world.by_kind("city") if world.residents(c)]
    city = rng.choice(cities)
    residents = world.residents(city)
    chosen = rng.sample(residents, min(len(residents), rng.randint(2, 4)))
    templates = _TOWN[lang]
    sentences = [rng.choice(templates["open"]).format(city=city.name(lang))]
    for person in chosen:
        job = world.fact(person, "job")
        sentences.append(rng.choice(templates["resident"]).format(
            name=person.name(lang), job=job.answer(lang), a_job=article(job.value_en)))
    return _SEPARATOR[lang].join(sentences)


_OPERATORS = {"+": ("+", "加"), "-": ("-", "减"), "*": ("×", "乘")}


def arithmetic_problem(rng: random.Random, lang: str, max_operand: int = 99) -> tuple[str, str]:
    """``("37 + 45 =", "82")`` or ``("37加45等于", "82")``; results are never negative."""
    check_language(lang)
    if max_operand < 2:
        raise ValueError(f"max_operand must be at least 2, got {max_operand}")
    op = rng.choice(("+", "-", "*"))
    if op == "*":
        # Times tables only: a small model can learn them, not long multiplication.
        a, b = rng.randint(2, min(12, max_operand)), rng.randint(2, min(12, max_operand))
        result = a * b
    else:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
    symbol_en, symbol_zh = _OPERATORS[op]
    question = f"{a} {symbol_en} {b} =" if lang == "en" else f"{a}{symbol_zh}{b}等于"
    return question, str(result)


@document_kind("arithmetic")
def arithmetic(world: World, rng: random.Random, lang: str) -> str:
    """Six to ten solved problems, one per line."""
    check_language(lang)
    lines = []
    for _ in range(rng.randint(6, 10)):
        question, answer = arithmetic_problem(rng, lang)
        lines.append(f"{question}{_SEPARATOR[lang]}{answer}")
    return "\n".join(lines)


def generate_documents(
    num_documents: int,
    seed: int = 0,
    languages: tuple[str, ...] | list[str] = LANGUAGES,
    kinds: list[str] | tuple[str, ...] | None = None,
    world: World | None = None,
) -> Iterator[str]:
    """A deterministic stream of documents: same arguments, same documents, byte for byte.

    Each document's kind is drawn uniformly from ``kinds`` (default: every registered kind) and its
    language by weight (60% en, 40% zh when both). ``world`` defaults to ``World()`` whatever the
    seed, so corpora drawn with any seed describe the same people that later stages ask about.
    """
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    languages = checked_languages(languages)
    kinds = list(DOCUMENT_KINDS) if kinds is None else list(kinds)
    if not kinds:
        raise ValueError("kinds must not be empty")
    unknown = [k for k in kinds if k not in DOCUMENT_KINDS]
    if unknown:
        raise ValueError(
            f"unknown document kind(s) {', '.join(map(repr, unknown))}; "
            f"known kinds: {', '.join(DOCUMENT_KINDS)}"
        )
    world = world if world is not None else World()
    weights = [LANGUAGE_WEIGHTS[lang] for lang in languages]

    # Validation above runs at call time; only the drawing is lazy.
    def stream() -> Iterator[str]:
        rng = random.Random(seed)
        for _ in range(num_documents):
            lang = rng.choices(languages, weights)[0]
            yield DOCUMENT_KINDS[rng.choice(kinds)](world, rng, lang)

    return stream()


def write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write ``records`` (dicts) as JSONL lines to ``path`` atomically (a reader never sees half a
    corpus), creating its directory."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    return atomic_file(Path(path), write)


def write_corpus(path: str | os.PathLike, num_documents: int, seed: int = 0, **kwargs) -> Path:
    """Write ``{"text": ...}`` JSONL lines atomically; ``kwargs`` go to ``generate_documents``."""
    documents = generate_documents(num_documents, seed=seed, **kwargs)  # bad arguments fail here
    return write_jsonl(path, ({"text": text} for text in documents))
