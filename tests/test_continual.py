"""`orchard continual`: tasks in sequence with naive, replay, EWC and adapter strategies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from orchard.checkpoint import load_checkpoint, read_record
from orchard.config import load_config
from orchard.methods import continual
from orchard.methods.continual import pipeline
from orchard.methods.continual import (
    ContinualConfig,
    ContinualLanguageModeling,
    EWCPenalty,
    load_task,
    reservoir,
)

TASKS = ["arithmetic", "facts-en", "facts-zh"]


def make_config(chat_base, tmp_path, strategy="naive", tasks=TASKS, **extra) -> ContinualConfig:
    overrides = [f"init={chat_base.dir}", f"out={tmp_path / 'run'}", f"strategy={strategy}",
                 "tasks=[" + ",".join(tasks) + "]", "eval_items=4", "data.train_items=8", "data.max_length=96",
                 "train.max_steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=0",
                 "train.save_every=0", "train.log_every=1", "train.progress=false", "train.device=cpu",
                 "train.precision=fp32", "train.lr=1e-2", "peft.r=4"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(ContinualConfig, None, overrides)


def test_naive_writes_matrix_report_and_resumes_without_training(chat_base, tmp_path, monkeypatch):
    config = make_config(chat_base, tmp_path, tasks=TASKS[:2])
    result = continual.run(config)
    out = tmp_path / "run"
    data = json.loads((out / "continual.json").read_text())
    assert data["tasks"] == TASKS[:2] and data["strategy"] == "naive"
    assert len(data["R"]) == 2 and all(len(row) == 2 for row in data["R"]) and len(data["baseline"]) == 2
    assert set(data["summary"]) == {"average_accuracy", "backward_transfer", "forgetting", "forward_transfer"}
    assert (out / "R.png").stat().st_size > 0
    assert "after facts-en" in (out / "report.md").read_text()
    assert result.final_dir == out / "task-1-facts-en" / "final"
    # Lineage: task 1's parent is task 0's final checkpoint, and the record names strategy and task.
    record = read_record(result.final_dir)
    assert record["continual"]["task"] == "facts-en" and record["continual"]["strategy"] == "naive"
    assert record["parent"]["path"] == str((out / "task-0-arithmetic" / "final").resolve())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained or evaluated again")

    monkeypatch.setattr("orchard.training.engine.Trainer._evaluate", no_training)
    monkeypatch.setattr(pipeline, "_evaluate_row", no_training)
    monkeypatch.setattr(pipeline, "score_task", no_training)
    again = continual.run(config)
    assert again.resumed_from == 2
    assert json.loads((out / "continual.json").read_text())["R"] == data["R"]


def test_adapters_never_forget(chat_base, tmp_path):
    config = make_config(chat_base, tmp_path, strategy="adapters", eval_items=4)
    continual.run(config)
    out = tmp_path / "run"
    R = json.loads((out / "continual.json").read_text())["R"]
    baseline = json.loads((out / "continual.json").read_text())["baseline"]
    for i in range(3):
        for j in range(3):
            assert R[i][j] == (R[j][j] if j <= i else baseline[j])
    final = out / "task-2-facts-zh" / "final"
    assert (final / "adapters.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert read_record(final)["parent"]["path"] == str(chat_base.dir.resolve())
    # Each task's adapter is named after it and trained: it changes the base's output.
    checkpoint = load_checkpoint(final)
    from orchard.peft.lora import adapter_configs
    assert list(adapter_configs(checkpoint.model)) == ["facts-zh"]


def test_adapters_scores_are_exact_across_rows(chat_base, tmp_path, monkeypatch):
    """R[i][j] == R[j][j] holds because adapter j's weights are untouched, not because a score is
    cached: with a likelihood score (continuous), equality is exact too."""
    calls = []

    def likelihood(model, tokenizer, task):
        calls.append(task.name)
        return continual.mean_likelihood(model, task.scored, tokenizer.pad_id)

    monkeypatch.setattr(pipeline, "score_task", likelihood)
    config = make_config(chat_base, tmp_path, strategy="adapters", tasks=TASKS[:2])
    continual.run(config)
    data = json.loads((tmp_path / "run" / "continual.json").read_text())
    R = data["R"]
    assert R[1][0] == R[0][0]
    assert R[0][0] != data["baseline"][0]  # the adapter did train
    assert len(calls) == 2 + 2 * 2  # the baseline row, then every cell of every row, none cached


def test_ewc_fisher_and_penalty(chat_base, tmp_path):
    config = make_config(chat_base, tmp_path, strategy="ewc", tasks=TASKS[:2], ewc_batches=2, ewc_lambda=0.5)
    continual.run(config)
    out = tmp_path / "run"
    fisher0 = load_file(out / "task-0-arithmetic" / "fisher.safetensors")
    fisher1 = load_file(out / "task-1-facts-en" / "fisher.safetensors")
    assert fisher0 and all(torch.all(f >= 0) for f in fisher0.values())
    assert sum(f.sum() for f in fisher0.values()) > 0
    # Online EWC with gamma 1: the later Fisher includes the earlier one.
    assert all(torch.all(fisher1[k] >= fisher0[k]) for k in fisher0)
    metrics = [json.loads(line) for line in (out / "task-1-facts-en" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("ewc_penalty", 0) > 0 for m in metrics)

    # The penalty is zero at the anchor and positive after a step away from it.
    model = load_checkpoint(out / "task-0-arithmetic" / "final").model.float()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalty = EWCPenalty(model, fisher0, anchor, ewc_lambda=0.5)
    assert penalty.add_gradient(model) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # no pull at the anchor
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    value = penalty.add_gradient(model)
    # The value and the gradient added are those of (lambda / 2) * sum F (theta - theta*)^2.
    by_hand = 0.25 * sum((fisher0[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in fisher0)
    assert value > 0 and abs(value - by_hand.item()) <= 1e-6 * by_hand.item()
    added = {n: p.grad.clone() for n, p in model.named_parameters() if n in fisher0}
    model.zero_grad(set_to_none=True)
    by_hand.backward()
    assert all(torch.allclose(added[n], p.grad, rtol=1e-5, atol=1e-12) for n, p in model.named_parameters() if n in added)


def test_replay_batches(chat_base, tmp_path):
    config = make_config(chat_base, tmp_path, strategy="replay", replay_ratio=0.25, replay_size=6,
                         **{"train.grad_accum": 4})
    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    tasks = [load_task(name, config, tokenizer) for name in TASKS[:2]]
    buffer = reservoir(iter(tasks[0].train), config.replay_size, config.train.seed)
    assert len(buffer) == 6 and all(any(b is e for e in tasks[0].train) for b in buffer)
    assert reservoir(iter(tasks[0].train), 6, config.train.seed) == buffer  # seeded
    current = continual.conversation_modeling(tasks[1].train, tasks[1].scored, config, tokenizer.pad_id)
    replay = continual.conversation_modeling(buffer, tasks[1].scored, config, tokenizer.pad_id)
    method = ContinualLanguageModeling(current, replay, config.replay_ratio, config.train.seed)
    earlier = {tuple(e.input_ids) for e in tasks[0].train}
    flags = [method.is_replay(step, micro) for step in range(200) for micro in range(4)]
    assert 0.18 < sum(flags) / len(flags) < 0.32
    for step in range(10):
        for micro in range(4):
            batch = method.batch(step, micro, 0, 1)
            again = method.batch(step, micro, 0, 1)  # a pure function of (step, micro)
            assert all(torch.equal(batch[k], again[k]) for k in batch)
            source = replay if method.is_replay(step, micro) else current
            assert all(torch.equal(batch[k], source.batch(step, micro, 0, 1)[k]) for k in batch)
            if method.is_replay(step, micro):
                ids = batch["input_ids"][0].tolist()
                # The packed row starts with an earlier task's whole conversation.
                assert any(tuple(ids[:len(e)]) in earlier for e in earlier)
    # And a full replay run trains through both tasks.
    continual.run(make_config(chat_base, tmp_path, strategy="replay", tasks=TASKS[:2], replay_size=6))
    record = read_record(tmp_path / "run" / "task-1-facts-en" / "final")
    assert record["data"]["replay_buffer"] == 6


def test_path_task_is_scored_by_likelihood(chat_base, tmp_path):
    from orchard.cli.main import main
    from orchard.data.synthetic import World, continual_task_conversations, write_jsonl

    path = write_jsonl(tmp_path / "mine.jsonl", continual_task_conversations(World(), "facts-en", num_items=12))
    config = make_config(chat_base, tmp_path, tasks=["arithmetic", str(path)])
    overrides = [f"init={config.init}", f"out={config.out}", f"tasks=[arithmetic,{path}]", "eval_items=4",
                 "data.train_items=8", "data.max_length=96", "train.max_steps=2", "train.batch_size=2",
                 "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "train.device=cpu"]
    assert main(["continual", *overrides]) == 0
    data = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert data["tasks"] == ["arithmetic", "mine"] and data["metrics"] == ["exact_match", "likelihood"]
    assert 0 < data["R"][1][1] <= 1


def _write_text(path, documents=60):
    from orchard.data.synthetic import generate_documents

    path.write_text("\n".join(generate_documents(documents, seed=3)), encoding="utf-8")
    return path


def test_text_task_windows_held_out_from_the_end(chat_base, tmp_path):
    import numpy as np

    from orchard.data.tokens import build_token_cache

    corpus = _write_text(tmp_path / "story.txt")
    config = make_config(chat_base, tmp_path, tasks=[str(corpus)], **{"data.train_items": "null"})
    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    task = load_task(f"text:{corpus}", config, tokenizer)
    assert task.name == "story" and task.metric == "bits_per_byte" and task.text.window == 96
    tokens = np.asarray(build_token_cache([corpus], tokenizer).tokens)
    # The last eval_items windows (and the token the last one's final target needs) are held out;
    # training reads everything before, sharing only the boundary token as its last target.
    held_length = 4 * 96 + 1
    assert np.array_equal(task.text.scored, tokens[-held_length:])
    assert np.array_equal(task.text.train, tokens[:len(tokens) - held_length + 1])
    assert task.train_size() == (len(task.text.train) - 1) // 96 > 4
    examples = list(task.examples())
    assert len(examples) == task.train_size()
    assert examples[1].input_ids == tokens[96:192].tolist() and examples[1].labels == examples[1].input_ids
    capped = load_task(f"text:{corpus}", make_config(chat_base, tmp_path, **{"data.train_items": 3}), tokenizer)
    assert capped.train_size() == 3


def test_text_then_conversation_task_with_replay(chat_base, tmp_path):
    from orchard.data.packing import PackedSequences
    from orchard.evaluation.language_modeling import evaluate_language_modeling

    corpus = _write_text(tmp_path / "story.txt")
    config = make_config(chat_base, tmp_path, strategy="replay", tasks=[f"text:{corpus}", "facts-en"],
                         replay_size=5, replay_ratio=0.5, **{"train.max_steps": 4})
    continual.run(config)
    out = tmp_path / "run"
    data = json.loads((out / "continual.json").read_text())
    assert data["tasks"] == ["story", "facts-en"] and data["metrics"] == ["bits_per_byte", "exact_match"]
    # The text score is 2 ** -bpb of the held-out windows, and "values" gives the bpb itself.
    model = load_checkpoint(out / "task-0-story" / "final").model
    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    task = load_task(f"text:{corpus}", config, tokenizer)
    bpb = evaluate_language_modeling(model, PackedSequences(task.text.scored, 96), task.text.token_bytes,
                                     batch_size=16)["val_bpb"]
    assert data["R"][0][0] == pytest.approx(2 ** -bpb, rel=1e-5)
    assert data["values"][0][0] == pytest.approx(bpb, rel=1e-5)
    assert data["baseline_values"][0] > data["values"][0][0]  # training on the text lowered its bpb
    assert "bpb" in (out / "report.md").read_text()
    # The conversation task replayed text windows: its buffer came from the text task.
    record = read_record(out / "task-1-facts-en" / "final")
    assert record["data"]["replay_buffer"] == 5 and record["data"]["metric"] == "exact_match"


def test_task_steps_zero_scores_the_init_model_and_ewc_protects_it(chat_base, tmp_path):
    """Continued pretraining's setting: task 0 is what init already learnt (0 steps), yet its Fisher
    is computed on init and weighs the next task's training."""
    corpus = _write_text(tmp_path / "story.txt")
    config = make_config(chat_base, tmp_path, strategy="ewc", tasks=[f"text:{corpus}", "facts-en"],
                         task_steps="[0,2]", ewc_batches=2, ewc_lambda=10.0)
    result = continual.run(config)
    out = tmp_path / "run"
    data = json.loads((out / "continual.json").read_text())
    assert data["R"][0] == data["baseline"] and data["task_steps"] == [0, 2]
    assert data["checkpoints"][0] == str(chat_base.dir.resolve()) and not (out / "task-0-story" / "final").exists()
    fisher = load_file(out / "task-0-story" / "fisher.safetensors")
    assert sum(f.sum() for f in fisher.values()) > 0
    assert read_record(result.final_dir)["parent"]["path"] == str(chat_base.dir.resolve())
    metrics = [json.loads(line) for line in (out / "task-1-facts-en" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("ewc_penalty", 0) > 0 for m in metrics)
    from orchard.errors import OrchardError

    with pytest.raises(OrchardError, match="task_steps: give one number per task"):
        make_config(chat_base, tmp_path, task_steps="[0]")
    with pytest.raises(OrchardError, match="at least one task must train"):
        make_config(chat_base, tmp_path, tasks=TASKS[:2], task_steps="[0,0]")


def test_eval_on_train_scores_the_first_taught_items(chat_base, tmp_path):
    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    config = make_config(chat_base, tmp_path, eval_on="train")
    task = load_task("facts-en", config, tokenizer)
    assert [e.input_ids for e in task.scored] == [e.input_ids for e in task.train[:4]]
    from orchard.data.synthetic import World, continual_task

    assert [expected for _, expected in task.items] == [e for _, e in continual_task(World(), "facts-en", num_items=4)]
    held = load_task("facts-en", make_config(chat_base, tmp_path), tokenizer)
    assert not {tuple(e.input_ids) for e in held.scored} & {tuple(e.input_ids) for e in held.train}


def test_text_task_errors(chat_base, tmp_path):
    from orchard.errors import OrchardError

    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    short = tmp_path / "short.txt"
    short.write_text("too short to hold out four windows", encoding="utf-8")
    with pytest.raises(OrchardError, match="short.txt has .* tokens; need more than eval_items=4"):
        load_task(str(short), make_config(chat_base, tmp_path), tokenizer)
    with pytest.raises(OrchardError, match="no such file"):
        load_task(f"text:{tmp_path / 'missing.txt'}", make_config(chat_base, tmp_path), tokenizer)


def test_cli_registers_continual():
    from orchard.cli.main import build_parser
    from orchard.methods.registry import COMMANDS

    assert COMMANDS["continual"].config is ContinualConfig and COMMANDS["continual"].run is continual.run
    assert "continual" in build_parser().format_help()
    with pytest.raises(ValueError):
        ContinualConfig(replay_ratio=1.5)
