"""The synthetic world: deterministic, bilingual, internally consistent, with correct arithmetic."""

import json
import random
import re

import pytest

from orchard.data.synthetic import (
    DOCUMENT_KINDS,
    RELATIONS,
    World,
    arithmetic_problem,
    generate_documents,
    story,
    write_corpus,
)

CJK = re.compile(r"[\u4e00-\u9fff]")
EN_PROBLEM = re.compile(r"^(\d+) ([+\-×]) (\d+) =$")
ZH_PROBLEM = re.compile(r"^(\d+)([加减乘])(\d+)等于$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
       "加": lambda a, b: a + b, "减": lambda a, b: a - b, "乘": lambda a, b: a * b}


@pytest.fixture(scope="module")
def world():
    return World()


def evaluate(question: str, lang: str) -> int:
    match = (EN_PROBLEM if lang == "en" else ZH_PROBLEM).match(question)
    assert match, f"unparseable {lang} problem {question!r}"
    a, op, b = match.groups()
    return OPS[op](int(a), int(b))


def test_world_is_determined_by_its_arguments(world):
    again = World()
    assert again.entities == world.entities and again.facts == world.facts
    assert World(seed=1).facts != world.facts
    assert len(World(num_people=7).by_kind("person")) == 7


def test_world_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="num_people"):
        World(num_people=10_000)


def test_every_person_has_one_fact_per_relation_and_unique_names(world):
    people = world.by_kind("person")
    assert len(people) == 60
    assert len({p.name_en for p in people}) == 60 and len({p.name_zh for p in people}) == 60
    for person in people:
        assert sorted(f.relation for f in world.facts_about(person)) == sorted(RELATIONS)
        friend = world.fact(person, "friend_of").value_entity
        assert friend != person and friend.kind == "person"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fact_sentence_states_its_answer(world, lang):
    for fact in world.facts:
        sentence, question, answer = fact.sentence(lang), fact.question(lang), fact.answer(lang)
        assert answer and answer in sentence
        assert fact.subject.name(lang) in sentence and fact.subject.name(lang) in question
        assert question.endswith("?" if lang == "en" else "？")
        if lang == "zh":
            assert CJK.search(sentence) and CJK.search(question)


def test_fact_rendering_matches_the_documented_shape(world):
    fact = next(f for f in world.facts if f.relation == "lives_in")
    name, city = fact.subject.name_en, fact.value_en
    assert fact.sentence("en") == f"{name} lives in {city}."
    assert fact.question("en") == f"Where does {name} live?"
    assert fact.sentence("zh") == f"{fact.subject.name_zh}住在{fact.value_zh}。"
    with pytest.raises(ValueError, match="fr"):
        fact.sentence("fr")


def test_split_facts_is_disjoint_complete_and_deterministic(world):
    kept, held = world.split_facts(0.2)
    assert len(held) == round(0.2 * len(world.facts))
    assert not set(kept) & set(held)
    assert sorted(map(world.facts.index, kept + held)) == list(range(len(world.facts)))
    assert (kept, held) == World().split_facts(0.2)
    assert world.split_facts(0.0) == (world.facts, [])
    assert set(world.split_facts(0.1)[1]) < set(held)  # nested, so experiments can be compared
    with pytest.raises(ValueError):
        world.split_facts(1.5)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_story_is_consistent_with_the_world(world, lang):
    rng = random.Random(0)
    cities = [c.name(lang) for c in world.by_kind("city")]
    foods = [f.name_en for f in world.by_kind("food")]
    for person in world.by_kind("person"):
        text = story(world, rng, lang, person=person)
        city = world.fact(person, "lives_in").answer(lang)
        food = world.fact(person, "favourite_food").answer(lang)
        assert person.name(lang) in text and city in text and food in text
        friend = world.fact(person, "friend_of").value_entity
        allowed = {city, world.fact(friend, "lives_in").answer(lang)}
        assert {c for c in cities if c in text} <= allowed
        if lang == "en":  # whole words: Chinese food names can be parts of other words (面包师)
            assert {f for f in foods if re.search(rf"\b{f}\b", text)} == {food}


