"""Runs killed with SIGKILL at random moments, and two processes on one run directory.

Each trial starts `orchard pretrain` as its own process and kills it (kill -9: no handler runs, no
`finally`) either at a random time or the moment a write is under way: the tokenizer's, a step
checkpoint's or the final checkpoint's temporary directory has appeared. Running the same command
again must finish with the same bytes as a run that was never interrupted, and leave no temporary
behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from untrusted import TINY_MODEL, write_corpus

TINY = [*TINY_MODEL, "train.max_steps=6", "train.eval_every=3", "train.save_every=1", "train.keep_checkpoints=2"]

# What each trial waits for before it kills: a write under way (its temporary directory), or a time.
MOMENTS = ["tokenizer", "tokenizer", "step-000002", "step-000004", "step-000006", "final", "time", "time", "time", "time"]


def command(out: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "orchard.cli.main", "pretrain", f"out={out}", f"data.path={corpus}", *TINY]


def environment(tmp_path: Path) -> dict[str, str]:
    # One thread, so that every run computes the same floating-point sums in the same order.
    return {**os.environ, "ORCHARD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def writing(out: Path, moment: str) -> bool:
    """Whether the write that `moment` names is under way in `out` (its temporary exists)."""
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return False
    return any(name.startswith(f".{moment}.tmp-") for name in names)


def kill_during(cmd: list[str], env: dict, out: Path, moment: str, seconds: float) -> str:
    """Start `cmd` and SIGKILL it at `moment`; returns what happened ("killed ..." or "finished")."""
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    try:
        while process.poll() is None:
            due = time.perf_counter() - started >= seconds if moment == "time" else writing(out, moment)
            if due:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return f"killed at {moment}"
            time.sleep(0.0002)
        return "finished"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_killed_runs_resume_to_the_same_bytes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = environment(tmp_path)
    reference = tmp_path / "reference"
    started = time.perf_counter()
    subprocess.run(command(reference, corpus), env=env, check=True, capture_output=True)
    duration = time.perf_counter() - started
    expected = {name: (reference / name).read_bytes()
                for name in ("final/model.safetensors", "final/tokenizer.json", "tokenizer/tokenizer.json")}

    rng = random.Random(0)
    outcomes = []
    for trial, moment in enumerate(MOMENTS):
        out = tmp_path / f"trial-{trial}"
        outcome = kill_during(command(out, corpus), env, out, moment, rng.uniform(0.3, 0.9) * duration)
        left_by_kill = temporaries(out)
        finished = subprocess.run(command(out, corpus), env=env, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr
        same = all((out / name).read_bytes() == data for name, data in expected.items())
        outcomes.append((outcome, left_by_kill, same, temporaries(out)))
    print("\n".join(f"trial {i}: {outcome}, leaving {killed}; rerun byte-identical: {same}; temporaries after "
                    f"the rerun: {left}" for i, (outcome, killed, same, left) in enumerate(outcomes)))
    assert all(same and not left for _, _, same, left in outcomes), outcomes
    # The writes are short: most trials must have caught theirs (a missed one ran to the end), and
    # those killed mid-write left a temporary that the rerun removed.
    assert sum(outcome.startswith("killed") for outcome, *_ in outcomes) >= 8, outcomes
    assert sum(bool(killed) for _, killed, _, _ in outcomes) >= 4, outcomes


def test_a_second_process_on_a_run_directory_stops_at_once(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = environment(tmp_path)
    out = tmp_path / "run"
    slow = [*command(out, corpus)[:6], *TINY_MODEL, "train.max_steps=100000", "train.max_time=60",
            "train.eval_every=0", "train.save_every=0"]
    first = subprocess.Popen(slow, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # training has begun: the first process holds the directory
        assert first.poll() is None, first.stderr.read()
        started = time.perf_counter()
        second = subprocess.run(command(out, corpus), env=env, capture_output=True, text=True, timeout=60)
        waited = time.perf_counter() - started
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert lines == [f"orchard: error: out: {out} is in use by another orchard process (pid {first.pid}); wait for "
                     f"it to finish or choose another out="], second.stderr
    assert waited < 30  # at once: no tokenizer training, no waiting on the lock
    # The holder died with kill -9: the kernel released its lock, and the directory can be resumed.
    again = subprocess.run(command(out, corpus), env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr


def test_writing_sees_a_temporary_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert not writing(out, "tokenizer")
    (out / ".tokenizer.tmp-123").mkdir()
    assert writing(out, "tokenizer") and not writing(out, "final")
    assert temporaries(tmp_path) == ["run/.tokenizer.tmp-123"]
