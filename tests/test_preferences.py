"""Preference pairs and prompts: every record form, bad records, HH-RLHF and GSM8K as published,
tokenizing a pair with one shared prompt and exactly the reply supervised, and the built-in pairs."""

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from orchard.data.records import ReadStats
from orchard.data.preferences import (
    PreferencePair,
    gsm8k_answer,
    read_preference_pairs,
    read_prompts,
    tokenize_preference_pair,
)
from orchard.data.synthetic import (
    World,
    answer_matches,
    exact_match_items,
    generate_documents,
    preference_pairs,
    prompt_text,
    rival_answers,
    verifiable_prompts,
    write_preference_corpus,
)
from orchard.errors import OrchardError
from orchard.losses.tokens import IGNORE_INDEX
from orchard.tokenizer.bpe import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILES = [DATA / "preference" / "helpful-base_test.jsonl.gz", DATA / "preference" / "harmless-base_test.jsonl.gz"]
GSM8K_TEST = DATA / "math" / "gsm8k_test.jsonl"
IM_END = "<|im_end|>"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --- reading pairs ----------------------------------------------------------------------------------


def test_reads_every_pair_form(tmp_path):
    dialogue = [user("Where does Tom live?"), assistant("In Greenfield."), user("And Anna?")]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "1 + 1 =", "chosen": "2", "rejected": "3", "system": "Be brief."},
        {"prompt": [SYSTEM, user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
        # Implicit prompt: the longest shared prefix ending with a user turn.
        {"chosen": dialogue + [assistant("In Redwater.")], "rejected": dialogue + [assistant("No idea.")]},
        # They differ at an assistant turn inside the dialogue: the prompt stops at the user turn before it.
        {"chosen": [user("hi"), assistant("hello"), user("bye"), assistant("goodbye")],
         "rejected": [user("hi"), assistant("go away")]},
        {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the"
                   " chicken cross the road?",
         "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."},
    ])
    got = list(read_preference_pairs(path))
    assert [p.source for p in got] == [f"{path}:{i}" for i in range(1, 6)]
    assert got[0] == PreferencePair([SYSTEM, user("1 + 1 =")], [assistant("2")], [assistant("3")], f"{path}:1")
    assert (got[1].prompt, got[1].chosen, got[1].rejected) == ([SYSTEM, user("q")], [assistant("good")],
                                                               [assistant("bad")])
    assert (got[2].prompt, got[2].chosen, got[2].rejected) == (dialogue, [assistant("In Redwater.")],
                                                               [assistant("No idea.")])
    assert got[3].prompt == [user("hi")]
    assert got[3].chosen == [assistant("hello"), user("bye"), assistant("goodbye")]
    assert got[3].rejected == [assistant("go away")]
    assert got[4].prompt == [user("Hi there"), assistant("Hello!"), user("Tell me a joke.")]
    assert got[4].chosen == [assistant("Why did the chicken cross the road?")]
    assert got[4].rejected == [assistant("No.")]


def test_gzipped_jsonl_and_json_list(tmp_path):
    zipped = tmp_path / "pairs.jsonl.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}))
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}]), encoding="utf-8")
    got = list(read_preference_pairs([zipped, listed]))
    assert [p.source for p in got] == [f"{zipped}:2", f"{listed}: item 1"]
    assert all((p.prompt, p.chosen, p.rejected) == ([user("q")], [assistant("a")], [assistant("b")]) for p in got)


