"""Rewards for online RL: the built-in functions on hand-made replies, weights, user functions named
module:function, failures (exceptions, None, NaN, infinity, wrong counts) counted per sample, spec
errors as one line, and judges (grade parsing, training conversations, a tiny judge model)."""

from __future__ import annotations

import sys

import pytest
import torch

from orchard.checkpoint import load_checkpoint
from orchard.data.conversations import Conversation, tokenize_conversation
from orchard.data.synthetic import World, preference_pairs
from orchard.errors import OrchardError
from orchard.rewards import BUILTIN_REWARDS, Rewards
from orchard.rewards import models as reward_models
from orchard.rewards.functions import (answer_format, exact_match, final_number, length_penalty, numeric_match,
                                       single_line)
from orchard.rewards.models import JUDGE_PROMPT, JudgeScorer, judge_conversations, parse_grade

Q = [{"role": "user", "content": "Where does Tom Snow live?"}]


def call(function, completions, answers=None):
    answers = answers if answers is not None else [None] * len(completions)
    return function(prompts=[Q] * len(completions), completions=completions, answers=answers)


# --- built-in functions ------------------------------------------------------------------------------


def test_exact_match_is_a_whole_word_on_the_first_line():
    replies = ["Tom Snow lives in Greenfield.", "Tom Snow lives in Greenfields.", "19", "119", "19.5",
               "The answer is below.\n19", "  \n 19 apples", "汤姆住在绿野镇。"]
    answers = ["Greenfield", "Greenfield", "19", "19", "19", "19", "19", "绿野镇"]
    assert call(exact_match, replies, answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # No reference answer: the reward cannot be computed (a failure, not a zero).
    assert call(exact_match, ["Greenfield"], [None]) == [None]
    assert call(exact_match, ["It is 7"], [7]) == [1.0]  # a numeric answer is compared as text


def test_exact_match_with_rivals_rewards_no_list_of_candidates():
    replies = ["Tom Snow has a pet parrot.", "parrot cat dog", "parrot", "Tom Snow has a pet cat."]
    prompts = [[{"role": "user", "content": "What pet does Tom Snow have?"}]] * 4
    rivals = [("cat", "dog")] * 4
    assert exact_match(prompts, replies, ["parrot"] * 4, rivals) == [1.0, 0.0, 1.0, 0.0]
    assert exact_match(prompts, replies, ["parrot"] * 4, [None] * 4) == [1.0, 1.0, 1.0, 0.0]  # no rivals listed
    # A numeric answer with rivals (even none listed): no number but it and the question's.
    prompts = [[{"role": "user", "content": "Tom has 7 boxes of 7 pears. How many pears?"}]] * 3
    assert exact_match(prompts, ["7 x 7 = 49", "48 49 50", "49"], ["49"] * 3, [()] * 3) == [1.0, 0.0, 1.0]


def test_numeric_match_reads_the_final_number():
    replies = ["He has 12 + 7 = 19 apples.", "19 apples, not 20", "Work: 1000 + 234\n#### 1,234",
               "#### 42 (in 3 steps)", "It is 5.0", "no number here", "-3 degrees", "x = 119"]
    answers = ["19", "19", "1234", "42", "5", "5", "-3", "19"]
    assert call(numeric_match, replies, answers) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert call(numeric_match, ["#### 1234"], ["1,234"]) == [1.0]  # the answer's commas go too
    assert call(numeric_match, ["19"], [None]) == [None]
    assert final_number("a 3, then #### 1,234,567 and 8") == "1234567"
    assert final_number("10.0 then 2.5") == "2.5" and final_number("10.0") == "10" and final_number("none") is None


def test_format_line_and_length_rewards():
    assert call(answer_format, ["So 3 + 4 = 7.\n#### 7", "#### 1,234\n", "####42", "#### 7 apples", "7",
                                "#### seven"]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert call(single_line, ["Greenfield.", "  Greenfield. \n\n", "a\nb", "a\n\n  b", "", "   \n"]) == \
           [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert call(length_penalty, ["", "one two three", " ".join(["w"] * 100), "a\nb  c"]) == \
           [0.0, -0.03, -1.0, -0.03]
    assert set(BUILTIN_REWARDS) == {"exact_match", "numeric_match", "answer_format", "single_line", "length_penalty",
                                    "tool_use"}
    # tool_use reads the episodes' calls, which only an environment gives: without one it fails.
    assert BUILTIN_REWARDS["tool_use"](None, ["a", "b", "c"], None, tool_calls=[0, 1, 3]) == [0.0, 1.0, 1.0]
    result = Rewards(["exact_match", "tool_use"])([[]] * 2, ["7", "8"], ["7", "7"], tool_calls=[2, 0])
    assert result.total.tolist() == [2.0, 0.0] and Rewards(["tool_use"])([[]], ["7"], ["7"]).failures == {"tool_use": 1}


# --- combining rewards -------------------------------------------------------------------------------


def test_weighted_sum_of_rewards():
    rewards = Rewards(["0.5*exact_match", "length_penalty", " 2 * single_line"])
    assert rewards.names == ["exact_match", "length_penalty", "single_line"]
    replies = ["Greenfield", "It is Greenfield, I think\nor not", "Paris is nice"]
    result = rewards([Q] * 3, replies, ["Greenfield"] * 3)
    expected = [0.5 * 1 - 0.01 + 2 * 1, 0.5 * 1 - 0.07 + 2 * 0, 0.5 * 0 - 0.03 + 2 * 1]
    assert result.total.tolist() == pytest.approx(expected, abs=1e-6)
    assert result.valid.tolist() == [True, True, True]
    assert result.by_reward["exact_match"] == [1.0, 1.0, 0.0]
    assert result.failures == {"exact_match": 0, "length_penalty": 0, "single_line": 0}


def test_a_user_function_named_module_colon_function(user_module):
    name = user_module("def shouts(prompts, completions, answers, **kwargs):\n"
                       "    return [float(c.isupper()) + len(answers) * 0 for c in completions]\n")
    result = Rewards([f"3*{name}:shouts", "exact_match"])(
        [Q] * 3, ["GREENFIELD", "greenfield", "Greenfield"], ["GREENFIELD", "Greenfield", "Greenfield"])
    assert result.total.tolist() == [4.0, 0.0, 1.0]
    assert result.by_reward[f"{name}:shouts"] == [1.0, 0.0, 0.0]


def test_one_failing_sample_fails_alone(user_module, capsys):
    name = user_module("calls = []\n"
                       "def fragile(prompts, completions, answers, **kwargs):\n"
                       "    calls.append(len(completions))\n"
                       "    return [1.0 / (len(c) - 4) for c in completions]\n")  # 'boom' divides by zero
    rewards = Rewards(["exact_match", f"{name}:fragile"])
    result = rewards([Q] * 3, ["Greenfield", "boom", "Greenfield!"], ["Greenfield"] * 3)
    assert result.valid.tolist() == [True, False, True]
    assert result.total.tolist() == pytest.approx([1 + 1 / 6, 0.0, 1 + 1 / 7])  # exact_match's 1 is dropped too
    assert result.by_reward[f"{name}:fragile"][1] is None and result.by_reward["exact_match"][1] == 0.0
    assert result.failures == {"exact_match": 0, f"{name}:fragile": 1}
    assert sys.modules[name].calls == [3, 1, 1, 1]  # the batch, then each sample alone
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"reward {name}:fragile failed (ZeroDivisionError" in err
    rewards([Q], ["boom"], ["x"])
    assert capsys.readouterr().err == ""  # warned once per reward


def test_none_nan_and_infinity_are_failures(user_module):
    name = user_module("def odd(prompts, completions, answers, **kwargs):\n"
                       "    table = {'a': 0.25, 'b': None, 'c': float('nan'), 'd': float('inf'), 'e': -float('inf'),\n"
                       "             'f': 'oops', 'g': True}\n"
                       "    return [table[c] for c in completions]\n")
    result = Rewards([f"2*{name}:odd"])([Q] * 7, list("abcdefg"), [None] * 7)
    assert result.valid.tolist() == [True, False, False, False, False, False, True]
    assert result.total.tolist() == [0.5, 0, 0, 0, 0, 0, 2.0]
    assert result.failures == {f"{name}:odd": 5}
    assert not torch.isnan(result.total).any()


def test_a_function_returning_the_wrong_number_of_values_fails_every_sample(user_module, capsys):
    name = user_module("def extra(prompts, completions, answers, **kwargs):\n"
                       "    return [1.0] * (len(completions) + 1)\n"
                       "def scalar(prompts, completions, answers, **kwargs):\n"
                       "    return 1.0\n")
    for function in ("extra", "scalar"):
        result = Rewards([f"{name}:{function}", "length_penalty"])([Q] * 3, ["a", "b c", "d"], [None] * 3)
        assert result.valid.tolist() == [False] * 3 and result.total.tolist() == [0.0] * 3
        assert result.failures == {f"{name}:{function}": 3, "length_penalty": 0}
    assert "returned 4 values for 3 completions" in capsys.readouterr().err


@pytest.mark.parametrize("spec, named", [
    (["nonexistent"], "'nonexistent'"),
    (["x*exact_match"], "'x*exact_match'"),
    (["*exact_match"], "'*exact_match'"),
    (["inf*exact_match"], "'inf*exact_match'"),
    (["exact_match", "1*exact_match"], "exact_match"),
    (["no_such_module_here:fn"], "'no_such_module_here'"),
    (["orchard.rewards.functions:missing"], "'missing'"),
    ([], "at least one"),
])
def test_bad_reward_specs_are_one_line_errors(spec, named):
    with pytest.raises(OrchardError) as error:
        Rewards(spec)
    message = str(error.value)
    assert message.startswith("rewards:") and named in message and "\n" not in message


def test_a_model_without_a_score_head_is_refused(chat_base):
    with pytest.raises(OrchardError, match="has no score head"):
        Rewards([f"model:{chat_base.dir}"])


# --- judges ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, grade", [("7", 0.7), ("Score: 10", 1.0), ("10/10", 1.0), ("0", 0.0),
                                         ("8 out of 10", 0.8), ("great", None), ("", None), ("100", None),
                                         ("grade 11", None)])
def test_parse_grade(text, grade):
    assert parse_grade(text) == grade


def test_judge_conversations_grade_chosen_and_rejected():
    pairs = preference_pairs(World(), "train", num_pairs=3)
    pairs.append({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}],
                  "chosen": [{"role": "assistant", "content": "4"}],
                  "rejected": [{"role": "assistant", "content": "5"}]})
    conversations = judge_conversations(pairs, good=9, bad=1)
    assert len(conversations) == 2 * len(pairs)
    for i, pair in enumerate(pairs):
        for conversation, reply, grade in ((conversations[2 * i], pair["chosen"], "9"),
                                           (conversations[2 * i + 1], pair["rejected"], "1")):
            user, assistant = conversation["messages"]
            assert user["role"] == "user" and assistant == {"role": "assistant", "content": grade}
            assert user["content"].endswith(f"Answer: {reply[-1]['content']}")
    # One user turn is the question itself; a dialogue is written out, its system prompt left out.
    assert f"Question: {pairs[0]['prompt'][-1]['content']}\nAnswer:" in conversations[0]["messages"][0]["content"]
    assert "Question: user: Hi\nassistant: Hello\nuser: 2+2?\nAnswer: 4" in conversations[-2]["messages"][0]["content"]
    assert "Be brief" not in conversations[-2]["messages"][0]["content"]


