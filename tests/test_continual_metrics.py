"""Continual-learning metrics against a hand-worked matrix, edge cases, and the report outputs."""

import numpy as np
import pytest

from orchard.evaluation.transfer_matrix import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    markdown_table,
    plot_matrix,
    summary,
)
from orchard.evaluation.report import Report

# Rows: after training task 0, 1, 2; columns: scored on task 0, 1, 2.
# Task 0 improves a little while task 1 is trained (0.90 -> 0.95), then drops to 0.5, so
# forgetting (from the best score) and backward transfer (from the score just after training) differ.
R = [
    [0.90, 0.10, 0.20],
    [0.95, 0.80, 0.30],
    [0.50, 0.70, 0.90],
]
BASELINE = [0.05, 0.10, 0.10]  # the initial model's scores; baseline[0] is never used


def test_hand_worked_three_tasks():
    # average accuracy: (0.5 + 0.7 + 0.9) / 3 = 2.1 / 3 = 0.7
    assert average_accuracy(R) == pytest.approx(0.7)
    # backward transfer: ((R20 - R00) + (R21 - R11)) / 2 = ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    #                  = (-0.4 - 0.1) / 2 = -0.25
    assert backward_transfer(R) == pytest.approx(-0.25)
    # forgetting: task 0: max(0.90, 0.95) - 0.5 = 0.45; task 1: max(0.10, 0.80) - 0.7 = 0.10
    #           -> (0.45 + 0.10) / 2 = 0.275
    assert forgetting(R) == pytest.approx(0.275)
    # forward transfer: task 1: R01 - b1 = 0.1 - 0.1 = 0.0; task 2: R12 - b2 = 0.3 - 0.1 = 0.2
    #                 -> (0.0 + 0.2) / 2 = 0.1
    assert forward_transfer(R, BASELINE) == pytest.approx(0.1)
    assert summary(R, BASELINE) == pytest.approx(
        {"average_accuracy": 0.7, "backward_transfer": -0.25, "forgetting": 0.275, "forward_transfer": 0.1})


def test_numpy_input_and_summary_without_baseline():
    result = summary(np.array(R))
    assert result["forward_transfer"] is None
    assert result["average_accuracy"] == pytest.approx(0.7)
    assert all(isinstance(v, float) for k, v in result.items() if k != "forward_transfer")


def test_single_task_has_no_transfer_or_forgetting():
    # Nothing earlier to forget, nothing later to transfer to: defined as 0.0 (see module docstring).
    assert summary([[0.6]], baseline=[0.2]) == {
        "average_accuracy": 0.6, "backward_transfer": 0.0, "forgetting": 0.0, "forward_transfer": 0.0}


@pytest.mark.parametrize("bad", [[[0.1, 0.2]], [[0.1, 0.2], [0.3]], [], [0.5], [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]])
def test_non_square_matrix_raises(bad):
    with pytest.raises(ValueError):
        summary(bad)


def test_baseline_and_names_must_match_the_task_count(tmp_path):
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(R, [0.1, 0.1])
    with pytest.raises(ValueError, match="task name"):
        markdown_table(R, ["a", "b"])
    with pytest.raises(ValueError, match="task name"):
        plot_matrix(R, ["a"], tmp_path / "m.png", "t")


def test_markdown_table_rows_fit_report_table(tmp_path):
    names = ["arithmetic", "facts-en", "facts-zh"]
    rows = markdown_table(R, names)
    assert rows[0] == ["after arithmetic", "90%", "10%", "20%"]
    assert rows[2] == ["after facts-zh", "50%", "70%", "90%"]
    report = Report("continual", tmp_path)
    report.table(["after training", *names], rows)
    assert "| after facts-en | 95% | 80% | 30% |" in report.write().read_text()


def test_plot_matrix_writes_a_png(tmp_path):
    png = plot_matrix(R, ["arithmetic", "facts-en", "facts-zh"], tmp_path / "plots" / "matrix.png",
                      "accuracy after each task")
    assert png == tmp_path / "plots" / "matrix.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Scores outside [0, 1] and a constant matrix plot too.
    assert plot_matrix([[3.0]], ["t"], tmp_path / "one.png", "one", value_format="{:.1f}").is_file()