BAD_PAIRS = [
    ({"prompt": "q", "chosen": "a"}, "missing field", "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "non-string content", "'rejected' is a number"),
    ({"prompt": [user("q")], "chosen": [assistant(["a"])], "rejected": "b"}, "non-string content",
     "chosen[0]: field 'content' is a list"),
    ({"prompt": [user("q")], "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "unknown role", "'bot'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical responses", "are the same"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"},
     "identical responses", "are the same"),
    ({"prompt": [SYSTEM], "chosen": "a", "rejected": "b"}, "no user turn", "does not end with a user turn"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "b", "rejected": "c"}, "no user turn",
     "does not end with a user turn"),
    ({"chosen": [user("q1"), assistant("a")], "rejected": [user("q2"), assistant("a")]}, "no user turn",
     "share no prompt"),
    ({"prompt": "q", "chosen": " \n", "rejected": "b"}, "empty assistant turn", "'chosen': assistant turn"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: "}, "empty assistant turn",
     "'rejected': assistant turn"),
    ({"prompt": "q", "chosen": [assistant("a"), user("more?")], "rejected": "b"}, "no final assistant turn",
     "'chosen' does not end with an assistant turn"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q")]}, "no final assistant turn",
     "'rejected' does not end"),
    ({"chosen": "a", "rejected": "b"}, "missing field", "missing field 'prompt'"),
    ({"text": "plain"}, "unrecognised record", "expected 'chosen' and 'rejected'"),
    ([1, 2], "not an object", "expected a JSON object"),
]


def test_each_bad_pair_is_an_error_naming_file_and_line(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    for record, _, problem in BAD_PAIRS:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(OrchardError) as error:
            list(read_preference_pairs(path))
        message = str(error.value)
        assert message.startswith(f"{path}:2: ") and problem in message and "\n" not in message, message


def test_skip_mode_counts_bad_pairs_by_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})]
    lines += [json.dumps(r) for r, _, _ in BAD_PAIRS] + ["{not json"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = ReadStats()
    got = list(read_preference_pairs(path, on_error="skip", stats=stats))
    assert len(got) == 1 and stats.kept == 1 and stats.read == len(BAD_PAIRS) + 2
    assert stats.reasons == Counter(reason for _, reason, _ in BAD_PAIRS) + Counter({"invalid JSON": 1})
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt") as f:
        f.write("\n")
    with pytest.raises(OrchardError, match="file is empty"):
        list(read_preference_pairs(empty, on_error="skip"))


# --- reading prompts ----------------------------------------------------------------------------------


def test_reads_every_prompt_form(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "How old is Tom?", "answer": 34, "system": "Be brief."},
        {"prompt": [user("q")]},
        {"prompt": "half of 5?", "answer": 2.5},
        {"messages": [user("hi"), assistant("hello"), user("2 + 2 ="), assistant(" 4 ")]},
        {"messages": [user("q")], "answer": "Greenfield"},
        {"question": "Natalia sold 48 clips...", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 72"},
        {"question": "Any?", "answer": 7.0},
    ])
    got = list(read_prompts(path))
    assert [(p.prompt, p.answer) for p in got] == [
        ([SYSTEM, user("How old is Tom?")], "34"),
        ([user("q")], None),
        ([user("half of 5?")], "2.5"),
        ([user("hi"), assistant("hello"), user("2 + 2 =")], "4"),
        ([user("q")], "Greenfield"),
        ([user("Natalia sold 48 clips...")], "72"),
        ([user("Any?")], "7"),
    ]
    assert got[5].source == f"{path}:6"


BAD_PROMPTS = [
    ({"question": "q"}, "missing field", "missing field 'answer'"),
    ({"question": "q", "answer": "no number\n#### ?"}, "no final answer", "no number after"),
    ({"prompt": "q", "answer": [1]}, "non-string content", "'answer' is a list"),
    ({"prompt": [SYSTEM]}, "no user turn", "does not end with a user turn"),
    ({"messages": [user("q"), assistant("a"), assistant("b")]}, "no user turn", "does not end with a user turn"),
    ({"chosen": "a"}, "unrecognised record", "unrecognised record"),
    ({"prompt": "q", "answer": "a", "rivals": "b"}, "bad rivals", "'rivals' must be a list"),
    ({"prompt": "q", "answer": "a", "rivals": ["b", 3]}, "bad rivals", "'rivals' must be a list"),
]