def test_judge_scorer_asks_the_judge_prompt_and_parses_its_grade(chat_base, monkeypatch):
    scorer = JudgeScorer(str(chat_base.dir))
    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    prompts = [Q, [{"role": "user", "content": "What is 12 + 7?"}]]
    # The tiny (untrained) judge replies with whatever it replies; each value is a grade or a failure.
    judgements = scorer.judgements(prompts, ["Greenfield", "19"])
    values = scorer(prompts, ["Greenfield", "19"])
    assert len(judgements) == 2 and values == [parse_grade(text) for text in judgements]
    assert all(v is None or (isinstance(v, float) and 0 <= v <= 1) for v in values)
    result = Rewards([f"judge:{chat_base.dir}"])(prompts, ["Greenfield", "19"], [None, None])
    assert result.failures[f"judge:{chat_base.dir}"] == values.count(None)
    assert result.valid.tolist() == [v is not None for v in values]

    # What the judge is asked, and an unparseable judgement counted as a failure.
    asked = []

    def judge(model, tok, texts, sampling, add_bos, end_token_ids):
        asked.extend(texts)
        assert sampling.temperature == 0 and add_bos is False and end_token_ids == [tok.token_to_id("<|im_end|>")]
        return ["Score: 7", "I cannot say"][:len(texts)]

    monkeypatch.setattr(reward_models, "generate_text", judge)
    rewards = Rewards([f"judge:{chat_base.dir}", "0.5*exact_match"])
    result = rewards(prompts, ["  Greenfield \n", "19"], ["Greenfield", "19"])
    assert asked[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": JUDGE_PROMPT.format(question="Where does Tom Snow live?", answer="Greenfield")}],
        add_generation_prompt=True)
    assert result.by_reward[f"judge:{chat_base.dir}"] == [0.7, None]
    assert result.valid.tolist() == [True, False] and result.total.tolist() == pytest.approx([1.2, 0.0])
    assert result.failures == {f"judge:{chat_base.dir}": 1, "exact_match": 0}


