"""The synthetic world: deterministic, bilingual, internally consistent, with correct arithmetic."""

import json
import random
import re

import pytest

from orchard.data.synthetic import (
    CONTINUAL_TASKS,
    DOCUMENT_KINDS,
    RELATIONS,
    World,
    answer_matches,
    rival_answers,
    world_answer_matches,
    arithmetic_problem,
    continual_task,
    continual_task_conversations,
    exact_match_items,
    generate_documents,
    instruction_conversations,
    story,
    write_corpus,
    write_instruction_corpus,
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


# --- instruction data -------------------------------------------------------------------------------


def test_pretraining_documents_are_unchanged():
    import hashlib

    digest = hashlib.sha256("\x00".join(generate_documents(200, seed=0)).encode()).hexdigest()
    assert digest == "31ba2ba3011c107beb715fe7748a7194d3afca610406ddf0ea099df32483512e"


def user_turns(records) -> list[str]:
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]


def evaluate_word_problem(question: str) -> int:
    a, b = map(int, re.findall(r"\d+", question))
    if any(word in question for word in ("boxes", "bags", "每")):
        return a * b
    if any(word in question for word in ("more", "又")):
        return a + b
    assert any(word in question for word in ("gives", "lost", "给了", "丢了")), question
    return a - b


@pytest.fixture(scope="module")
def instructions(world):
    return {split: instruction_conversations(world, split) for split in ("train", "held_out")}


def test_instruction_conversations_are_deterministic(world, instructions):
    assert instruction_conversations(World(), "train") == instructions["train"]
    assert instruction_conversations(world, "train", seed=1) != instructions["train"]
    assert instruction_conversations(world, "train", num_conversations=10) == instructions["train"][:10]
    assert len(instruction_conversations(world, "held_out", num_conversations=1000)) == 1000


def test_train_and_held_out_ask_disjoint_questions(world, instructions):
    train, held = set(user_turns(instructions["train"])), set(user_turns(instructions["held_out"]))
    assert train and held and not train & held
    kept, held_out = world.split_facts()
    for split, facts in (("train", kept), ("held_out", held_out)):
        questions = {f.question(lang) for f in facts for lang in ("en", "zh")}
        singles = {r["messages"][-2]["content"] for r in instructions[split] if len(r["messages"]) <= 3}
        assert questions <= singles  # every fact of the split is asked in both languages


def test_instruction_answers_are_correct(world, instructions):
    by_question = {f.question(lang): (f, lang) for f in world.facts for lang in ("en", "zh")}
    kinds = {"single": 0, "multi": 0, "arithmetic": 0, "system": 0, "zh": 0}
    for records in instructions.values():
        for record in records:
            messages = record["messages"]
            if messages[0]["role"] == "system":
                kinds["system"] += 1
                messages = messages[1:]
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
            kinds["zh"] += bool(CJK.search(messages[0]["content"]))
            subjects = set()
            for question, answer in zip(messages[::2], messages[1::2]):
                question, answer = question["content"], answer["content"]
                question = re.sub(r"^(And (.)|那)", lambda m: (m.group(2) or "").upper(), question)
                if question in by_question:
                    fact, lang = by_question[question]
                    assert answer == fact.sentence(lang) and fact.answer(lang) in answer
                    subjects.add(fact.subject)
                else:
                    assert len(messages) == 2
                    assert int(answer) == evaluate_word_problem(question) >= 0
                    kinds["arithmetic"] += 1
            if len(messages) == 4:
                assert len(subjects) == 1  # the follow-up is about the same person
                kinds["multi"] += 1
            elif subjects:
                kinds["single"] += 1
    total = sum(len(r) for r in instructions.values())
    assert kinds["single"] == total // 2 and 0.2 < kinds["multi"] / total <= 0.25
    assert 0.2 < kinds["system"] / total < 0.4 and 0.3 < kinds["zh"] / total < 0.7
    assert abs(kinds["arithmetic"] + kinds["multi"] - total / 2) <= 1