def test_stories_vary(world):
    rng = random.Random(0)
    person = world.by_kind("person")[0]
    assert len({story(world, rng, "en", person=person) for _ in range(20)}) > 5


def test_town_documents_name_only_residents(world):
    rng = random.Random(0)
    people = world.by_kind("person")
    for _ in range(50):
        text = DOCUMENT_KINDS["town"](world, rng, "en")
        named = [p for p in people if p.name_en in text]
        assert len(named) >= 1
        for person in named:
            assert world.fact(person, "lives_in").value_en in text


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_arithmetic_problems_are_correct(lang):
    rng = random.Random(0)
    ops = set()
    for _ in range(500):
        question, answer = arithmetic_problem(rng, lang)
        assert int(answer) == evaluate(question, lang) >= 0
        ops.add(re.sub(r"[\d =等于]", "", question))
    assert len(ops) == 3


def test_arithmetic_documents_are_correct(world):
    rng = random.Random(1)
    for lang in ("en", "zh"):
        for _ in range(50):
            for line in DOCUMENT_KINDS["arithmetic"](world, rng, lang).splitlines():
                if lang == "en":
                    question, answer = line.rsplit(" ", 1)
                else:
                    question, answer = re.fullmatch(r"(.*等于)(\d+)", line).groups()
                assert int(answer) == evaluate(question, lang)


def test_generate_documents_is_deterministic():
    docs = list(generate_documents(100, seed=3))
    assert docs == list(generate_documents(100, seed=3))
    assert docs != list(generate_documents(100, seed=4))
    assert list(generate_documents(10, seed=3)) == docs[:10]


def test_default_mix_has_both_languages_and_all_kinds():
    docs = list(generate_documents(500, seed=0))
    zh = [d for d in docs if CJK.search(d)]
    assert 0.3 < len(zh) / len(docs) < 0.5
    assert all(20 <= len(d) <= 600 for d in docs)
    assert any("lives in" in d for d in docs) and any("住在" in d for d in docs)
    assert any(EN_PROBLEM.match(d.splitlines()[0].rsplit(" ", 1)[0]) for d in docs)


def test_language_and_kind_filters():
    en_only = list(generate_documents(100, languages=("en",)))
    assert not any(CJK.search(d) for d in en_only)
    zh_only = list(generate_documents(100, languages=["zh"]))
    assert all(CJK.search(d) for d in zh_only)
    arithmetic_only = list(generate_documents(50, kinds=["arithmetic"]))
    assert all(re.fullmatch(r"[\d +\-×=加减乘等于\n]+", d) for d in arithmetic_only)


def test_unknown_kind_or_language_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="poetry"):
        generate_documents(5, kinds=["story", "poetry"])
    with pytest.raises(ValueError, match="fr"):
        generate_documents(5, languages=["fr"])


def test_custom_world_is_used():
    small = World(seed=5, num_people=4)
    names = [p.name_en for p in small.by_kind("person")]
    docs = list(generate_documents(30, kinds=["facts"], languages=["en"], world=small))
    assert all(any(n in d for n in names) for d in docs)


def test_write_corpus_writes_valid_jsonl(tmp_path):
    path = write_corpus(tmp_path / "sub" / "corpus.jsonl", 40, seed=2)
    assert path == tmp_path / "sub" / "corpus.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 40
    texts = [json.loads(line)["text"] for line in lines]
    assert texts == list(generate_documents(40, seed=2))
    assert any(CJK.search(line) for line in lines), "Chinese must be UTF-8, not \\u escapes"
    assert [p.name for p in path.parent.iterdir()] == ["corpus.jsonl"]  # no temp file left behind


def test_write_corpus_forwards_options_and_keeps_old_file_on_error(tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", 5, kinds=["arithmetic"], languages=["zh"])
    before = path.read_text(encoding="utf-8")
    assert "等于" in before and "+" not in before
    with pytest.raises(ValueError, match="nope"):
        write_corpus(path, 5, kinds=["nope"])
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]
