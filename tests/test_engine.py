"""The training engine: the loss falls, resume is exact, DDP matches one process, limits hold."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchard.config import load_config
from orchard.data.synthetic import write_corpus
from orchard.errors import OrchardError
from orchard.methods import pretrain
from orchard.training import TrainConfig, engine, learning_rate, training_runtime

TINY = [
    "model.hidden_size=48", "model.intermediate_size=96", "model.num_hidden_layers=2",
    "model.num_attention_heads=4", "model.num_key_value_heads=2", "tokenizer.vocab_size=400",
    "data.seq_len=32", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
    "train.eval_batches=2", "train.log_every=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "world.jsonl", 400, seed=3)


def run_pretrain(out: Path, corpus: Path, *overrides: str):
    config = load_config(pretrain.PretrainConfig, None, [f"out={out}", f"data.path={corpus}", *TINY, *overrides])
    return pretrain.run(config)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_tiny_config(tmp_path, corpus):
    result = run_pretrain(tmp_path / "run", corpus, "train.max_steps=40", "train.eval_every=20")
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    vals = [m["val_loss"] for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert vals[-1] < vals[0] and vals[-1] < math.log(400)
    assert result.state.step == 40 and result.state.tokens == 40 * 4 * 32
    record = json.loads((result.final_dir / "orchard.json").read_text())
    assert record["stage"] == "pretrain" and record["training"]["steps"] == 40
    assert record["training"]["flops"] > 0 and record["data"]["fingerprint"]
    assert record["metrics"]["val_bpb"] > 0


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, corpus, monkeypatch):
    steps = ["train.max_steps=16", "train.save_every=5", "train.eval_every=8"]
    reference = run_pretrain(tmp_path / "reference", corpus, *steps)

    # Interrupt the run in the middle of step 13: the last checkpoint is step 10.
    original = pretrain.PackedLanguageModeling.batch

    def crash_at_13(self, step, *args):
        if step == 13:
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(pretrain.PackedLanguageModeling, "batch", crash_at_13)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tmp_path / "resumed", corpus, *steps)
    assert not (tmp_path / "resumed" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("step-*")) == ["step-000005", "step-000010"]
    monkeypatch.setattr(pretrain.PackedLanguageModeling, "batch", original)

    resumed = run_pretrain(tmp_path / "resumed", corpus, *steps)
    assert resumed.resumed_from == 10
    assert (resumed.final_dir / "model.safetensors").read_bytes() == \
           (reference.final_dir / "model.safetensors").read_bytes()
    # The metrics log has each step once, as if never interrupted.
    assert [m["step"] for m in metrics(tmp_path / "resumed") if "loss" in m] == list(range(1, 17))


def test_killed_process_resumes_to_the_same_bytes(tmp_path, corpus):
    """SIGKILL at an arbitrary moment (here: just after the first checkpoint appears)."""
    args = [sys.executable, "-m", "orchard.cli.main", "pretrain", f"data.path={corpus}", *TINY,
            "train.max_steps=60", "train.save_every=3", "train.eval_every=0"]
    env = {**os.environ, "ORCHARD_CACHE": str(tmp_path / "cache")}
    subprocess.run(args + [f"out={tmp_path / 'reference'}"], env=env, check=True, capture_output=True)

    process = subprocess.Popen(args + [f"out={tmp_path / 'killed'}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("step-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "final").exists()
    completed = subprocess.run(args + [f"out={tmp_path / 'killed'}"], env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "killed" / "final" / "model.safetensors").read_bytes() == \
           (tmp_path / "reference" / "final" / "model.safetensors").read_bytes()


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun is not installed")
def test_two_process_ddp_matches_one_process(tmp_path, corpus):
    """2 processes x batch 2 give the same loss curve as 1 process x batch 4 (same global batch)."""
    common = [f"data.path={corpus}", *TINY, "train.max_steps=8", "train.eval_every=0", "train.save_every=0",
              "train.precision=fp32"]
    env = {**os.environ, "ORCHARD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    single = [sys.executable, "-m", "orchard.cli.main", "pretrain", *common, "train.batch_size=4",
              f"out={tmp_path / 'one'}"]
    subprocess.run(single, env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "orchard.cli.main", "pretrain", *common, "train.batch_size=2", f"out={tmp_path / 'two'}"]
    completed = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        # About one full-suite run in five, a gloo worker aborted during start-up or teardown on this
        # shared 2-core machine (never reproduced alone). The launch is retried once; the loss
        # comparison below is never relaxed.
        print("first torchrun attempt failed:\n" + completed.stderr[-3000:])
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        completed = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    one = [m["loss"] for m in metrics(tmp_path / "one") if "loss" in m]
    two = [m["loss"] for m in metrics(tmp_path / "two") if "loss" in m]
    assert len(one) == len(two) == 8
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    assert one[-1] < one[0]
    record = json.loads((tmp_path / "two" / "final" / "orchard.json").read_text())
    assert record["training"]["world_size"] == 2 and record["training"]["global_batch"] == 4


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, corpus):
    common = ["train.max_steps=5", "train.eval_every=0", "train.save_every=0", "train.precision=fp32"]
    run_pretrain(tmp_path / "big", corpus, *common, "train.batch_size=4")
    run_pretrain(tmp_path / "accum", corpus, *common, "train.batch_size=2", "train.grad_accum=2")
    big = [m["loss"] for m in metrics(tmp_path / "big") if "loss" in m]
    accum = [m["loss"] for m in metrics(tmp_path / "accum") if "loss" in m]
    assert max(abs(a - b) for a, b in zip(big, accum)) < 1e-4


def test_global_batch_sets_the_accumulation_or_is_refused_in_one_line():
    config = TrainConfig(max_steps=1, batch_size=2, global_batch=8)
    training_runtime(config)
    assert config.grad_accum == 4  # one process: 8 sequences = 2 per micro-batch x 4
    with pytest.raises(OrchardError, match=r"train.global_batch=9 is not a multiple of train.batch_size=2"):
        training_runtime(TrainConfig(max_steps=1, batch_size=2, global_batch=9))
    with pytest.raises(OrchardError, match="train.global_batch must be positive"):
        load_config(pretrain.PretrainConfig, None, ["train.global_batch=0"])


def test_time_limit_stops_the_run(tmp_path, corpus):
    started = time.perf_counter()
    result = run_pretrain(tmp_path / "run", corpus, "train.max_time=3s", "train.eval_every=0")
    assert 3 <= result.state.elapsed < 8
    assert time.perf_counter() - started < 30
    assert result.state.step > 1


def test_auto_compile_compiles_a_run_with_time_left_and_records_it(tmp_path, corpus, monkeypatch):
    """train.compile=auto (the default) compiles a fixed-shape run after its 5th step when the time
    left reaches COMPILE_PAYS_AFTER (lowered to 0 here), and not otherwise; the record names the step.
    The compiled steps train as the eager ones (losses within 2%, bf16 or fp32)."""
    runs = {}
    for name, threshold in (("eager", 1e9), ("compiled", 0.0)):
        monkeypatch.setattr(engine, "COMPILE_PAYS_AFTER", threshold)
        result = run_pretrain(tmp_path / name, corpus, "train.max_steps=8", "train.eval_every=0")
        record = json.loads((result.final_dir / "orchard.json").read_text())
        runs[name] = ([m["loss"] for m in metrics(tmp_path / name) if "loss" in m], record["training"]["compiled_at_step"])
    (eager, eager_at), (compiled, compiled_at) = runs["eager"], runs["compiled"]
    assert eager_at is None and compiled_at == engine.AUTO_COMPILE_STEP
    assert eager[:5] == compiled[:5]
    assert max(abs(a - b) / a for a, b in zip(eager[5:], compiled[5:])) < 0.02, (eager, compiled)


def test_token_limit_stops_the_run(tmp_path, corpus):
    result = run_pretrain(tmp_path / "run", corpus, "train.max_tokens=1000", "train.eval_every=0")
    assert result.state.tokens >= 1000 and result.state.tokens - 4 * 32 < 1000


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(config, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(config, 9, 0.09) == pytest.approx(1.0)
    assert learning_rate(config, 55, 0.55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.55)))
    assert learning_rate(config, 100, 1.0) == pytest.approx(0.1)


def test_a_run_directory_refuses_a_different_recipe(tmp_path, corpus):
    run_pretrain(tmp_path / "run", corpus, "train.max_steps=3", "train.eval_every=0")
    with pytest.raises(OrchardError, match="model.hidden_size=48, not 64"):
        run_pretrain(tmp_path / "run", corpus, "train.max_steps=3", "train.eval_every=0", "model.hidden_size=64")


def test_raising_the_limit_extends_a_finished_run(tmp_path, corpus):
    steps = ["train.eval_every=0", "train.save_every=4"]
    run_pretrain(tmp_path / "run", corpus, "train.max_steps=4", *steps)
    again = run_pretrain(tmp_path / "run", corpus, "train.max_steps=4", *steps)
    assert again.state.step == 4  # finished: nothing to do
    extended = run_pretrain(tmp_path / "run", corpus, "train.max_steps=7", *steps)
    assert extended.resumed_from == 4 and extended.state.step == 7
    record = json.loads((tmp_path / "run" / "final" / "orchard.json").read_text())
    assert record["training"]["steps"] == 7


def test_activation_checkpointing_trains_the_same_and_may_change_on_resume(tmp_path, corpus, monkeypatch):
    from orchard.model import CausalLM

    settings = []
    original = CausalLM.set_activation_checkpointing
    monkeypatch.setattr(CausalLM, "set_activation_checkpointing",
                        lambda model, every: settings.append(every) or original(model, every))
    common = ["train.eval_every=0", "train.save_every=2", "train.precision=fp32"]
    run_pretrain(tmp_path / "plain", corpus, *common, "train.max_steps=4")
    run_pretrain(tmp_path / "recomputed", corpus, *common, "train.max_steps=2", "train.activation_checkpointing=true",
                 "train.activation_checkpointing_every=2")
    # The memory/compute trade-off is not part of the run's identity: the same run resumes without it.
    run_pretrain(tmp_path / "recomputed", corpus, *common, "train.max_steps=4")
    assert settings == [0, 2, 0]
    plain = [m["loss"] for m in metrics(tmp_path / "plain") if "loss" in m]
    recomputed = [m["loss"] for m in metrics(tmp_path / "recomputed") if "loss" in m]
    assert len(plain) == len(recomputed) == 4
    assert max(abs(a - b) for a, b in zip(plain, recomputed)) < 1e-6, (plain, recomputed)
    with pytest.raises(ValueError, match="activation_checkpointing_every"):
        TrainConfig(activation_checkpointing_every=0)