def test_word_problems_never_repeat_across_splits(world):
    def problems(split):
        records = instruction_conversations(world, split, num_conversations=800, languages=["en"])
        return {tuple(map(int, re.findall(r"\d+", q))) + (evaluate_word_problem(q),)
                for q in user_turns(records) if re.search(r"\d", q)}

    train, held = problems("train"), problems("held_out")
    assert len(train) > 100 and len(held) > 100 and not train & held


def test_exact_match_items_follow_the_conversations(world, instructions):
    items = exact_match_items(world, "held_out")
    assert len(items) == len(instructions["held_out"])
    for (prompt, expected), record in zip(items, instructions["held_out"]):
        assert prompt == record["messages"][:-1] and prompt[-1]["role"] == "user"
        assert answer_matches(record["messages"][-1]["content"], expected)
    assert {"en", "zh"} <= {"zh" if CJK.search(p[-1]["content"]) else "en" for p, _ in items}
    assert exact_match_items(world, "train", num_items=5) == exact_match_items(world, "train")[:5]
    numbers = [e for _, e in items if e.isdigit()]
    assert numbers and all(e in [str(n) for n in range(200)] for e in numbers)


@pytest.mark.parametrize("reply, expected, ok", [
    ("19", "19", True), ("The answer is 19.", "19", True), ("19\n20", "19", True), ("\n 19 apples", "19", True),
    ("119", "19", False), ("190", "19", False), ("19.5", "19", False), ("1,19", "19", False), ("20\n19", "19", False),
    ("Tom Snow lives in Greenfield.", "Greenfield", True), ("He likes oranges.", "orange", False),
    ("汤姆·斯诺住在绿野镇。", "绿野镇", True), ("汤姆·斯诺住在北港。", "绿野镇", False), ("", "19", False),
])
def test_answer_matches(reply, expected, ok):
    assert answer_matches(reply, expected) is ok


@pytest.mark.parametrize("reply, ok", [
    ("Tom Snow has a pet parrot.", True),
    ("Tom Snow has a pet parrot. Hugo Wood has a pet cat.", True),  # a later sentence is another claim
    ("parrot cat horse", False), ("cat parrot", False), ("Tom Snow has a pet parrot or a cat.", False),
    ("A parrot, maybe a 鹦鹉 or a 狗.", False),  # rivals in either language
    ("Tom Snow has a pet cat.", False),
])
def test_answer_matches_rejects_a_claim_that_lists_rivals(world, reply, ok):
    question = "What pet does Tom Snow have?"
    rivals = rival_answers(world, question, "parrot")
    assert {"cat", "dog", "猫", "狗"} <= set(rivals) and "parrot" not in rivals and "鹦鹉" in rivals
    assert answer_matches(reply, "parrot", rivals, question) is ok
    assert world_answer_matches(world, [{"role": "user", "content": question}], reply, "parrot") is ok
    assert answer_matches(reply, "parrot") is ("parrot" in reply)  # without rivals: the first line's check


def test_rival_answers_leave_out_what_the_question_names(world):
    people = world.by_kind("person")
    subject, friend = people[0], world.fact(people[0], "friend_of").value_entity
    question = f"Who is {subject.name_en}'s best friend?"
    rivals = rival_answers(world, question, friend.name_en)
    assert subject.name_en not in rivals and friend.name_en not in rivals
    assert len(rivals) == 2 * len(people) - 2  # every other person, in English and Chinese
    reply = f"{subject.name_en}'s best friend is {friend.name_en}."
    assert answer_matches(reply, friend.name_en, rivals, question)
    assert not answer_matches(f"{people[2].name_en} or {friend.name_en}.", friend.name_en, rivals, question)


@pytest.mark.parametrize("reply, ok", [
    ("24", True), ("34 - 10 = 24", True), ("Tom has 24 stamps left.", True), ("24. Then 25 next year.", True),
    ("24 25 26", False), ("23 or 24", False), ("1248", False),
])
def test_answer_matches_a_numeric_answer_allows_only_the_question_numbers(reply, ok):
    question = "Tom has 34 stamps and gives 10 to Leo. How many stamps does he have left?"
    assert answer_matches(reply, "24", (), question) is ok


