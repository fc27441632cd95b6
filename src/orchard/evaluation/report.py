"""Run reports: a Markdown page with tables, samples and PNG plots.

Each pipeline stage adds its sections to one `Report`; `write` renders `report.md` beside the
plots it references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from ..files import atomic_file, read_json_lines

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(metrics_file: Path) -> list[dict]:
    if not metrics_file.is_file():
        return []
    return read_json_lines(metrics_file)


def plot_loss_curves(metrics_file: Path, png: Path, title: str) -> Path:
    """Training loss per step and validation loss at each evaluation, on one plot."""
    return plot_metrics(metrics_file, png, title, {"training loss": "loss", "validation loss": "val_loss"},
                        "cross-entropy (nats/token)")


def plot_metrics(metrics_file: Path, png: Path, title: str, series: dict[str, str], ylabel: str) -> Path:
    """One line per `series` entry (legend label -> metrics.jsonl key) against the step; keys
    logged only at evaluations are drawn with markers."""
    rows = read_metrics(metrics_file)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, key in series.items():
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            style = "o-" if key.startswith(("val_", "trained_")) else "-"  # evaluations: points
            ax.plot(*zip(*points), style, label=label, linewidth=1.2 if style == "-" else 1.5, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Report:
    title: str
    directory: Path
    sections: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.sections.append(f"## {text}\n")

    def text(self, text: str) -> None:
        self.sections.append(text.strip() + "\n")

    def table(self, header: list[str], rows: list[list]) -> None:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self.sections.append("\n".join(lines) + "\n")

    def image(self, png: Path, caption: str) -> None:
        self.sections.append(f"![{caption}]({png.relative_to(self.directory).as_posix()})\n")

    def samples(self, pairs: list[tuple[str, str]]) -> None:
        blocks = []
        for prompt, completion in pairs:
            shown = (prompt + completion).replace("```", "'''")
            blocks.append(f"```text\n{shown}\n```")
        self.sections.append("\n".join(blocks) + "\n")

    def write(self) -> Path:
        text = f"# {self.title}\n\n" + "\n".join(self.sections)
        return atomic_file(self.directory / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
