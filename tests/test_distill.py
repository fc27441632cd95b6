"""`orchard distill`: every mode on a tiny teacher, the offline cache's reuse, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchard.checkpoint import load_checkpoint, read_record, read_training_state, save_checkpoint
from orchard.config import load_config
from orchard.errors import OrchardError
from orchard.methods import distill
from orchard.training.runtime import Runtime

STUDENT_YAML = """\
hidden_size: 16
intermediate_size: 32
num_hidden_layers: 1
num_attention_heads: 2
num_key_value_heads: 1
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from orchard.data.synthetic import write_corpus

    return write_corpus(tmp_path_factory.mktemp("distill-corpus") / "world.jsonl", 120, seed=0)


@pytest.fixture
def student_yaml(tmp_path):
    path = tmp_path / "student.yaml"
    path.write_text(STUDENT_YAML)
    return path


def config(chat_base, corpus, out, **overrides) -> distill.DistillConfig:
    values = {"teacher": str(chat_base.dir), "out": str(out), "data.path": str(corpus), "data.seq_len": 32,
              "data.val_fraction": 0.1, "train.max_steps": 4, "train.batch_size": 4, "train.eval_every": 0,
              "train.eval_batches": 2, "train.save_every": 0, "train.progress": False, "train.log_every": 1, "top_k": 8,
              "max_train_windows": 24, **overrides}
    return load_config(distill.DistillConfig, None, [f"{k}={v}" for k, v in values.items()])


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_offline_cache_is_built_once_and_reused_without_the_teacher(chat_base, corpus, student_yaml, tmp_path):
    fp32 = {"train.precision": "fp32"}  # so the check below can recompute the teacher's numbers exactly
    first = distill.run(config(chat_base, corpus, tmp_path / "a", student=student_yaml, **fp32))
    data = read_record(first.final_dir)["data"]
    cache = data["teacher_cache"]
    assert cache["built_now"] and data["teacher_loaded"]
    # uint16 ids and float16 log-probabilities: 4 bytes per kept token, plus the .npy headers.
    assert cache["tokens"] == (24 + 8) * 32
    assert 4 * 8 <= cache["bytes_per_token"] < 4 * 8 + 1
    assert cache["build_flops"] > 0

    second = distill.run(config(chat_base, corpus, tmp_path / "b", student=student_yaml, divergence="reverse_kl",
                                **fp32))
    data = read_record(second.final_dir)["data"]
    assert not data["teacher_cache"]["built_now"] and not data["teacher_loaded"]
    assert data["teacher_cache"]["path"] == cache["path"]

    # The cached entries are the teacher's top-k log-probabilities of the first training window.
    stored = distill.open_teacher_cache(Path(cache["path"]))
    teacher = load_checkpoint(chat_base.dir).model
    from orchard.data.packing import PackedSequences, split_tokens
    from orchard.data.tokens import build_token_cache

    tokens = build_token_cache([corpus], load_checkpoint(chat_base.dir).tokenizer).tokens
    train, _ = split_tokens(tokens, 0.1, 32)
    with torch.no_grad():
        logits = teacher(PackedSequences(train, 32).batch([0])["input_ids"]).logits.float()
    expected = torch.log_softmax(logits, -1).topk(8, dim=-1)
    assert np.array_equal(stored.ids["train"][0].astype(np.int64), expected.indices[0].numpy())
    assert np.allclose(stored.log_probs["train"][0].astype(np.float32), expected.values[0].numpy(), atol=5e-3)


def test_offline_distillation_moves_the_student_towards_the_teacher(chat_base, corpus, student_yaml, tmp_path):
    run = distill.run(config(chat_base, corpus, tmp_path / "run", student=student_yaml, alpha=1.0,
                             **{"train.max_steps": 30, "train.eval_every": 30, "train.lr": 1e-2}))
    rows = [row for row in metrics(tmp_path / "run") if "val_forward_kl" in row]
    assert rows[-1]["val_forward_kl"] < 0.8 * rows[0]["val_forward_kl"]
    assert {"val_reverse_kl", "val_jsd", "val_bpb"} <= set(rows[-1])
    assert read_record(run.final_dir)["parameters"]["non_embedding_ratio"] < 0.25


def test_online_hidden_alignment_trains_projections_and_resumes(chat_base, corpus, student_yaml, tmp_path):
    settings = {"student": student_yaml, "mode": "online", "hidden_weight": 1.0, "train.save_every": 2}
    distill.run(config(chat_base, corpus, tmp_path / "run", **settings, **{"train.max_steps": 2}))
    state = read_training_state(tmp_path / "run" / "step-000002")
    projection = state["extra_modules"]["0.weight"]
    assert projection.shape == (32, 16)  # student width 16 -> teacher width 32
    resumed = distill.run(config(chat_base, corpus, tmp_path / "run", **settings, **{"train.max_steps": 4}))
    assert resumed.resumed_from == 2
    assert any("hidden_loss" in row for row in metrics(tmp_path / "run"))


