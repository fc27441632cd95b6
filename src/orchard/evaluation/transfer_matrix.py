"""Continual-learning metrics on an accuracy matrix, and a heat map and table to report them.

A continual run trains on tasks 0..T-1 in order and, after each, scores the model on every task:
``R[i][j]`` is the score on task ``j`` after training task ``i`` (higher is better). Everything
here is a pure function of that matrix (a list of lists or a numpy array), so a run only has to
record ``R`` and the report can be recomputed from it. The definitions follow Lopez-Paz & Ranzato,
"Gradient Episodic Memory for Continual Learning" (2017: average accuracy, backward and forward
transfer) and Chaudhry et al., "Riemannian Walk for Incremental Learning" (2018: forgetting).

With a single task there is nothing earlier to forget and nothing later to transfer to, so
backward transfer, forgetting and forward transfer are 0.0 rather than an undefined mean: a
one-task run then summarises like plain fine-tuning instead of breaking the report.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchard.evaluation.report import plt  # Agg backend, set up once there


def _matrix(R) -> np.ndarray:
    """``R`` as a float T x T array; anything else is a ValueError naming the shape."""
    try:
        matrix = np.asarray(R, dtype=float)
    except (TypeError, ValueError) as error:  # ragged rows, non-numbers
        raise ValueError(f"accuracy matrix must be a T x T table of numbers: {error}") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {matrix.shape}")
    return matrix


def average_accuracy(R) -> float:
    """Mean score over all tasks after training the last one: what the final model can do."""
    matrix = _matrix(R)
    return float(matrix[-1].mean())


def backward_transfer(R) -> float:
    """Mean over j < T-1 of ``R[T-1][j] - R[j][j]``: how later training changed each earlier task
    relative to just after learning it. Negative means forgetting; 0.0 for a single task."""
    matrix = _matrix(R)
    T = len(matrix)
    if T == 1:
        return 0.0
    return float(np.mean([matrix[-1, j] - matrix[j, j] for j in range(T - 1)]))


def forgetting(R) -> float:
    """Chaudhry's average forgetting: mean over j < T-1 of ``max_{i <= T-2} R[i][j] - R[T-1][j]``,
    the drop from the best score a task ever had to its final one. Unlike backward transfer it
    also counts a task that improved after its own training and then fell back; 0.0 for one task.

    The max runs over every row before the last, including rows from before task ``j`` was
    trained (as in Chaudhry et al.); those scores are normally no higher than ``R[j][j]``.
    """
    matrix = _matrix(R)
    T = len(matrix)
    if T == 1:
        return 0.0
    return float(np.mean([matrix[: T - 1, j].max() - matrix[-1, j] for j in range(T - 1)]))


def forward_transfer(R, baseline) -> float:
    """Mean over j > 0 of ``R[j-1][j] - baseline[j]``: how much training the earlier tasks helped
    a task before it was trained on. ``baseline[j]`` is task ``j``'s score before any continual
    training, normally the initial model's row (the model every task starts from, scored on each
    task); ``baseline[0]`` is not used. 0.0 for a single task."""
    matrix = _matrix(R)
    base = np.asarray(baseline, dtype=float)
    if base.shape != (len(matrix),):
        raise ValueError(f"baseline must have one score per task ({len(matrix)}), got shape {base.shape}")
    T = len(matrix)
    if T == 1:
        return 0.0
    return float(np.mean([matrix[j - 1, j] - base[j] for j in range(1, T)]))


def summary(R, baseline=None) -> dict:
    """All metrics in one dict. ``forward_transfer`` is None without a ``baseline``: the key is
    always present so report tables keep the same columns."""
    return {
        "average_accuracy": average_accuracy(R),
        "backward_transfer": backward_transfer(R),
        "forgetting": forgetting(R),
        "forward_transfer": None if baseline is None else forward_transfer(R, baseline),
    }


def _check_names(matrix: np.ndarray, task_names) -> list[str]:
    names = [str(name) for name in task_names]
    if len(names) != len(matrix):
        raise ValueError(f"need one task name per task ({len(matrix)}), got {len(names)}")
    return names


def _formatter(value_format) -> Callable[[int, float], str]:
    """``value_format`` as a function of (column, value): a format string serves every column."""
    if callable(value_format):
        return value_format
    return lambda column, value: value_format.format(value)


def markdown_table(R, task_names, value_format: str | Callable[[int, float], str] = "{:.0%}") -> list[list[str]]:
    """Rows for `Report.table` with header ``["after training", *task_names]``: one row per
    training stage, ``["after <task i>", R[i][0], ...]`` with the values formatted. ``value_format``
    is a format string, or a function of (column j, value) when tasks have different units."""
    matrix = _matrix(R)
    names = _check_names(matrix, task_names)
    text = _formatter(value_format)
    return [[f"after {names[i]}"] + [text(j, v) for j, v in enumerate(row)] for i, row in enumerate(matrix)]


def plot_matrix(R, task_names, png_path, title: str,
                value_format: str | Callable[[int, float], str] = "{:.0%}", colorbar_label: str = "score") -> Path:
    """A heat map of ``R``: rows "after <task i>", columns the tasks, each cell's value written in it
    (formatted as `markdown_table` does).

    Scores within [0, 1] are coloured on that fixed scale so heat maps of different runs compare
    by eye; other scores use the matrix's own range.
    """
    matrix = _matrix(R)
    names = _check_names(matrix, task_names)
    text = _formatter(value_format)
    png = Path(png_path)
    T = len(matrix)
    low, high = float(matrix.min()), float(matrix.max())
    if 0.0 <= low and high <= 1.0:
        low, high = 0.0, 1.0
    elif low == high:
        low, high = low - 1.0, high + 1.0
    size = 2.5 + 1.1 * T
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=110)
    image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high)
    for i in range(T):
        for j in range(T):
            # Dark text on the bright (yellow) end of viridis, light text elsewhere.
            bright = (matrix[i, j] - low) / (high - low) > 0.6
            ax.text(j, i, text(j, matrix[i, j]), ha="center", va="center",
                    color="black" if bright else "white", fontsize=10)
    ax.set_xticks(range(T), names)
    ax.set_yticks(range(T), [f"after {name}" for name in names])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("model")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")  # long row labels would be clipped
    plt.close(fig)
    return png
