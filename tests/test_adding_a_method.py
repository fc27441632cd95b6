"""docs/adding-a-method.md stays true: its complete RLOO method, taken from the page as it is, loads as
a method module, computes the leave-one-out advantages by hand, obeys the layering rules, and trains
through the CLI once its registry line is added, with checkpoints, metrics and resuming from the engine."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from orchard.cli.main import main
from orchard.methods import registry

from cli_errors import run_error

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.fixture
def rloo(monkeypatch):
    """The page's method module, loaded as `orchard.methods.rloo`, and its registry line added."""
    module_source, registry_line = code_blocks()
    spec = importlib.util.spec_from_loader("orchard.methods.rloo", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "orchard.methods"
    monkeypatch.setitem(sys.modules, "orchard.methods.rloo", module)
    exec(compile(module_source, str(DOC), "exec"), module.__dict__)
    command = eval(registry_line.strip().rstrip(","), {"TrainingCommand": registry.TrainingCommand, "rloo": module})
    monkeypatch.setitem(registry.COMMANDS, "rloo", command)
    return module


def test_the_example_is_about_sixty_lines_and_imports_no_other_method():
    module_source = code_blocks()[0]
    assert 40 <= len(module_source.splitlines()) <= 80
    imported = {"." * node.level + (node.module or "") for node in ast.walk(ast.parse(module_source))
                if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "dataclasses", "..training", "..training.run_directory", ".rollouts"}
    assert "autocast" not in module_source and ".cuda" not in module_source


def test_leave_one_out_advantages_by_hand(rloo):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = rloo.leave_one_out_advantages(rewards, 4)
    # 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3; an all-equal group has no signal.
    assert torch.allclose(advantages, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    assert advantages.view(-1, 4).sum(1).abs().max() < 1e-6  # leave-one-out advantages sum to 0 per group


def test_the_example_trains_through_the_cli_and_resumes(rloo, chat_base, tmp_path, capsys):
    out = tmp_path / "rloo"
    args = ["rloo", f"init={chat_base.dir}", f"out={out}", "num_generations=4", "max_new_tokens=6",
            "data.max_prompts=16", "data.eval_prompts=4", "train.batch_size=2", "train.precision=fp32",
            "train.device=cpu", "train.eval_every=0", "train.warmup_steps=0", "train.save_every=2"]
    assert main(args + ["train.max_steps=2"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert all(0.0 <= line["reward"] <= 1.0 for line in lines if "reward" in line)
    assert (out / "step-000002").is_dir() and (out / "final").is_dir()
    record = json.loads((out / "final" / "orchard.json").read_text())
    assert record["stage"] == "rloo" and record["recipe"]["num_generations"] == 4

    assert main(args + ["train.max_steps=3"]) == 0  # the same command, further: resumes from step 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]

    line = run_error(capsys, args + ["train.max_steps=3", "num_generations=1"])
    assert "num_generations" in line and "at least 2" in line


def test_the_help_lists_the_inherited_and_own_keys(rloo, capsys):
    with pytest.raises(SystemExit):
        main(["rloo", "--help"])
    help_text = capsys.readouterr().out
    for key in ("init", "out", "num_generations", "data.max_prompts", "peft.method", "train.lr"):
        assert f"  {key} = " in help_text