def test_reward_model_scores_equal_each_sample_scored_alone(chat_base, tmp_path):
    """`model:PATH` scores a (prompt, reply) at the last token of its chat rendering, whatever the batch."""
    from orchard.checkpoint import save_checkpoint

    checkpoint = load_checkpoint(chat_base.dir)
    checkpoint.model.add_score_head(1, seed=5)
    save_checkpoint(tmp_path / "rm", checkpoint.model, checkpoint.tokenizer, record={"stage": "test"})
    prompts = [Q, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}], Q, Q]
    replies = ["Tom Snow lives in Greenfield.", "19", "I don't know, sorry, I really have no idea at all.", ""]
    result = Rewards([f"2*model:{tmp_path / 'rm'}"])(prompts, replies, [None] * 4)
    assert result.valid.all()
    model = checkpoint.model.eval()
    for prompt, reply, total in zip(prompts, replies, result.total.tolist()):
        example = tokenize_conversation(Conversation(prompt + [{"role": "assistant", "content": reply}], "t"),
                                        checkpoint.tokenizer, 512, "last_assistant")
        ids = torch.tensor([example.input_ids])
        assert checkpoint.tokenizer.decode(example.input_ids[-2:], skip_special_tokens=False) == "<|im_end|>\n"
        with torch.no_grad():
            alone = model(ids).scores[0, -1, 0].item()
        assert total == pytest.approx(2 * alone, abs=1e-5)
    assert len(set(result.total.tolist())) == 4  # an empty reply is scored too, not a failure
