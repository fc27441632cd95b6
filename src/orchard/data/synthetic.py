"""A small, seeded, bilingual (English and Chinese) synthetic world and documents about it.

This is the data orchard ships with: ``orchard quickstart`` pretrains on it and the tests use it,
so nothing has to be downloaded. It has two layers:

* :class:`World` -- people, cities, foods, colours, animals and jobs (:class:`Entity`), and the
  checkable statements linking them (:class:`Fact`). A world is fully determined by its
  arguments, and every fact renders as a sentence, a question and an answer in both languages.
* Document generators -- small functions ``(world, rng, lang) -> text`` registered by name in
  :data:`DOCUMENT_KINDS`. :func:`generate_documents` draws a deterministic mix of them.

Later stages grow it without changing what is here: instruction data asks ``fact.question()``
and expects ``fact.answer()``; preference pairs take wrong answers from the other entities of the
same kind (``world.by_kind(...)``); verifiable prompts are the exact-match items; a new
kind of document is one more function decorated with :func:`document_kind`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

LANGUAGES = ("en", "zh")
# Most users read the English samples first; Chinese stays large enough to be learned well.
_LANGUAGE_WEIGHTS = {"en": 0.6, "zh": 0.4}


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; expected one of {', '.join(LANGUAGES)}")


def _checked_languages(languages) -> list[str]:
    languages = list(languages)
    if not languages:
        raise ValueError("languages must not be empty")
    for lang in languages:
        _check_lang(lang)
    return languages


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass(frozen=True)
class Entity:
    """A named thing in the world. ``attributes`` holds rendering details (gender, measure word)."""

    kind: str
    name_en: str
    name_zh: str
    # Left out of equality and hashing: names identify an entity, and a dict cannot be hashed.
    attributes: dict = field(default_factory=dict, compare=False, hash=False)

    def name(self, lang: str) -> str:
        _check_lang(lang)
        return self.name_en if lang == "en" else self.name_zh


# relation -> language -> (sentence template, question template). Fields: {s} subject, {v} value,
# {a} English article of the value, {m} Chinese measure word of the value.
RELATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "lives_in": {
        "en": ("{s} lives in {v}.", "Where does {s} live?"),
        "zh": ("{s}住在{v}。", "{s}住在哪里？"),
    },
    "job": {
        "en": ("{s} works as {a} {v}.", "What is {s}'s job?"),
        "zh": ("{s}是一名{v}。", "{s}的工作是什么？"),
    },
    "favourite_food": {
        "en": ("{s}'s favourite food is {v}.", "What is {s}'s favourite food?"),
        "zh": ("{s}最喜欢的食物是{v}。", "{s}最喜欢的食物是什么？"),
    },
    "favourite_colour": {
        "en": ("{s}'s favourite colour is {v}.", "What is {s}'s favourite colour?"),
        "zh": ("{s}最喜欢的颜色是{v}。", "{s}最喜欢什么颜色？"),
    },
    "pet": {
        "en": ("{s} has a pet {v}.", "What pet does {s} have?"),
        "zh": ("{s}养了一{m}{v}。", "{s}养了什么宠物？"),
    },
    "age": {
        "en": ("{s} is {v} years old.", "How old is {s}?"),
        "zh": ("{s}今年{v}岁。", "{s}今年多少岁？"),
    },
    "friend_of": {
        "en": ("{s}'s best friend is {v}.", "Who is {s}'s best friend?"),
        "zh": ("{s}最好的朋友是{v}。", "{s}最好的朋友是谁？"),
    },
}


@dataclass(frozen=True)
class Fact:
    """One checkable statement about ``subject``; ``value_entity`` is set if the value is one."""

    subject: Entity
    relation: str
    value_en: str
    value_zh: str
    value_entity: Entity | None = None

    def _render(self, lang: str, which: int) -> str:
        _check_lang(lang)
        measure = self.value_entity.attributes.get("measure_zh", "个") if self.value_entity else "个"
        template = RELATIONS[self.relation][lang][which]
        return template.format(
            s=self.subject.name(lang), v=self.answer(lang), a=_article(self.value_en), m=measure
        )

    def sentence(self, lang: str) -> str:
        return self._render(lang, 0)

    def question(self, lang: str) -> str:
        return self._render(lang, 1)

    def answer(self, lang: str) -> str:
        _check_lang(lang)
        return self.value_en if lang == "en" else self.value_zh


# Small on purpose: a model of a few million parameters should learn every name in minutes.
_FIRST_NAMES = [  # (English, Chinese, gender)
    ("Mira", "米拉", "f"), ("Anna", "安娜", "f"), ("Lily", "莉莉", "f"), ("Rosa", "罗莎", "f"),
    ("Nina", "尼娜", "f"), ("Clara", "克拉拉", "f"), ("Emma", "艾玛", "f"), ("Lucy", "露西", "f"),
    ("Sara", "萨拉", "f"), ("Ella", "艾拉", "f"), ("Maya", "玛雅", "f"), ("Iris", "艾丽丝", "f"),
    ("Tom", "汤姆", "m"), ("Leo", "利奥", "m"), ("Sam", "萨姆", "m"), ("Ben", "本", "m"),
    ("Max", "马克斯", "m"), ("Oscar", "奥斯卡", "m"), ("Felix", "菲利克斯", "m"), ("Hugo", "雨果", "m"),
    ("Jack", "杰克", "m"), ("Owen", "欧文", "m"), ("Theo", "西奥", "m"), ("Adam", "亚当", "m"),
]
_LAST_NAMES = [
    ("Stone", "斯通"), ("Reed", "里德"), ("Hill", "希尔"), ("Brook", "布鲁克"), ("Wood", "伍德"),
    ("Parker", "帕克"), ("Moore", "摩尔"), ("Grant", "格兰特"), ("Lane", "莱恩"), ("Cole", "科尔"),
    ("Ford", "福特"), ("West", "韦斯特"), ("Fox", "福克斯"), ("Bell", "贝尔"), ("Hart", "哈特"),
    ("Snow", "斯诺"),
]
_CITIES = [
    ("Port Amber", "琥珀港"), ("Maple Hill", "枫山"), ("Silver Bay", "银湾"), ("Stonebridge", "石桥镇"),
    ("Redwater", "红水城"), ("Greenfield", "绿野镇"), ("Lakeside", "湖畔村"), ("North Harbor", "北港"),
    ("Cloudpeak", "云峰城"), ("Riverton", "河口镇"), ("Sunvale", "阳谷"), ("Pine Ridge", "松岭"),
]
# Chosen so no food's name is part of another word in the world (no "fish" next to "goldfish").
_FOODS = [
    ("bread", "面包"), ("rice", "米饭"), ("noodles", "面条"), ("apples", "苹果"),
    ("dumplings", "饺子"), ("soup", "汤"), ("cheese", "奶酪"), ("cake", "蛋糕"),
    ("oranges", "橙子"), ("tofu", "豆腐"), ("pears", "梨"), ("honey", "蜂蜜"),
]
_COLOURS = [
    ("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"),
    ("purple", "紫色"), ("orange", "橙色"), ("white", "白色"), ("black", "黑色"),
]
_ANIMALS = [  # (English, Chinese, Chinese measure word)
    ("cat", "猫", "只"), ("dog", "狗", "条"), ("rabbit", "兔子", "只"), ("parrot", "鹦鹉", "只"),
    ("goldfish", "金鱼", "条"), ("turtle", "乌龟", "只"), ("hamster", "仓鼠", "只"), ("horse", "马", "匹"),
]
_JOBS = [  # (English, Chinese, workplace English, workplace Chinese)
    ("baker", "面包师", "the bakery", "面包店"), ("teacher", "老师", "the school", "学校"),
    ("doctor", "医生", "the hospital", "医院"), ("farmer", "农民", "the farm", "农场"),
    ("nurse", "护士", "the clinic", "诊所"), ("painter", "画家", "the studio", "画室"),
    ("carpenter", "木匠", "the workshop", "木工坊"), ("librarian", "图书管理员", "the library", "图书馆"),
    ("driver", "司机", "the bus station", "汽车站"), ("cook", "厨师", "the restaurant", "饭店"),
    ("gardener", "园丁", "the park", "公园"), ("engineer", "工程师", "the factory", "工厂"),
]


class World:
    """People and places with facts about them; the same arguments always give the same world."""

    def __init__(self, seed: int = 0, num_people: int = 60):
        max_people = len(_FIRST_NAMES) * len(_LAST_NAMES)
        if not 2 <= num_people <= max_people:
            raise ValueError(f"num_people must be between 2 and {max_people}, got {num_people}")
        self.seed = seed
        self.num_people = num_people
        rng = random.Random(seed)

        cities = [Entity("city", en, zh) for en, zh in _CITIES]
        foods = [Entity("food", en, zh) for en, zh in _FOODS]
        colours = [Entity("colour", en, zh) for en, zh in _COLOURS]
        animals = [Entity("animal", en, zh, {"measure_zh": m}) for en, zh, m in _ANIMALS]
        jobs = [Entity("job", en, zh, {"place_en": pe, "place_zh": pz}) for en, zh, pe, pz in _JOBS]
        names = rng.sample([(f, l) for f in _FIRST_NAMES for l in _LAST_NAMES], num_people)
        people = [
            Entity("person", f"{first} {last}", f"{first_zh}·{last_zh}", {"gender": gender})
            for (first, first_zh, gender), (last, last_zh) in names
        ]
        self.entities: list[Entity] = people + cities + foods + colours + animals + jobs

        # Pair people up so "best friend" has one answer; with an odd count the last one's best
        # friend is someone already paired (not mutual, but still a single answer).
        order = rng.sample(people, len(people))
        best_friend = {}
        for i in range(0, len(order) - 1, 2):
            best_friend[order[i]], best_friend[order[i + 1]] = order[i + 1], order[i]
        if len(order) % 2:
            best_friend[order[-1]] = order[0]

        self.facts: list[Fact] = []
        for person in people:
            for relation, pool in (
                ("lives_in", cities), ("job", jobs), ("favourite_food", foods),
                ("favourite_colour", colours), ("pet", animals),
            ):
                value = rng.choice(pool)
                self.facts.append(Fact(person, relation, value.name_en, value.name_zh, value))
            age = str(rng.randint(20, 70))
            self.facts.append(Fact(person, "age", age, age))
            friend = best_friend[person]
            self.facts.append(Fact(person, "friend_of", friend.name_en, friend.name_zh, friend))

        self._facts_by_subject: dict[Entity, dict[str, Fact]] = {}
        for fact in self.facts:
            self._facts_by_subject.setdefault(fact.subject, {})[fact.relation] = fact

    def by_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def facts_about(self, entity: Entity) -> list[Fact]:
        return list(self._facts_by_subject.get(entity, {}).values())

    def fact(self, entity: Entity, relation: str) -> Fact:
        return self._facts_by_subject[entity][relation]

    def residents(self, city: Entity) -> list[Entity]:
        return [f.subject for f in self.facts
                if f.relation == "lives_in" and f.value_entity == city]

    def split_facts(self, held_out_fraction: float = 0.2) -> tuple[list[Fact], list[Fact]]:
        """(kept, held_out), both in world order; the held-out set depends only on the world."""
        if not 0.0 <= held_out_fraction <= 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
        # A string seed is hashed with SHA-512, so the split is stable across processes; leaving
        # the fraction out of it makes a smaller held-out set part of every larger one.
        rng = random.Random(f"split:{self.seed}:{self.num_people}")
        order = rng.sample(range(len(self.facts)), len(self.facts))
        held = set(order[: round(len(self.facts) * held_out_fraction)])
        kept = [f for i, f in enumerate(self.facts) if i not in held]
        return kept, [f for i, f in enumerate(self.facts) if i in held]


DocumentGenerator = Callable[[World, random.Random, str], str]
DOCUMENT_KINDS: dict[str, DocumentGenerator] = {}


def document_kind(name: str) -> Callable[[DocumentGenerator], DocumentGenerator]:
    """Register a generator under ``name`` so :func:`generate_documents` can draw it."""

    def register(fn: DocumentGenerator) -> DocumentGenerator:
        DOCUMENT_KINDS[name] = fn
        return fn

    return register


_PRONOUNS = {
    "en": {"f": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"},
           "m": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him"}},
    "zh": {"f": {"ta": "她"}, "m": {"ta": "他"}},
}
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
        "a_job": _article(job.name_en), "place": job.attributes[f"place_{lang}"],
        "friend": friend.name(lang), "friend_city": value(friend, "lives_in"),
        "friend_job": value(friend, "job"),
        "a_friend_job": _article(world.fact(friend, "job").value_en),
    }
    context.update(_PRONOUNS[lang][person.attributes["gender"]])
    return context


@document_kind("story")
def story(world: World, rng: random.Random, lang: str, person: Entity | None = None) -> str:
    """A 4-6 sentence day in the life of one person (and their best friend), true to the world."""
    _check_lang(lang)
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
    _check_lang(lang)
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
    _check_lang(lang)
    cities = [c for c in world.by_kind("city") if world.residents(c)]
    city = rng.choice(cities)
    residents = world.residents(city)
    chosen = rng.sample(residents, min(len(residents), rng.randint(2, 4)))
    templates = _TOWN[lang]
    sentences = [rng.choice(templates["open"]).format(city=city.name(lang))]
    for person in chosen:
        job = world.fact(person, "job")
        sentences.append(rng.choice(templates["resident"]).format(
            name=person.name(lang), job=job.answer(lang), a_job=_article(job.value_en)))
    return _SEPARATOR[lang].join(sentences)


_OPERATORS = {"+": ("+", "加"), "-": ("-", "减"), "*": ("×", "乘")}


def arithmetic_problem(rng: random.Random, lang: str, max_operand: int = 99) -> tuple[str, str]:
    """``("37 + 45 =", "82")`` or ``("37加45等于", "82")``; results are never negative."""
    _check_lang(lang)
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
    _check_lang(lang)
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
    languages = _checked_languages(languages)
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
    weights = [_LANGUAGE_WEIGHTS[lang] for lang in languages]

    # Validation above runs at call time; only the drawing is lazy.
    def stream() -> Iterator[str]:
        rng = random.Random(seed)
        for _ in range(num_documents):
            lang = rng.choices(languages, weights)[0]
            yield DOCUMENT_KINDS[rng.choice(kinds)](world, rng, lang)

    return stream()


def write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write ``records`` (dicts) as JSONL lines to ``path`` atomically, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory so os.replace is a rename on one filesystem: a reader never
    # sees half a corpus, even if we are interrupted.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_corpus(path: str | os.PathLike, num_documents: int, seed: int = 0, **kwargs) -> Path:
    """Write ``{"text": ...}`` JSONL lines atomically; ``kwargs`` go to ``generate_documents``."""
    documents = generate_documents(num_documents, seed=seed, **kwargs)  # bad arguments fail here
    return write_jsonl(path, ({"text": text} for text in documents))


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
_SPLITS = ("train", "held_out")
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


def _word_problem(world: World, rng: random.Random, lang: str, split: str) -> tuple[str, str]:
    op, a, b, result = _draw_operands(rng, split)
    people = world.by_kind("person")
    person = rng.choice(people)
    friend = world.fact(person, "friend_of").value_entity
    item_en, item_zh, measure = rng.choice(_ITEMS)
    fields = {"name": person.name(lang), "friend": friend.name(lang), "a": a, "b": b,
              "item": item_en if lang == "en" else item_zh, "m": measure}
    fields.update(_PRONOUNS[lang][person.attributes["gender"]])
    return rng.choice(_WORD_PROBLEMS[op][lang]).format(**fields), str(result)


def _follow_up(question: str, lang: str) -> str:
    return _FOLLOW_UP[lang].format(q=question[0].lower() + question[1:] if lang == "en" else question)


def _instruction_items(world: World, split: str, seed: int, languages, num_conversations: int | None,
                       held_out_fraction: float) -> list[tuple[list[dict], str]]:
    """(messages ending with the assistant's answer, expected answer string) for every conversation."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    languages = _checked_languages(languages)
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
            question, expected = _word_problem(world, rng, lang, split)
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
    items = _instruction_items(world, split, seed, languages, num_conversations, held_out_fraction)
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
    items = _instruction_items(world, split, seed, languages, num_items, held_out_fraction)
    return [(messages[:-1], expected) for messages, expected in items]


def answer_matches(reply: str, expected: str) -> bool:
    """Whether ``reply`` is correct: its first non-empty line contains ``expected`` as a whole token.

    "Whole" means an occurrence not preceded or followed by an ASCII letter or digit where
    ``expected`` starts or ends with one, so "19" is not found in "119", "190" or "19.5", and
    "orange" not in "oranges"; Chinese text has no word boundaries and is matched as a substring.
    """
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    if not lines or not expected:
        return False
    left = r"(?<![A-Za-z0-9])(?<![0-9][.,])" if expected[0].isascii() and expected[0].isalnum() else ""
    right = r"(?![A-Za-z0-9])(?![.,][0-9])" if expected[-1].isascii() and expected[-1].isalnum() else ""
    return re.search(left + re.escape(expected) + right, lines[0]) is not None


def write_instruction_corpus(path: str | os.PathLike, world: World | None = None, split: str = "train",
                             seed: int = 0, **kwargs) -> Path:
    """Write `instruction_conversations` as ``{"messages": [...]}`` JSONL lines, atomically;
    ``kwargs`` go to `instruction_conversations`; ``world`` defaults to ``World()``."""
    records = instruction_conversations(world if world is not None else World(), split=split, seed=seed,
                                        **kwargs)  # bad arguments fail before anything is written
    return write_jsonl(path, records)


# --- preference pairs and verifiable prompts -------------------------------------------------------
#
# For alignment: the instruction questions again (same splits), each with its correct answer chosen
# over a wrong or an unhelpful one, in TRL's conversational preference form; and as prompts with an
# answer a reply can be checked against, for methods that sample their own replies.

_UNHELPFUL = {
    "en": ("I don't know.", "I'm not sure, sorry.", "Sorry, I can't help with that.", "I have no idea."),
    "zh": ("我不知道。", "我不太确定，抱歉。", "抱歉，我回答不了这个问题。", "我也不清楚。"),
}
_WRONG_RATE = 0.5
# Wrong numbers (results, ages) are near the right one: plausible, as a careless answer would be.
_NEAR_MISSES = (-3, -2, -1, 1, 2, 3)


def _with_value(fact: Fact, value: Entity | str) -> Fact:
    """``fact`` with another value, an entity of the same kind or a number, to render wrong sentences."""
    if isinstance(value, Entity):
        return replace(fact, value_en=value.name_en, value_zh=value.name_zh, value_entity=value)
    return replace(fact, value_en=value, value_zh=value, value_entity=None)


def _wrong_answers(world: World, fact: Fact | None, lang: str, chosen: str) -> list[str]:
    """Answers of the same form as ``chosen`` with a wrong value: the fact's sentence with another
    entity of the value's kind (never the subject itself) or a near age, or a near number for a
    word problem (``fact`` None)."""
    if fact is None:
        return [str(int(chosen) + d) for d in _NEAR_MISSES if int(chosen) + d >= 0]
    if fact.value_entity is None:
        return [_with_value(fact, str(int(fact.value_en) + d)).sentence(lang) for d in _NEAR_MISSES]
    return [_with_value(fact, other).sentence(lang) for other in world.by_kind(fact.value_entity.kind)
            if other not in (fact.value_entity, fact.subject)]


def _rejection(candidates, chosen: str, expected: str, rng: random.Random) -> str | None:
    """A random one of ``candidates`` that differs from ``chosen`` and `answer_matches` would not
    accept, or None if there is none."""
    usable = [c for c in candidates if c != chosen and not answer_matches(c, expected)]
    return rng.choice(usable) if usable else None


def preference_pairs(world: World, split: str = "train", seed: int = 0,
                     languages: tuple[str, ...] | list[str] = LANGUAGES, num_pairs: int | None = None,
                     held_out_fraction: float = 0.2) -> list[dict]:
    """Deterministic preference pairs in TRL's conversational form, ``{"prompt": [messages],
    "chosen": [assistant message], "rejected": [assistant message], "kind": "wrong"|"unhelpful"}``.

    The prompts and chosen answers are those of `instruction_conversations` with the same arguments
    (so the splits match `exact_match_items`): the fact's sentence or the word problem's number. The
    rejected answer is, for about half, "wrong": the same form with a wrong value (the sentence with
    another city, food, person... of the right kind, or a near age; a number off by 1 to 3), never
    one `answer_matches` accepts; for the rest "unhelpful": "I don't know." or the like in the
    conversation's language.
    """
    items = _instruction_items(world, split, seed, languages, num_pairs, held_out_fraction)
    facts = {fact.sentence(lang): fact for fact in world.facts for lang in LANGUAGES}
    rng = random.Random(f"preferences:{seed}:{split}")
    pairs = []
    for messages, expected in items:
        chosen = messages[-1]["content"]
        # English questions are plain ASCII, names included; Chinese ones never are.
        lang = "en" if messages[-2]["content"].isascii() else "zh"
        kind, rejected = "wrong", None
        if rng.random() < _WRONG_RATE:
            rejected = _rejection(_wrong_answers(world, facts.get(chosen), lang, chosen), chosen, expected, rng)
        if rejected is None:
            kind, rejected = "unhelpful", _rejection(_UNHELPFUL[lang], chosen, expected, rng)
        pairs.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], "kind": kind})
    return pairs


