"""The import graph of `src/orchard`, read with `ast`: no cycle, and no import from a lower floor to
a higher one. Every import counts, those inside functions too (an import moved into a function to
break a cycle still makes one).

The floors, lowest first: the ground (`errors`, `files`, `config`, `hub`, `losses`) imports nothing
of orchard above it; `model`, `tokenizer` and `data` never import training, methods, evaluation or
the CLI; `environments` (tools, episodes) import no model, serving, training or evaluation code; the model never imports files or adapters; nothing below the exporters (`interop`) imports
them; only methods and the CLI import methods; nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "orchard"

GROUND = ("orchard.errors", "orchard.files", "orchard.config", "orchard.hub", "orchard.losses")
HIGH = ("orchard.training", "orchard.methods", "orchard.cli")
FORBIDDEN = [
    # (importer prefixes, imported prefixes, why)
    (GROUND, tuple(f"orchard.{name}" for name in ("model", "tokenizer", "data", "checkpoint", "peft", "interop",
                                                     "lineage", "evaluation", "training", "methods", "cli",
                                                     "rewards")),
     "the ground floor imports nothing above it"),
    (("orchard.model", "orchard.tokenizer", "orchard.data"), HIGH + ("orchard.evaluation",),
     "model, tokenizer and data sit below training, methods, evaluation and the CLI"),
    (("orchard.environments",), HIGH + ("orchard.evaluation", "orchard.model", "orchard.serve"),
     "environments (tools and episodes) know nothing of models: episodes take a sampling function"),
    (("orchard.model",), ("orchard.checkpoint", "orchard.peft", "orchard.interop"),
     "the model knows nothing of files or adapters"),
    (("orchard.checkpoint", "orchard.peft", "orchard.lineage", "orchard.training"), ("orchard.interop",),
     "interop holds the exporters, which read checkpoints: nothing below them imports them"),
    (("orchard.checkpoint", "orchard.peft", "orchard.interop", "orchard.lineage", "orchard.evaluation",
      "orchard.rewards", "orchard.training"), ("orchard.methods", "orchard.cli"),
     "only methods and the CLI use methods"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in SOURCE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The orchard modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("orchard") and target != name and target != "orchard":
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(edges.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walker_sees_relative_absolute_and_function_level_imports(tmp_path):
    edges = graph()
    assert "orchard.losses.tokens" in edges["orchard.evaluation.language_modeling"]
    assert "orchard.files" in edges["orchard.checkpoint.save"]
    assert "orchard.checkpoint.quantize" in edges["orchard.cli.commands"]  # imported inside a function
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycle():
    assert cycle(graph()) is None


@pytest.mark.parametrize("importers, imported, why", FORBIDDEN, ids=[rule[2] for rule in FORBIDDEN])
def test_no_import_goes_up_a_floor(importers, imported, why):
    wrong = sorted(f"{name} -> {target}" for name, targets in graph().items() if name.startswith(importers)
                   for target in targets if target.startswith(imported))
    assert wrong == [], why


def test_nothing_imports_the_cli():
    assert sorted(f"{name} -> {target}" for name, targets in graph().items() if not name.startswith("orchard.cli")
                  for target in targets if target.startswith("orchard.cli")) == []


def test_only_the_runtime_decides_device_and_precision():
    """Device, precision and autocast are decided in `training/runtime.py` (and the process group's
    device in `training/distributed.py`, which it owns); everything else asks a `Runtime`."""
    owners = {SOURCE / "training" / "runtime.py", SOURCE / "training" / "distributed.py"}
    decisions = ("torch.autocast(", "cuda.is_available(", "is_bf16_supported(", "Distributed.from_environment(")
    found = sorted(f"{path.relative_to(SOURCE)}: {word}" for path in SOURCE.rglob("*.py") if path not in owners
                   for word in decisions if word in path.read_text(encoding="utf-8"))
    assert found == []


METHODS = ("pretrain", "sft", "reward", "dpo", "grpo", "ppo", "distill", "continual")


def test_no_method_imports_another():
    """Each method reuses shared objectives from `training/` and helpers (`methods/pairs.py`,
    `methods/rollouts.py`), never another method's module."""
    def method_of(module: str) -> str | None:
        """The method a module belongs to (a method may be a package of modules), or None."""
        return next((name for name in METHODS if module == f"orchard.methods.{name}" or
                     module.startswith(f"orchard.methods.{name}.")), None)

    wrong = sorted(f"{name} -> {target}" for name, targets in graph().items() if method_of(name)
                   for target in targets if method_of(target) not in (None, method_of(name)))
    assert wrong == []


def test_every_method_module_is_under_400_lines():
    """Readable top to bottom: a method that grows past that becomes a package of modules."""
    long = {str(path.relative_to(SOURCE)): len(path.read_text(encoding="utf-8").splitlines())
            for path in (SOURCE / "methods").rglob("*.py")}
    assert {name: lines for name, lines in long.items() if lines > 400} == {}