def test_on_policy_batches_are_the_students_continuations(chat_base, corpus, student_yaml, tmp_path):
    cfg = config(chat_base, corpus, tmp_path / "run", student=student_yaml, mode="on_policy", lmbda=1.0,
                 prompt_tokens=8, max_new_tokens=6, divergence="jsd")
    teacher = distill.Teacher(cfg.teacher)
    student, _ = distill.build_student(cfg, teacher, 32)
    from orchard.data.packing import PackedSequences
    from orchard.data.tokens import build_token_cache

    tokens = build_token_cache([corpus], teacher.tokenizer).tokens
    windows = PackedSequences(tokens, 32)
    method = distill.Distillation(cfg, windows, windows, 8, 2, teacher.tokenizer.token_byte_lengths(), student,
                                  teacher.model, None, [teacher.tokenizer.eos_id], teacher.tokenizer.pad_id, Runtime())
    batch = method.batch(0, 0, 0, 1)
    assert torch.equal(batch["input_ids"][:, :8], windows.batch([method.order[s] for s in range(4)])["input_ids"][:, :8])
    assert (batch["labels"][:, :7] == -100).all()  # only the generated tokens are targets
    generated = batch["labels"][:, 7:-1]  # position t is trained to predict token t + 1
    written = generated != -100
    assert written.any() and torch.equal(generated[written], batch["input_ids"][:, 8:][written])
    assert torch.equal(method.batch(0, 0, 0, 1)["input_ids"], batch["input_ids"])  # a pure function of the step
    distill.run(cfg)
    assert metrics(tmp_path / "run")[-1]["step"] == 4


def test_student_from_teacher_layers_copies_them(chat_base, corpus, tmp_path):
    cfg = config(chat_base, corpus, tmp_path / "run", student_layers=[1])
    teacher = distill.Teacher(cfg.teacher)
    student, init = distill.build_student(cfg, teacher, 32)
    assert init is None and student.config.num_hidden_layers == 1
    for (name, value), (_, expected) in zip(student.model.layers[0].state_dict().items(),
                                            teacher.model.model.layers[1].state_dict().items()):
        assert torch.equal(value, expected.float()), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight.float())
    with pytest.raises(OrchardError, match="student_layers"):
        distill.build_student(config(chat_base, corpus, tmp_path / "x", student_layers=[5]), teacher, 32)


def test_a_student_with_another_tokenizer_is_refused(chat_base, corpus, tmp_path):
    from orchard.model import CausalLM, ModelConfig
    from orchard.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter(["another corpus altogether"] * 20), vocab_size=300)
    model = CausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    save_checkpoint(tmp_path / "other", model, tokenizer, record={"stage": "test"})
    with pytest.raises(OrchardError, match="another tokenizer"):
        distill.run(config(chat_base, corpus, tmp_path / "run", student=tmp_path / "other"))


def test_bad_settings_are_one_line_errors(chat_base, corpus, student_yaml, tmp_path):
    with pytest.raises(OrchardError, match="hidden_weight"):
        distill.run(config(chat_base, corpus, tmp_path / "a", student=student_yaml, hidden_weight=1.0))
    with pytest.raises(OrchardError, match="exactly one"):
        distill.run(config(chat_base, corpus, tmp_path / "b"))
    with pytest.raises(OrchardError, match="alpha"):
        config(chat_base, corpus, tmp_path / "c", alpha=1.5)
    with pytest.raises(OrchardError, match="teacher_device: unknown device 'gpu'"):
        distill.run(config(chat_base, corpus, tmp_path / "d", student=student_yaml, mode="online", teacher_device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(OrchardError, match="teacher_device: cuda asked for, but no CUDA device is available"):
            distill.run(config(chat_base, corpus, tmp_path / "e", student=student_yaml, mode="online",
                               teacher_device="cuda"))


def test_sequence_level_trains_on_the_teachers_answers(chat_base, student_yaml, tmp_path):
    cfg = load_config(distill.DistillConfig, None, [
        f"teacher={chat_base.dir}", f"student={student_yaml}", f"out={tmp_path / 'run'}", "mode=sequence",
        "prompts.max_prompts=6", "prompts.eval_prompts=2", "samples_per_prompt=2", "max_new_tokens=5",
        "sampling_temperature=1.0", "data.seq_len=128", "train.max_steps=2", "train.batch_size=2",
        "train.eval_every=0", "train.save_every=0", "train.progress=false"])
    result = distill.run(cfg)
    replies = (tmp_path / "run" / distill.REPLIES_FILE).read_text().splitlines()
    assert len(replies) == 12
    first = json.loads(replies[0])["messages"]
    assert first[-1]["role"] == "assistant" and first[-2]["role"] == "user"
    record = read_record(result.final_dir)
    assert record["stage"] == "distill-sequence" and record["data"]["answers"] == 12
    # The answers are reused: a second student does not load the teacher.
    again = distill.run(load_config(distill.DistillConfig, None, [
        f"teacher={chat_base.dir}", f"student={student_yaml}", f"out={tmp_path / 'run'}", "mode=sequence",
        "prompts.max_prompts=6", "prompts.eval_prompts=2", "samples_per_prompt=2", "max_new_tokens=5",
        "data.seq_len=128", "train.max_steps=3", "train.batch_size=2", "train.eval_every=0", "train.save_every=0",
        "train.progress=false"]))
    assert not read_record(again.final_dir)["data"]["teacher_loaded"]


def test_cli_takes_the_teacher_and_student_as_arguments(chat_base, corpus, student_yaml, tmp_path, capsys):
    from orchard.cli.main import main

    code = main(["distill", str(chat_base.dir), "--student", str(student_yaml), f"out={tmp_path / 'run'}",
                 f"data.path={corpus}", "data.seq_len=32", "train.max_steps=2", "train.batch_size=2",
                 "train.eval_batches=1", "train.progress=false", "max_train_windows=8", "top_k=4"])
    assert code == 0
    assert "2 steps" in capsys.readouterr().out
    code = main(["distill", str(chat_base.dir), "--student", str(tmp_path / "missing.yaml"), f"out={tmp_path / 'x'}"])
    assert code == 2