def write_preference_corpus(path: str | os.PathLike, world: World | None = None, split: str = "train",
                            seed: int = 0, **kwargs) -> Path:
    """Write `preference_pairs` as JSONL lines, atomically; ``kwargs`` go to `preference_pairs`;
    ``world`` defaults to ``World()``. `orchard.data.preferences.read_preference_pairs` reads it."""
    records = preference_pairs(world if world is not None else World(), split=split, seed=seed,
                               **kwargs)  # bad arguments fail before anything is written
    return write_jsonl(path, records)


def verifiable_prompts(world: World, split: str = "train", seed: int = 0,
                       languages: tuple[str, ...] | list[str] = LANGUAGES, num_items: int | None = None,
                       held_out_fraction: float = 0.2) -> list[dict]:
    """`exact_match_items` as ``{"prompt": [messages up to the last user turn], "answer": expected}``
    records (`orchard.data.preferences.read_prompts` reads them), for methods that sample replies
    and reward the ones `answer_matches` accepts."""
    return [{"prompt": prompt, "answer": expected}
            for prompt, expected in exact_match_items(world, split, seed, languages, num_items, held_out_fraction)]


# --- continual-learning tasks --------------------------------------------------------------------
#
# Three tasks trained one after another, to measure forgetting: word problems, then English fact
# questions, then the same facts asked in Chinese (a new language as the last task). Each is a plain
# one-turn exchange with no system prompt, so the tasks differ in content and language only, and
# the same items serve as training conversations and as exact-match evaluation.

