"""The continual run: baseline, every task trained in turn with its strategy, the R matrix and report."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...checkpoint import (FINAL_DIR, attach_adapter_checkpoint, is_adapter_checkpoint, load_checkpoint, load_merged,
                           read_weights, resolve_checkpoint)
from ...config import to_dict
from ...data.synthetic import World
from ...errors import OrchardError
from ...evaluation import transfer_matrix as continual_metrics
from ...evaluation.report import Report
from ...files import atomic_file, read_json, write_json
from ...lineage import new_record
from ...peft.config import PeftConfig
from ...peft.lora import LoraConfig, add_lora, set_active_adapters, trainable_parameter_count
from ...training import TrainConfig, Trainer, TrainResult, training_runtime
from ...training.run_directory import in_run_directory
from ...training.runtime import Runtime
from .config import ContinualConfig
from .scoring import format_value, score_task, task_value
from .strategies import ContinualLanguageModeling, EWCPenalty, diagonal_fisher, reservoir
from .tasks import Task, conversation_modeling, load_task

FISHER_FILE = "fisher.safetensors"
SCORES_FILE = "scores.json"


def _read_cached(path: Path) -> dict | None:
    """A score cache this run wrote, or None when it is missing or unreadable (then computed again)."""
    try:
        return read_json(path) if path.is_file() else None
    except OrchardError:
        return None


def _lora_config(peft: PeftConfig) -> LoraConfig:
    if peft.method not in ("lora", "dora"):
        raise OrchardError(f"peft.method: strategy=adapters trains one LoRA or DoRA adapter per task, "
                           f"not {peft.method!r}")
    return LoraConfig(r=peft.r, alpha=peft.alpha, dropout=peft.dropout, target_modules=peft.target_modules,
                      use_rslora=peft.rslora, use_dora=peft.method == "dora")


def task_dirs(config: ContinualConfig, tasks: list[Task]) -> list[Path]:
    return [Path(config.out) / f"task-{i}-{task.name}" for i, task in enumerate(tasks)]


def adapter_names(tasks: list[Task]) -> list[str]:
    """One adapter name per task: its name, with its index where a name repeats."""
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.name] = counts.get(task.name, 0) + 1
    return [task.name if counts[task.name] == 1 else f"{task.name}-{i}" for i, task in enumerate(tasks)]


def _evaluate_row(config: ContinualConfig, tasks: list[Task], finals: list[Path], base: Path, upto: int,
                  device: torch.device) -> list[float]:
    """Row `upto` of R: every task scored by the model after task `upto` (`finals`: each task's
    resulting checkpoint so far; with adapters, the base for a task that did not train)."""
    if config.strategy != "adapters":
        checkpoint = load_checkpoint(finals[upto], device)
        return [score_task(checkpoint.model, checkpoint.tokenizer, task) for task in tasks]
    checkpoint = load_checkpoint(base, device)
    names = adapter_names(tasks)
    trained = [j <= upto and finals[j] != base for j in range(len(tasks))]
    for j in range(upto + 1):
        if trained[j]:
            attach_adapter_checkpoint(checkpoint.model, base, finals[j], names[j])
    checkpoint.model.to(device)
    row = []
    for j, task in enumerate(tasks):
        set_active_adapters(checkpoint.model, names[j] if trained[j] else None)
        row.append(score_task(checkpoint.model, checkpoint.tokenizer, task))
    return row


def _save_fisher(fisher: dict[str, torch.Tensor], path: Path, config: ContinualConfig) -> None:
    """Atomically: a run killed while writing leaves no half-written Fisher to be trusted later."""
    atomic_file(path, lambda tmp: save_file(fisher, tmp, metadata={
        "format": "pt", "ewc_gamma": str(config.ewc_gamma), "ewc_batches": str(config.ewc_batches)}))


@in_run_directory("continual")
def run(config: ContinualConfig) -> TrainResult:
    if not config.init:
        raise OrchardError("init: continual needs a checkpoint to start from, e.g. init=runs/quickstart/sft")
    base = resolve_checkpoint(config.init)
    if config.strategy == "adapters" and is_adapter_checkpoint(base):
        raise OrchardError(f"init: strategy=adapters trains adapters on a full checkpoint, and {base} is an "
                           f"adapter checkpoint; merge it first (e.g. train from its merged export)")
    runtime = training_runtime(config.train)
    # Under torchrun every process scores the tasks (the same numbers) and trains; rank 0 writes.
    writes = runtime.distributed.rank == 0
    device = runtime.device
    out = Path(config.out)
    start = load_merged(base)
    tokenizer = start.tokenizer
    world = World()
    tasks = [load_task(spec, config, tokenizer, world) for spec in config.tasks]
    dirs = task_dirs(config, tasks)
    names = [task.name for task in tasks]
    recipe = to_dict(config)

    # Cached scores are reused only for the same scored items.
    key = {"tasks": names, "sources": [t.source for t in tasks], "eval_items": config.eval_items,
           "eval_on": config.eval_on, "world_seed": config.world_seed, "max_length": config.data.max_length,
           "train_items": config.data.train_items}
    cached = _read_cached(out / "baseline.json")
    if cached is not None and cached.get("key") == key:
        baseline = cached["baseline"]
    else:
        model = start.model.to(device)
        baseline = [score_task(model, tokenizer, task) for task in tasks]
        if writes:
            write_json(out / "baseline.json", {"key": key, "baseline": baseline})
        start.model.cpu()
    del start

    R: list[list[float]] = []
    result: TrainResult | None = None
    fisher: dict[str, torch.Tensor] | None = None
    steps = config.task_steps or [config.train.max_steps] * len(tasks)
    finals: list[Path] = []  # each task's resulting checkpoint
    for i, task in enumerate(tasks):
        parent = base if (i == 0 or config.strategy == "adapters") else finals[i - 1]
        current = task.method(config, tokenizer.pad_id)
        if steps[i] == 0:
            print(f"task {i} ({task.name}): scored, not trained (task_steps 0)", file=sys.stderr)
            finals.append(parent)
        else:
            result = _train_task(config, i, task, tasks, current, parent, dirs[i], fisher, recipe,
                                 replace(config.train, max_steps=steps[i]), runtime, tokenizer)
            finals.append(dirs[i] / FINAL_DIR)

        if config.strategy == "ewc":
            fisher_file = dirs[i] / FISHER_FILE
            try:
                stored = read_weights(fisher_file) if fisher_file.is_file() else None
            except OrchardError as problem:
                print(f"{problem}; computing it again", file=sys.stderr)
                stored = None
            if stored is not None:
                fisher = stored
            else:
                trained = load_checkpoint(finals[i], device).model.float()
                new = diagonal_fisher(trained, current, config.ewc_batches, device, runtime.distributed.world_size,
                                      config.train.grad_accum)
                fisher = new if fisher is None else {k: config.ewc_gamma * fisher[k] + new[k] for k in new}
                if writes:
                    _save_fisher(fisher, fisher_file, config)

        scores = _read_cached(dirs[i] / SCORES_FILE)
        if scores is None or scores.get("key") != key:
            row = _evaluate_row(config, tasks, finals, base, i, device)
            if writes:
                write_json(dirs[i] / SCORES_FILE, {"key": key, "scores": row})
        else:
            row = scores["scores"]
        R.append(row)

    summary = continual_metrics.summary(R, baseline)
    assert result is not None  # task_steps trains at least one task
    if not writes:
        return result
    write_json(out / "continual.json", {
        "strategy": config.strategy, "tasks": names, "sources": [t.source for t in tasks],
        "metrics": [t.metric for t in tasks], "R": R, "baseline": baseline, "summary": summary,
        "values": [[task_value(t, v) for t, v in zip(tasks, row)] for row in R],
        "baseline_values": [task_value(t, v) for t, v in zip(tasks, baseline)],
        "task_steps": steps, "checkpoints": [str(path) for path in finals]})
    title = f"continual ({config.strategy})"
    cell = lambda j, score: format_value(tasks[j], score)  # noqa: E731
    scale = "score (text: 2^-bits per byte)" if any(t.text is not None for t in tasks) else "score"
    png = continual_metrics.plot_matrix(R, names, out / "R.png", title, cell, scale)
    report = Report(title=title, directory=out)
    report.heading("Scores after each task")
    report.table(["after training", *names], continual_metrics.markdown_table(R, names, cell))
    report.table(["before training", *names], [["init"] + [cell(j, v) for j, v in enumerate(baseline)]])
    report.image(png, "R matrix")
    report.heading("Summary")
    report.table(["metric", "value"], [[k, "n/a" if v is None else v] for k, v in summary.items()])
    report.write()
    return result


def _train_task(config: ContinualConfig, i: int, task: Task, tasks: list[Task], current, parent: Path,
                run_dir: Path, fisher: dict[str, torch.Tensor] | None, recipe: dict, train: TrainConfig,
                runtime: Runtime, tokenizer) -> TrainResult:
    """Task i trained from `parent` with the strategy's changes, into `run_dir` (resumable)."""
    checkpoint = load_merged(parent)
    model = checkpoint.model.float().train()
    if config.strategy == "adapters":
        add_lora(model, _lora_config(config.peft), name=adapter_names(tasks)[i], seed=train.seed)
    trainable, total = trainable_parameter_count(model)

    replay = penalty = None
    buffer: list = []
    if config.strategy == "replay" and i > 0 and config.replay_size > 0:
        earlier = (example for t in tasks[:i] for example in t.examples())
        buffer = reservoir(earlier, config.replay_size, train.seed)
        replay = conversation_modeling(buffer, [], config, tokenizer.pad_id)
    if config.strategy == "ewc" and i > 0:
        if fisher is None:
            raise OrchardError("ewc: the previous task's Fisher is missing")
        anchor = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        penalty = EWCPenalty(model, fisher, anchor, config.ewc_lambda)
    method = ContinualLanguageModeling(current, replay, config.replay_ratio, train.seed, penalty)

    data_record = {"task": task.name, "source": task.source, "metric": task.metric,
                   "train": task.train_size(), "scored": len(task.scored) or config.eval_items,
                   "replay_buffer": len(buffer)}
    record = new_record("continual", recipe, data_record, parent=checkpoint.path,
                        peft_method=config.peft.method if config.strategy == "adapters" else "none",
                        parameters=(trainable, total))
    record["continual"] = {"strategy": config.strategy, "task": task.name, "index": i,
                           "tasks": [t.name for t in tasks]}
    print(f"task {i} ({task.name}): {config.strategy}, {train.max_steps} steps", file=sys.stderr)
    trainer = Trainer(train, model, method, tokenizer, run_dir, record,
                      flops_per_token=model.config.training_flops_per_token(config.data.max_length), runtime=runtime)
    return trainer.fit()
