"""Several checkpoints on the same tasks, side by side: one column per checkpoint headed by its
lineage (stage, parent), deltas against the first column, a JSON form and a bar chart of each
task's headline metric.

Checkpoints are loaded one at a time and released before the next, so comparing a family of
large models costs the memory of one.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch

from ..checkpoint import resolve_checkpoint
from ..errors import OrchardError
from ..files import atomic_file
from ..lineage import checkpoint_name
from .subject import EvalOptions, Subject, TaskResult, higher_is_better
from .tasks import run_task

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

FRACTIONS = ("acc", "acc_norm", "accuracy", "exact_match", "win_rate", "accuracy_gain", "call_rate", "correct_calls",
             "failed_calls")
SAMPLED_FRACTIONS = ("maj@", "pass@", "mean@")
"""Metrics shown as percentages, their deltas in points: these names (with any "(kind)" after
them), and the sampled ones of any k."""


@dataclass
class Column:
    name: str
    path: Path
    stage: str
    parent: str | None
    """The parent checkpoint's name, if the record has one."""
    parameters: int

    @property
    def lineage(self) -> str:
        return self.stage + (f" from {self.parent}" if self.parent else "")


@dataclass
class Comparison:
    columns: list[Column]
    results: dict[str, list[TaskResult]]
    """Task name -> one result per column."""

    def rows(self) -> list[list[str]]:
        """The table's rows: the lineage, then one row per task and metric; each cell after the first
        column carries its difference from the first."""
        rows = [["", "lineage", *(c.lineage for c in self.columns)],
                ["", "parameters", *(f"{c.parameters:,}" for c in self.columns)]]
        for task, results in self.results.items():
            metrics = dict.fromkeys(m for r in results for m in r.metrics)  # a base and a chat model differ
            for metric in metrics:
                first = results[0].metrics.get(metric, float("nan"))
                cells = [_format(metric, first)]
                for result in results[1:]:
                    value = result.metrics.get(metric, float("nan"))
                    change = value - first
                    cells.append(_format(metric, value) + (f" ({_delta(metric, change)})" if math.isfinite(change) else ""))
                rows.append([task, metric, *cells])
        return rows

    def markdown(self) -> str:
        header = ["task", "metric", *(c.name for c in self.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"checkpoints": [{"name": c.name, "path": str(c.path), "stage": c.stage, "parent": c.parent,
                                 "parameters": c.parameters} for c in self.columns],
                "results": {task: {c.name: {"metrics": r.metrics, "headline": r.headline, "items": r.count,
                                            "seconds": round(r.seconds, 3), "examples": r.examples}
                                   for c, r in zip(self.columns, results)}
                            for task, results in self.results.items()}}

    def plot(self, png: Path) -> Path:
        """One panel per task (two side by side, then the next row): its headline metric for every
        checkpoint."""
        tasks = list(self.results)
        across = min(2, len(tasks))
        down = math.ceil(len(tasks) / across)
        width = max(4.0, 0.55 * len(self.columns) + 1.5)
        fig, axes = plt.subplots(down, across, figsize=(width * across, 3.8 * down), dpi=110, squeeze=False)
        for ax in axes.flat[len(tasks):]:
            ax.set_visible(False)
        names = [c.name for c in self.columns]
        for ax, task in zip(axes.flat, tasks):
            results = self.results[task]
            metric = results[0].headline
            values = [r.metrics.get(metric, float("nan")) for r in results]
            percent = _is_fraction(metric)
            shown = [v * 100 if percent else v for v in values]
            bars = ax.bar(range(len(names)), shown, color=[f"C{i % 10}" for i in range(len(names))])
            for bar, value in zip(bars, shown):
                if math.isfinite(value):
                    ax.annotate(f"{value:.1f}" if percent else f"{value:.3g}", (bar.get_x() + bar.get_width() / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            arrow = "higher is better" if higher_is_better(metric) else "lower is better"
            ax.set_title(f"{task}\n{metric}{' (%)' if percent else ''}, {arrow}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(png, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
        return png

    def write(self, directory: Path) -> list[Path]:
        """eval.json, eval.md (the table and the chart) and eval.png in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        png = self.plot(directory / "eval.png")
        data = json.dumps(self.to_json(), indent=1, ensure_ascii=False)
        written = [atomic_file(directory / "eval.json", lambda tmp: tmp.write_text(data, encoding="utf-8"))]
        page = f"# orchard eval\n\n{self.markdown()}\n![headline metrics](eval.png)\n"
        written.append(atomic_file(directory / "eval.md", lambda tmp: tmp.write_text(page, encoding="utf-8")))
        return [*written, png]


def evaluate_checkpoints(checkpoints: dict[str, Path] | list, tasks: list, options: EvalOptions,
                         runtime) -> Comparison:
    """Every task on every checkpoint (a list of paths, or names -> paths to choose the columns'
    names), in the order given; the first is the baseline of the deltas."""
    named = checkpoints.items() if isinstance(checkpoints, dict) else [(None, path) for path in checkpoints]
    # Every checkpoint is found before the first is evaluated: a typo in the last fails at once.
    named = [(name, resolve_checkpoint(path)) for name, path in named]
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise OrchardError(f"--tasks: {next(n for n in names if names.count(n) > 1)!r} is named twice")
    columns, results = [], {task.name: [] for task in tasks}
    for name, path in named:
        subject = Subject.load(path, runtime, options.chat)
        parent = (subject.record.get("parent") or {}).get("path")
        name = name or checkpoint_name(subject.path)
        taken = [c.name for c in columns]
        name = name if name not in taken else f"{name} ({sum(t.startswith(name) for t in taken) + 1})"
        columns.append(Column(name, subject.path, str(subject.record.get("stage", "external")),
                              checkpoint_name(Path(parent)) if parent else None, subject.model.num_parameters()))
        for task in tasks:
            print(f"orchard eval: {task.name} on {name}", file=sys.stderr, flush=True)
            results[task.name].append(run_task(task, subject, options))
        del subject
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()  # the next checkpoint gets the memory this one had
    return Comparison(columns, results)


def _is_fraction(metric: str) -> bool:
    return metric.split(" ")[0] in FRACTIONS or metric.startswith(SAMPLED_FRACTIONS)


def _format(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return "-"
    if _is_fraction(metric):
        return f"{value:.1%}"
    return f"{value:,.0f}" if abs(value) >= 1e4 or float(value).is_integer() else f"{value:.4g}"


def _delta(metric: str, delta: float) -> str:
    if not math.isfinite(delta):
        return "-"
    return f"{delta * 100:+.1f} pt" if _is_fraction(metric) else f"{delta:+.4g}"