CONTINUAL_TASKS = ("arithmetic", "facts-en", "facts-zh")
# Default word-problem counts: about as many as the fact tasks of a default world have (336 train,
# 84 held-out facts), so no task dominates by size; the operand space holds ~11,900 train and
# ~3,000 held-out problems, so sums and differences rarely repeat (times tables do, there are 121).
_CONTINUAL_ARITHMETIC_ITEMS = {"train": 400, "held_out": 100}


def continual_task(world: World, name: str, split: str = "train", seed: int = 0,
                   num_items: int | None = None,
                   held_out_fraction: float = 0.2) -> list[tuple[list[dict], str]]:
    """One task of the continual stream as ``(messages ending with the assistant's answer, expected
    answer)``; drop the last message to prompt a model and judge its reply with `answer_matches`.

    * "arithmetic": the word problems of the instruction data, in both languages (chosen at
      random per item), answered by the bare number; ``split`` picks problems by the same operand
      hash (`_arithmetic_split`), so no problem is in both splits. Default 400 train / 100 held_out.
    * "facts-en" / "facts-zh": one question about a fact (``fact.question(lang)``) answered by its
      sentence, in English or in Chinese; "train" asks about the facts `World.split_facts` keeps and
      "held_out" about the held-out ones, exactly as the instruction data does, so no held-out item
      asks about a fact a training item states. Facts are dealt from a shuffled deck refilled when
      empty; the default count is one deck, every fact of the split asked once.

    Deterministic in (world, name, split, seed, held_out_fraction); the first ``k`` items of a longer
    list are the ``k``-item list.
    """
    if name not in CONTINUAL_TASKS:
        raise ValueError(f"unknown continual task {name!r}; expected one of {', '.join(CONTINUAL_TASKS)}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    if num_items is not None and num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    rng = random.Random(f"continual:{name}:{seed}:{split}")
    items = []
    if name == "arithmetic":
        count = _CONTINUAL_ARITHMETIC_ITEMS[split] if num_items is None else num_items
        for _ in range(count):
            lang = rng.choice(LANGUAGES)
            question, expected = _word_problem(world, rng, lang, split)
            items.append(([{"role": "user", "content": question},
                           {"role": "assistant", "content": expected}], expected))
        return items

    lang = "en" if name == "facts-en" else "zh"
    kept, held = world.split_facts(held_out_fraction)
    facts = kept if split == "train" else held
    if not facts:
        raise ValueError(f"the {split} split has no facts (held_out_fraction={held_out_fraction})")
    count = len(facts) if num_items is None else num_items
    deck: list[Fact] = []
    for _ in range(count):
        if not deck:
            deck = list(facts)
            rng.shuffle(deck)
        fact = deck.pop()
        items.append(([{"role": "user", "content": fact.question(lang)},
                       {"role": "assistant", "content": fact.sentence(lang)}], fact.answer(lang)))
    return items


def continual_task_conversations(world: World, name: str, split: str = "train", seed: int = 0,
                                 num_items: int | None = None,
                                 held_out_fraction: float = 0.2) -> list[dict]:
    """`continual_task` as ``[{"messages": [...]}, ...]`` training records, the form
    `instruction_conversations` returns and `write_jsonl` writes."""
    return [{"messages": messages}
            for messages, _ in continual_task(world, name, split, seed, num_items, held_out_fraction)]