def test_bad_prompts_error_or_are_counted(tmp_path):
    good = {"prompt": "q"}
    for record, _, problem in BAD_PROMPTS:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(OrchardError) as error:
            list(read_prompts(path))
        assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value), str(error.value)
    path = write_jsonl(tmp_path / "bad.jsonl", [good] + [r for r, _, _ in BAD_PROMPTS])
    stats = ReadStats()
    assert len(list(read_prompts(path, on_error="skip", stats=stats))) == 1
    assert stats.reasons == Counter(reason for _, reason, _ in BAD_PROMPTS)


def test_gsm8k_answer():
    assert gsm8k_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_answer("... so 1,234 in all.\n#### 1,234") == "1234"
    assert gsm8k_answer("She is down $5.\n#### -5") == "-5"
    assert gsm8k_answer("#### 2.5\n") == "2.5"
    assert gsm8k_answer("first #### 3, then\n#### 4") == "4"  # the last one is the final answer
    assert gsm8k_answer("no final line, 72") is None
    assert gsm8k_answer("####") is None and gsm8k_answer("#### none") is None


# --- the published data sets ------------------------------------------------------------------------


@pytest.mark.skipif(not all(p.is_file() for p in HH_FILES),
                    reason=f"HH-RLHF not found under {DATA / 'preference'} (shared data is read, never copied)")
def test_reads_hh_rlhf_test_splits():
    for path in HH_FILES:
        stats = ReadStats()
        pairs = list(read_preference_pairs(path, on_error="skip", stats=stats))
        print(f"{path.name}: {stats.read} records, {stats.kept} pairs, skipped: {stats.describe()}")
        assert stats.read > 2000 and stats.kept == len(pairs) >= 0.99 * stats.read
        assert set(stats.reasons) <= {"empty assistant turn", "identical responses"}
        for pair in pairs:
            assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
            assert pair.chosen[-1]["role"] == pair.rejected[-1]["role"] == "assistant"
            assert pair.chosen != pair.rejected
            # Split at every turn marker (a few replies do start with a stray "Human:", as published).
            assert not any(re.search(r"\n\n(Human|Assistant):", m["content"]) for m in pair.prompt + pair.chosen)
        # Nearly every pair differs only in the final reply.
        assert sum(len(p.chosen) == len(p.rejected) == 1 for p in pairs) >= 0.99 * len(pairs)


@pytest.mark.skipif(not GSM8K_TEST.is_file(),
                    reason=f"GSM8K not found under {DATA / 'math'} (shared data is read, never copied)")
def test_reads_gsm8k_test_with_integer_answers():
    stats = ReadStats()
    items = list(read_prompts(GSM8K_TEST, stats=stats))
    print(f"{GSM8K_TEST.name}: {stats.read} records, {stats.kept} prompts, "
          f"{sum(i.answer.startswith('-') for i in items)} negative answers")
    assert len(items) == stats.read == 1319
    assert all(re.fullmatch(r"-?\d+", item.answer) for item in items)
    assert all(len(item.prompt) == 1 and item.prompt[0]["role"] == "user" for item in items)
    assert items[0].answer == "18"


# --- tokenizing a pair ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(iter(list(generate_documents(150, seed=0))), vocab_size=400)