def test_instruction_options_and_errors(world):
    en = instruction_conversations(world, "held_out", languages=["en"])
    assert en and not any(CJK.search(q) for q in user_turns(en))
    with pytest.raises(ValueError, match="test"):
        instruction_conversations(world, "test")
    with pytest.raises(ValueError, match="fr"):
        instruction_conversations(world, languages=["fr"])


def test_write_instruction_corpus_is_readable_jsonl(tmp_path, world):
    from orchard.data.conversations import read_conversations

    path = write_instruction_corpus(tmp_path / "sft" / "train.jsonl", world, "train", num_conversations=30)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == instruction_conversations(world, "train", num_conversations=30)
    assert CJK.search(path.read_text(encoding="utf-8"))
    assert [c.messages for c in read_conversations(path)] == [r["messages"] for r in records]
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]


# --- continual-learning tasks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def continual(world):
    return {(name, split): continual_task(world, name, split)
            for name in CONTINUAL_TASKS for split in ("train", "held_out")}


def test_continual_tasks_are_deterministic(world, continual):
    for (name, split), items in continual.items():
        assert continual_task(World(), name, split) == items
        assert continual_task(world, name, split, num_items=7) == items[:7]
        assert continual_task(world, name, split, seed=1) != items
    assert continual_task_conversations(world, "facts-zh", "held_out") == [
        {"messages": messages} for messages, _ in continual[("facts-zh", "held_out")]]


def test_continual_default_sizes(world, continual):
    kept, held = world.split_facts()
    assert len(continual[("arithmetic", "train")]) == 400
    assert len(continual[("arithmetic", "held_out")]) == 100
    for lang in ("en", "zh"):
        for split, facts in (("train", kept), ("held_out", held)):
            # one deck: every fact of the split asked exactly once
            asked = [messages[0]["content"] for messages, _ in continual[(f"facts-{lang}", split)]]
            assert sorted(asked) == sorted(f.question(lang) for f in facts)
    assert len(continual_task(world, "facts-en", "held_out", num_items=200)) == 200


def test_continual_splits_do_not_overlap(world, continual):
    for name in CONTINUAL_TASKS:
        train = {messages[0]["content"] for messages, _ in continual[(name, "train")]}
        held = {messages[0]["content"] for messages, _ in continual[(name, "held_out")]}
        assert train and held and not train & held
    # no held-out fact question is about a fact any training answer states
    stated = {messages[-1]["content"] for (name, split), items in continual.items() if split == "train"
              for messages, _ in items}
    held_answers = {messages[-1]["content"] for (name, split), items in continual.items()
                    if split == "held_out" and name != "arithmetic" for messages, _ in items}
    assert not stated & held_answers


def test_continual_languages_and_answers(continual):
    for (name, split), items in continual.items():
        for messages, expected in items:
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert answer_matches(messages[-1]["content"], expected)
            text = messages[0]["content"] + messages[1]["content"]
            if name == "facts-en":
                assert text.isascii()
            elif name == "facts-zh":
                assert CJK.search(messages[0]["content"]) and CJK.search(messages[1]["content"])
            else:
                assert messages[-1]["content"] == expected and expected.isdigit()
    problems = [m[0]["content"] for m, _ in continual[("arithmetic", "train")]]
    assert any(p.isascii() for p in problems) and any(CJK.search(p) for p in problems)


def test_continual_task_errors(world):
    with pytest.raises(ValueError, match="facts-fr"):
        continual_task(world, "facts-fr")
    with pytest.raises(ValueError, match="split"):
        continual_task(world, "arithmetic", "test")
    with pytest.raises(ValueError, match="num_items"):
        continual_task(world, "facts-en", num_items=-1)
    with pytest.raises(ValueError, match="no facts"):
        continual_task(world, "facts-en", "held_out", held_out_fraction=0.0)
