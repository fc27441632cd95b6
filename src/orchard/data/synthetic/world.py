"""The built-in world: people, cities, foods, colours, animals and jobs (`Entity`), and the checkable
statements linking them (`Fact`), seeded and bilingual (English and Chinese)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LANGUAGES = ("en", "zh")
# Most users read the English samples first; Chinese stays large enough to be learned well.
LANGUAGE_WEIGHTS = {"en": 0.6, "zh": 0.4}


def check_language(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; expected one of {', '.join(LANGUAGES)}")


def checked_languages(languages) -> list[str]:
    languages = list(languages)
    if not languages:
        raise ValueError("languages must not be empty")
    for lang in languages:
        check_language(lang)
    return languages


def article(word: str) -> str:
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
        check_language(lang)
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
        check_language(lang)
        measure = self.value_entity.attributes.get("measure_zh", "个") if self.value_entity else "个"
        template = RELATIONS[self.relation][lang][which]
        return template.format(
            s=self.subject.name(lang), v=self.answer(lang), a=article(self.value_en), m=measure
        )

    def sentence(self, lang: str) -> str:
        return self._render(lang, 0)

    def question(self, lang: str) -> str:
        return self._render(lang, 1)

    def answer(self, lang: str) -> str:
        check_language(lang)
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


# Pronoun stand-ins of templates by language and gender, as a person's text is written.
PRONOUNS = {
    "en": {"f": {"He": "She", "he": "she", "His": "Her", "his": "her", "him": "her"},
           "m": {"He": "He", "he": "he", "His": "His", "his": "his", "him": "him"}},
    "zh": {"f": {"ta": "她"}, "m": {"ta": "他"}},
}
