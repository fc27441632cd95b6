"""KTO on unpaired examples: the reader of TRL's unpaired records, each example's KL partner, the
first loss (every implicit reward 0 and z0 = 0: each example's loss is 1 - sigma(0) = 0.5), and a
short run on the built-in world that raises held-out preference accuracy."""

from __future__ import annotations

import json
import math

import pytest

from cli_errors import run_error
from orchard.checkpoint import load_checkpoint
from orchard.config import load_config
from orchard.data.preferences import read_unpaired
from orchard.methods import kto
from orchard.methods.kto import KTOConfig, load_examples
from orchard.methods.pairs import PreferenceDataConfig


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_unpaired_records_and_their_kl_partners(chat_base, tmp_path):
    records = [{"prompt": "Where does Tom live?", "completion": "Greenfield.", "label": True},
               {"prompt": "Where does Tom live?", "completion": "I don't know.", "label": False},
               {"prompt": [{"role": "user", "content": "2 + 3?"}],
                "completion": [{"role": "assistant", "content": "5"}], "label": True}]
    path = write_jsonl(tmp_path / "u.jsonl", records)
    examples = list(read_unpaired(path))
    assert [e.desirable for e in examples] == [True, False, True]
    assert examples[2].prompt == [{"role": "user", "content": "2 + 3?"}]
    tokenizer = load_checkpoint(chat_base.dir).tokenizer
    train, val, record = load_examples(PreferenceDataConfig(path=str(path), val_path=str(path)), tokenizer, 0)
    # Each KL sequence answers its prompt with a reply to another prompt: the first two (same prompt)
    # borrow the third's "5", the third the first's.
    render = lambda seq: tokenizer.decode(seq.input_ids)  # noqa: E731
    assert "5" in render(train[0].kl_sequence) and "Tom" in render(train[0].kl_sequence)
    assert "Greenfield" in render(train[2].kl_sequence) and "2 + 3?" in render(train[2].kl_sequence)
    assert record["desirable"] == 2 and record["undesirable"] == 1 and not record["val_paired"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [records[0], {**records[1], "label": "no"}])
    with pytest.raises(Exception, match="bad.jsonl:2"):
        list(read_unpaired(bad))


def test_kto_learns_the_builtin_preferences(chat_base, tmp_path):
    # Built-in training pairs taken apart (the first 64 pairs: 128 examples), validated on 16 held-out pairs.
    config = load_config(KTOConfig, None, [
        f"init={chat_base.dir}", f"out={tmp_path / 'run'}", "data.max_pairs=64", f"data.val_path={chat_base.val_pairs}",
        "train.batch_size=8", "train.precision=fp32", "train.device=cpu", "train.log_every=1", "train.warmup_steps=0",
        "train.eval_every=100", "train.max_steps=15", "train.lr=1e-2"])
    result = kto.run(config)
    logged = lines(tmp_path / "run")
    evals = [line for line in logged if "val_accuracy" in line]
    steps = [line for line in logged if "loss" in line]
    assert [e["step"] for e in evals] == [0, 15]
    start, end = evals
    assert start["val_loss"] == pytest.approx(0.5, abs=1e-6)  # at the reference, every example's loss is 1 - sigma(0)
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6) and steps[0]["kl"] == 0.0
    assert end["val_accuracy"] >= start["val_accuracy"] + 0.2, evals
    assert end["val_loss"] < start["val_loss"] - 0.02  # beta 0.1: the sigmoid moves slowly from 0.5
    assert {"rewards/desirable", "rewards/undesirable", "kl"} <= set(steps[-1])
    assert all(math.isfinite(line["loss"]) for line in steps)
    record = json.loads((result.final_dir / "orchard.json").read_text())
    assert record["stage"] == "kto" and record["data"]["train_examples"] == 128 and record["data"]["val_paired"]


def test_kto_cli_errors(chat_base, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": 1}])
    line = run_error(capsys, ["kto", f"init={chat_base.dir}", f"out={tmp_path / 'a'}", f"data.path={bad}"])
    assert "bad.jsonl:1" in line and "label" in line
    assert "beta" in run_error(capsys, ["kto", f"init={chat_base.dir}", "beta=0"])
    # Held-out pairs with a broken record: the pair file's own error, not a guess at another format.
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                                 {"prompt": "c", "completion": "d", "label": False}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                   {"prompt": "a", "chosen": "b"}])
    line = run_error(capsys, ["kto", f"init={chat_base.dir}", f"out={tmp_path / 'b'}", f"data.path={good}",
                              f"data.val_path={pairs}"])
    assert "pairs.jsonl:2" in line
    assert not (tmp_path / "a" / "final").exists()