def supervised(example) -> list[int]:
    """Indices of the supervised tokens, checking the labels are the tokens themselves there."""
    found = [t for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert all(example.labels[t] == example.input_ids[t] for t in found)
    return found


def check_pair(tokens, prompt, replies, tokenizer):
    """Both start with exactly the prompt's tokens, and the supervised tokens are one run: the reply
    and its turn end."""
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    for example, reply in zip(tokens, replies):
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        found = supervised(example)
        assert found == list(range(found[0], found[-1] + 1)) and found[0] == len(prompt_ids)
        text = tokenizer.decode([example.input_ids[t] for t in found], skip_special_tokens=False)
        assert text == reply + IM_END


def test_pair_tokens_share_the_prompt_and_supervise_only_the_reply(tokenizer):
    prompt = [SYSTEM, user("Where does Tom Snow live?"), assistant("Tom Snow lives in Greenfield."),
              user("And how old is he?")]
    chosen, rejected = "Tom Snow is 34 years old.", "I don't know."
    pair = PreferencePair(prompt, [assistant(chosen)], [assistant(rejected)], "pairs.jsonl:3")
    tokens = tokenize_preference_pair(pair, tokenizer, max_length=1000)
    check_pair(tokens, prompt, [chosen, rejected], tokenizer)

    # The longer (chosen) conversation does not fit: the oldest exchange goes from BOTH prompts.
    n = len(tokens[0])
    assert len(tokens[1]) < n - 1
    truncated = tokenize_preference_pair(pair, tokenizer, max_length=n - 1)
    check_pair(truncated, [SYSTEM, user("And how old is he?")], [chosen, rejected], tokenizer)
    assert tokenize_preference_pair(pair, tokenizer, n - 1, truncation="skip") is None
    assert tokenize_preference_pair(pair, tokenizer, n, truncation="skip") == tokens
    with pytest.raises(OrchardError, match=rf"pairs.jsonl:3: conversation is {n} tokens"):
        tokenize_preference_pair(pair, tokenizer, n - 1, truncation="error")
    # Nothing left to drop and still too long: skipped, the reply is never cut.
    assert tokenize_preference_pair(pair, tokenizer, len(truncated[0]) - 1) is None
    with pytest.raises(OrchardError, match="data.truncation"):
        tokenize_preference_pair(pair, tokenizer, 1000, truncation="cut")


# --- built-in pairs -----------------------------------------------------------------------------------


def test_builtin_preference_pairs():
    world = World()
    pairs = preference_pairs(world)
    assert pairs == preference_pairs(world) and pairs != preference_pairs(world, seed=1)
    items = exact_match_items(world, split="train")
    assert len(pairs) == len(items)
    for pair, (prompt, expected) in zip(pairs, items):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["prompt"] == prompt and chosen != rejected
        assert answer_matches(chosen, expected) and not answer_matches(rejected, expected)
        if pair["kind"] == "wrong" and expected.isdigit() and chosen == expected:  # a word problem
            assert rejected.isdigit() and 0 < abs(int(rejected) - int(chosen)) <= 3
        elif pair["kind"] == "wrong":  # the same sentence about the same subject, another value
            subject = re.split(r" (?:lives|works|is|has|'s)|住在|是一名|最|今年|养了", chosen)[0]
            assert rejected.startswith(subject) and rejected[-1] == chosen[-1] and not rejected.isdigit()
    kinds = Counter(p["kind"] for p in pairs)
    assert set(kinds) == {"wrong", "unhelpful"} and 0.4 < kinds["wrong"] / len(pairs) < 0.6
    unhelpful = {p["rejected"][0]["content"] for p in pairs if p["kind"] == "unhelpful"}
    assert "I don't know." in unhelpful and "我不知道。" in unhelpful

    held_out = preference_pairs(world, split="held_out")
    assert [p["prompt"] for p in held_out] == [prompt for prompt, _ in exact_match_items(world)]
    last_question = {p["prompt"][-1]["content"] for p in pairs}
    assert not last_question & {p["prompt"][-1]["content"] for p in held_out}
    assert preference_pairs(world, num_pairs=10) == pairs[:10]


def test_preference_corpus_and_verifiable_prompts_read_back(tmp_path):
    world = World()
    path = write_preference_corpus(tmp_path / "prefs" / "train.jsonl", world, num_pairs=40)
    records = preference_pairs(world, num_pairs=40)
    got = list(read_preference_pairs(path))
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(r["prompt"], r["chosen"], r["rejected"])
                                                               for r in records]
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp file left

    prompts = write_jsonl(tmp_path / "prompts.jsonl", verifiable_prompts(world, split="held_out", num_items=40))
    items = exact_match_items(world, num_items=40)
    read = list(read_prompts(prompts))
    assert [(p.prompt, p.answer) for p in read] == items
    # Each comes with its rivals, the question's other possible answers (none for a number).
    assert all(p.rivals == rival_answers(world, prompt_text(p.prompt), p.answer) for p in read)
    assert any(p.rivals for p in read) and all(p.rivals == () for p in read if p.answer.isdigit())
