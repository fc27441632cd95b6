"""`orchard eval`'s tasks on hand-made task files whose answers are known: each metric recomputed
here by hand (from the model's own log-probabilities or from canned replies) equals orchard's; the
comparison table, JSON and chart; and one-line errors for bad task names and files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cli_errors import run_error
from orchard.checkpoint import load_checkpoint, save_checkpoint
from orchard.cli.main import main
from orchard.evaluation import subject as subject_module
from orchard.evaluation.compare import evaluate_checkpoints
from orchard.evaluation.preference_tasks import (JudgeWinRate, PreferencePairs, graded_outcomes, pairwise_outcomes,
                                                 win_rate)
from orchard.evaluation.scoring import continuation_log_likelihoods, generate_replies
from orchard.evaluation.subject import EvalOptions, Subject
from orchard.evaluation.tasks import GSM8K, MultipleChoice, WorldTask, encode_pair, sampled_answer_metrics
from orchard.model.generation import SamplingConfig, generate_text
from orchard.serve.engine import Sampling
from orchard.training.runtime import Runtime

CPU = Runtime.for_inference("cpu")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def family(chat_base, tmp_path_factory):
    """The tiny chat checkpoint and a sibling that differs in its weights, recorded as its child."""
    root = tmp_path_factory.mktemp("family")
    base = load_checkpoint(chat_base.dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in base.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_checkpoint(root / "child", base.model, base.tokenizer,
                    record={"stage": "sft", "parent": {"path": str(chat_base.dir)}})
    return {"base": chat_base.dir, "child": root / "child"}


def log_likelihood_by_hand(model, context: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        log_probs = model(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
    return sum(float(log_probs[len(context) - 1 + i, token]) for i, token in enumerate(continuation))


def test_continuation_log_likelihoods_equal_a_forward_pass_each(family):
    checkpoint = load_checkpoint(family["base"])
    tokenizer = checkpoint.tokenizer
    requests = [(tokenizer.encode("Tom lives in"), tokenizer.encode(" Greenfield")),
                (tokenizer.encode("2 + 3 ="), tokenizer.encode(" 5")),
                (tokenizer.encode("a much longer context than the others, to pad them"), tokenizer.encode(" x y"))]
    scores = continuation_log_likelihoods(checkpoint.model, requests, batch_size=2)
    for (context, continuation), (total, greedy) in zip(requests, scores):
        assert total == pytest.approx(log_likelihood_by_hand(checkpoint.model, context, continuation), abs=1e-4)
        with torch.no_grad():
            logits = checkpoint.model(torch.tensor([context + continuation])).logits[0]
        predicted = logits[len(context) - 1:-1].argmax(-1).tolist()
        assert greedy == (predicted == continuation)


def test_replies_through_the_engine_equal_greedy_generation(family):
    checkpoint = load_checkpoint(family["base"])
    prompts = ["Tom lives in", "What is 2 + 3?", "汤姆住在", "Hugo"] * 3
    ids = [checkpoint.tokenizer.encode(p) for p in prompts]
    replies = generate_replies(checkpoint.model, checkpoint.tokenizer, ids,
                               [Sampling(10, temperature=0.0) for _ in ids], [checkpoint.tokenizer.eos_id], 4)
    assert replies == generate_text(checkpoint.model, checkpoint.tokenizer, prompts,
                                    SamplingConfig(max_new_tokens=10, temperature=0.0))
    # The batch size does not change a greedy reply (the engine's batch invariance).
    for batch_size in (2, 7, 32):
        assert generate_replies(checkpoint.model, checkpoint.tokenizer, ids, [Sampling(10, temperature=0.0)] * len(ids),
                                [checkpoint.tokenizer.eos_id], batch_size) == replies


def test_an_adapter_checkpoint_replies_with_its_adapter(family):
    """The engine routes each row to one adapter: a model loaded with its LoRA adapter active replies
    as the adapter makes it (the quickstart's LoRA model once scored 0% because its rows went to the
    base alone)."""
    from orchard.peft.lora import LoraConfig, active_adapter, add_lora

    checkpoint = load_checkpoint(family["base"])
    prompts = ["Tom lives in", "What is 2 + 3?", "Hugo"]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    base_replies = generate_text(checkpoint.model, checkpoint.tokenizer, prompts, greedy)
    add_lora(checkpoint.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in checkpoint.model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_(0, 0.5)
    assert active_adapter(checkpoint.model) == "default"
    adapted = generate_text(checkpoint.model, checkpoint.tokenizer, prompts, greedy)
    assert adapted != base_replies
    ids = [checkpoint.tokenizer.encode(p) for p in prompts]
    assert generate_replies(checkpoint.model, checkpoint.tokenizer, ids, [Sampling(8, temperature=0.0)] * 3,
                            [checkpoint.tokenizer.eos_id], 4) == adapted


def test_multiple_choice_accuracy_and_length_normalised_accuracy_by_hand(family, tmp_path):
    items = [{"question": "Where does Tom live?", "choices": ["Greenfield", "a town by the lake", "Stonebridge"],
              "answer": 0},
             {"question": "2 + 3 =", "choices": ["5", "six", "a number"], "answer": "six"},
             {"question": "Pick one", "choices": ["x", "yy", "a much longer choice"], "answer": 2},
             {"question": "汤姆住在哪里？", "choices": ["绿野", "湖畔村"], "answer": 1}]
    task = MultipleChoice(write_jsonl(tmp_path / "mc.jsonl", items), "mc")
    subject = Subject.load(family["base"], CPU)
    result = task.run(subject, EvalOptions(batch_size=3))
    acc = acc_norm = 0
    for item in items:
        answer = item["answer"] if isinstance(item["answer"], int) else item["choices"].index(item["answer"])
        lls = [log_likelihood_by_hand(subject.model, *encode_pair(subject.tokenizer,
                                                                  f"Question: {item['question']}\nAnswer:", f" {c}"))
               for c in item["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == answer
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i])) == answer
    assert result.count == 4
    assert result.metrics == {"acc": acc / 4, "acc_norm": acc_norm / 4}


def test_encode_pair_moves_the_contexts_trailing_space_to_the_continuation(family):
    tokenizer = load_checkpoint(family["base"]).tokenizer
    context, continuation = encode_pair(tokenizer, "Answer: ", "Greenfield")
    assert context == tokenizer.encode("Answer:")
    assert context + continuation == tokenizer.encode("Answer: Greenfield")


def test_sampled_answer_metrics_by_hand():
    sampled = [["3", "3", "4", None], ["7", "8", "8", "9"], [None, None, None, None], ["1", "2", "2", "1"]]
    truth = ["3", "7", "5", "1"]
    metrics = sampled_answer_metrics(sampled, truth, 4)
    # maj@4: "3" (2 of 4) right; "8" wins over "7" wrong; nothing; "1" and "2" tie, "1" came first: right.
    assert metrics == {"maj@4": 2 / 4, "pass@4": 3 / 4, "mean@4": (2 / 4 + 1 / 4 + 0 + 2 / 4) / 4}


def test_gsm8k_exact_match_and_maj_at_k_from_known_replies(family, tmp_path, monkeypatch):
    problems = [{"question": f"Problem {i}?", "answer": f"Some steps.\n#### {answer}"}
                for i, answer in enumerate(["12", "1,000", "7", "-3"])]
    path = write_jsonl(tmp_path / "gsm8k_test.jsonl", problems)
    canned = {  # prompt text -> [greedy reply, sampled replies...]
        "Problem 0?": ["It is 12.", "12", "#### 12", "13"],
        "Problem 1?": ["So 1000 in all", "#### 1,000", "999", "999"],
        "Problem 2?": ["7 then 8", "no idea", "7", "8"],
        "Problem 3?": ["#### -3", "-3", "3", "#### -3"]}
    seen = []

    def replies(self, prompts, samplings, options, what):
        texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        seen.extend(zip(texts, samplings))
        counts: dict[str, int] = {}
        out = []
        for text in texts:
            key = next(k for k in canned if k in text)
            out.append(canned[key][counts.get(key, 0)])
            counts[key] = counts.get(key, 0) + 1
        return out

    monkeypatch.setattr(Subject, "replies", replies)
    subject = Subject.load(family["child"], CPU)
    assert subject.chat  # an sft stage in its lineage
    result = GSM8K(path).run(subject, EvalOptions(samples=3, temperature=0.5, seed=7))
    # greedy: 12 right, "1000" right, "8" (last number) wrong, -3 right
    assert result.metrics["exact_match"] == 3 / 4
    # samples: [12, 12, 13] maj right; [1000, 999, 999] maj wrong; [None, 7, 8] tie 7 first right; [-3, 3, -3] right
    assert result.metrics["maj@3"] == 3 / 4 and result.metrics["pass@3"] == 1.0
    assert result.metrics["mean@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 2 / 3) / 4)
    greedy = [s for _, s in seen if s.temperature == 0]
    sampled = [s for _, s in seen if s.temperature == 0.5]
    assert len(greedy) == 4 and len(sampled) == 12 and len({s.seed for s in sampled}) == 12
    assert all("<|im_start|>" in text for text, _ in seen)  # the chat template, zero-shot

    seen.clear()
    base = Subject.load(family["base"], CPU)
    assert not base.chat
    shots = write_jsonl(tmp_path / "gsm8k_train.jsonl", [{"question": "Shot question?", "answer": "Shot steps.\n#### 5"}])
    assert shots.exists()
    GSM8K(path).run(base, EvalOptions(shots=1))
    assert seen[0][0].startswith("Question: Shot question?\nAnswer: Shot steps.\n#### 5\n\nQuestion: Problem 0?")
    assert seen[0][1].stop == ["Question:", "\n\n"]
    # No train split beside the file: its own first problems are the examples, and are not evaluated.
    shots.unlink()
    seen.clear()
    result = GSM8K(path).run(base, EvalOptions(shots=2))
    assert result.count == 2
    assert seen[0][0].startswith("Question: Problem 0?\nAnswer: Some steps.\n#### 12\n\nQuestion: Problem 1?\n"
                                 "Answer: Some steps.\n#### 1,000\n\nQuestion: Problem 2?\nAnswer:")


def test_win_rates_by_hand():
    first = ["A", "A", "B", "B", None, "A"]    # the checkpoint's reply shown as A
    swapped = ["B", "A", "A", "B", "B", "B"]  # shown as B
    outcomes = pairwise_outcomes(first, swapped)
    assert outcomes == ["win", "tie", "loss", "tie", None, "win"]  # always A / always B: position bias, a tie
    assert win_rate(outcomes) == {"win_rate": (2 + 2 / 2) / 5, "wins": 2, "losses": 1, "ties": 2, "unparsed": 1}
    graded = graded_outcomes([0.9, 0.5, None, 0.2], [0.3, 0.5, 0.4, 0.8])
    assert graded == ["win", "tie", None, "loss"]
    assert win_rate(graded)["win_rate"] == (1 + 1 / 2) / 3


def test_judge_win_rate_swaps_positions(family, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}"} for i in range(4)])

    def replies(self, prompts, samplings, options, what):
        texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        if what == "judging":  # a judge that prefers the longer answer, wherever it is shown
            verdicts = []
            for text in texts:
                a = text.split("Answer A: ")[1].split("\nAnswer B: ")[0]
                b = text.split("Answer B: ")[1].split("<|im_end|>")[0]
                verdicts.append("A" if len(a) > len(b) else "B" if len(b) > len(a) else "A")
            return verdicts
        # the checkpoint answers long on questions 0-2, the reference long on question 3
        long = self.path.resolve() == Path(family["child"]).resolve()
        return ["a long detailed reply" if long != (t.find("Question 3") >= 0) else "short" for t in texts]

    monkeypatch.setattr(Subject, "replies", replies)
    subject = Subject.load(family["child"], CPU)
    result = JudgeWinRate(prompts, "judge").run(subject, EvalOptions(judge=str(family["base"]),
                                                                     reference=str(family["base"])))
    assert result.metrics["wins"] == 3 and result.metrics["losses"] == 1 and result.metrics["win_rate"] == 3 / 4
    # Graded one reply at a time: a judge that gives longer replies higher grades.
    def grades(self, prompts, samplings, options, what):
        if what != "judging":
            return replies(self, prompts, samplings, options, what)
        texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        assert all("Grade the answer" in text for text in texts)
        return [str(min(10, len(text.split("Answer: ")[1].split("<|im_end|>")[0]) // 2)) for text in texts]

    monkeypatch.setattr(Subject, "replies", grades)
    graded = JudgeWinRate(prompts, "judge").run(subject, EvalOptions(judge=str(family["base"]), judge_mode="grade",
                                                                     reference=str(family["base"])))
    assert graded.metrics == {"win_rate": 3 / 4, "wins": 3, "losses": 1, "ties": 0, "unparsed": 0}
    with pytest.raises(Exception, match="--judge"):
        JudgeWinRate(prompts, "judge").run(subject, EvalOptions())


def test_preference_accuracy_of_an_implicit_reward_by_hand(family, chat_base):
    task = PreferencePairs(chat_base.val_pairs, "pairs")
    subject = Subject.load(family["child"], CPU)
    result = task.run(subject, EvalOptions(limit=6, batch_size=4))  # the reference: its recorded parent
    reference = load_checkpoint(family["base"])
    from orchard.data.preferences import tokenize_preference_pair
    right, margins = 0, []
    for pair in task.pairs[:6]:
        chosen, rejected = tokenize_preference_pair(pair, subject.tokenizer, 512)

        def reward(conversation):
            start = next(i for i, label in enumerate(conversation.labels) if label != -100)
            ids = conversation.input_ids
            return (log_likelihood_by_hand(subject.model, ids[:start], ids[start:])
                    - log_likelihood_by_hand(reference.model, ids[:start], ids[start:]))
        margins.append(reward(chosen) - reward(rejected))
        right += margins[-1] > 0
    assert result.count == 6
    assert result.metrics["accuracy"] == right / 6
    assert result.metrics["mean_margin"] == pytest.approx(sum(margins) / 6, abs=1e-3)


def test_world_task_scores_base_and_chat_models(family):
    options = EvalOptions(limit=4)
    base = WorldTask().run(Subject.load(family["base"], CPU), options)
    assert base.count == 12 and set(base.metrics) == {"exact_match", "exact_match (facts, en)",
                                                      "exact_match (facts, zh)", "exact_match (sums)"}
    chat = WorldTask().run(Subject.load(family["child"], CPU), options)
    assert chat.count == 4 and "exact_match (questions, en)" in chat.metrics
    assert all(0 <= v <= 1 for v in [*base.metrics.values(), *chat.metrics.values()])


def test_two_checkpoints_side_by_side(family, tmp_path, capsys):
    items = [{"question": f"Q{i}", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(6)]
    mc = write_jsonl(tmp_path / "mc.jsonl", items)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Tom Snow lives in Greenfield. " * 80, encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(family["base"]), str(family["child"]), "--tasks", f"mc:{mc},bpb:{corpus}",
                 "--seq-len", "32", "--out", str(tmp_path / "report"), "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in output["checkpoints"]] == ["base", "child"]
    assert output["checkpoints"][1]["stage"] == "sft" and output["checkpoints"][1]["parent"] == "base"
    acc = {name: r["metrics"]["acc"] for name, r in output["results"][f"mc:{mc}"].items()}
    direct = MultipleChoice(mc, "mc").run(Subject.load(family["child"], CPU), EvalOptions())
    assert acc["child"] == direct.metrics["acc"]
    table = (tmp_path / "report" / "eval.md").read_text()
    bpb = output["results"][f"bpb:{corpus}"]
    change = bpb["child"]["metrics"]["bits_per_byte"] - bpb["base"]["metrics"]["bits_per_byte"]
    assert f"({change:+.4g})" in table and "sft from base" in table
    png = (tmp_path / "report" / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    # A directory of the user's is not written into.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    line = run_error(capsys, ["eval", str(family["base"]), "--tasks", f"mc:{mc}", "--out", str(tmp_path / "mine")])
    assert "--out" in line and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("case", ["unknown", "malformed", "bad-answer", "missing", "no-path", "default-gsm8k", "twice",
                                  "no-checkpoint"])
def test_bad_tasks_are_one_line_errors(case, family, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/data here
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "choices": ["x", "y"], "answer": 0}\n{oops\n')
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "a", "choices": ["x", "y"], "answer": 5}])
    tasks, expected = {"unknown": ("hellaswag", "unknown task 'hellaswag'"),
                       "malformed": (f"mc:{bad}", "bad.jsonl:2"),
                       "bad-answer": (f"mc:{wrong}", "wrong.jsonl:1"),
                       "missing": (f"pairs:{tmp_path / 'nope.jsonl'}", "nope.jsonl"),
                       "no-path": ("mc", "mc:PATH"),
                       "default-gsm8k": ("gsm8k", "gsm8k:PATH"),
                       "twice": ("world,world", "'world' is named twice"),
                       "no-checkpoint": ("world", "nowhere")}[case]
    checkpoints = [str(family["base"])] + ([str(tmp_path / "nowhere")] if case == "no-checkpoint" else [])
    line = run_error(capsys, ["eval", *checkpoints, "--tasks", tasks])
    assert expected in line


def test_a_checkpoints_lineage_decides_its_format(family):
    assert subject_module.is_chat_model(family["child"]) and not subject_module.is_chat_model(family["base"])
    comparison = evaluate_checkpoints({"the child": family["child"]}, [], EvalOptions(chat=False), CPU)
    assert comparison.columns[0].name == "the child" and math.isfinite(comparison.columns[0].parameters)
    # The same checkpoint twice: two columns, told apart.
    twice = evaluate_checkpoints([family["child"], family["child"]], [], EvalOptions(), CPU)
    assert [c.name for c in twice.columns] == ["child", "child (2)"]
