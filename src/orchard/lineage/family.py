"""Reading the catalog: a checkpoint's family in both directions, what it cost and what it shared,
the differences of two checkpoints, and the family drawn as a graph.

`Family` answers from the catalog (`catalog.py`); a checkpoint not in it yet is registered when it
is asked about, so `orchard lineage DIR` works on any checkpoint directory.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import read_model_config
from ..checkpoint.layout import RECORD_FILE
from ..errors import OrchardError
from .catalog import register
from .record import checkpoint_name

MADE_FROM = ("trained from", "adapter of", "grown from", "quantized from", "distilled from", "exported as",
             "merged from")
"""Relations whose source's compute the made checkpoint builds on (its ancestors' cost)."""
HEADLINE_METRICS = ("val_accuracy", "val_reward/exact_match", "val_bpb", "val_loss")


@dataclass
class Node:
    id: str
    kind: str
    stage: str | None
    record: dict | None
    """The orchard.json (a teacher cache's description); None for a node known only as a parent."""
    paths: list[str]

    @property
    def present(self) -> list[str]:
        return [p for p in self.paths if Path(p).exists()]

    @property
    def missing(self) -> bool:
        return not self.present

    @property
    def path(self) -> str:
        """Where it is: an existing location, a run's `final` before a step, else where it was."""
        candidates = self.present or self.paths
        return sorted(candidates, key=lambda p: (Path(p).name.startswith("step-"), p))[0] if candidates else "?"

    @property
    def name(self) -> str:
        return checkpoint_name(Path(self.path)) if self.kind != "teacher-cache" else "teacher cache " + Path(self.path).name

    @property
    def is_step(self) -> bool:
        return Path(self.path).name.startswith("step-")

    @property
    def training(self) -> dict:
        return (self.record or {}).get("training") or {}

    @property
    def own_flops(self) -> float:
        if self.kind == "teacher-cache":
            return float((self.record or {}).get("build_flops") or 0.0)
        return float(self.training.get("flops") or 0.0)

    @property
    def own_seconds(self) -> float:
        if self.kind == "teacher-cache":
            return float((self.record or {}).get("build_seconds") or 0.0)
        return float(self.training.get("wall_seconds") or 0.0)

    def summary(self) -> dict:
        record = self.record or {}
        parameters = record.get("parameters") or {}
        metrics = record.get("metrics") or {}
        headline = next(((k, metrics[k]) for k in HEADLINE_METRICS if isinstance(metrics.get(k), (int, float))), None)
        stage = f"export ({(record.get('export') or {}).get('format', 'hf')})" if self.kind == "export" \
            else self.stage or "unknown"
        return {"id": self.id, "name": self.name, "kind": self.kind, "stage": stage,
                "path": self.path, "locations": self.paths, "missing": self.missing, "trainable_parameters": parameters.get("trainable"),
                "parameters": parameters.get("total") or _parameter_count(self.path), "tokens": self.training.get("tokens"),
                "flops": self.own_flops, "wall_seconds": self.own_seconds,
                "metric": {"name": headline[0], "value": headline[1]} if headline else None}

    def line(self) -> str:
        info = self.summary()
        parts = [f"{self.name} [{info['stage']}]"]
        if info["parameters"]:
            trainable = info["trainable_parameters"]
            parts.append(f"{_count(trainable)}/{_count(info['parameters'])} params trained"
                         if trainable and trainable != info["parameters"] else f"{_count(info['parameters'])} params")
        if info["tokens"]:
            parts.append(f"{_count(info['tokens'])} tokens")
        if info["flops"]:
            parts.append(f"{info['flops']:.3g} FLOPs")
        if info["wall_seconds"]:
            parts.append(f"{info['wall_seconds']:.0f} s")
        if info["metric"]:
            parts.append(f"{info['metric']['name']} {info['metric']['value']:.4g}")
        parts.append(self.path + ("  (missing)" if self.missing else ""))
        return ", ".join(parts)


class Family:
    def __init__(self, connection: sqlite3.Connection):
        self.db = connection

    def find(self, path: str | Path) -> str:
        """The identity of the checkpoint at `path` (a checkpoint or run directory), registering it
        if the catalog does not know it yet."""
        directory = Path(path).expanduser()
        if not (directory / RECORD_FILE).is_file() and (directory / "final" / RECORD_FILE).is_file():
            directory = directory / "final"
        row = self.db.execute("SELECT id FROM locations WHERE path = ?", (str(directory.resolve()),)).fetchone()
        if row and (directory / RECORD_FILE).is_file():
            return register(directory, self.db)  # refreshed: the directory may hold another checkpoint now
        if row:
            return row[0]
        if not (directory / RECORD_FILE).is_file():
            raise OrchardError(f"{path}: not a checkpoint (no {RECORD_FILE}) and not in the catalog")
        return register(directory, self.db)

    def node(self, identity: str) -> Node:
        row = self.db.execute("SELECT id, kind, stage, record FROM nodes WHERE id = ?", (identity,)).fetchone()
        if row is None:
            raise OrchardError(f"no checkpoint {identity} in the catalog")
        paths = [p for (p,) in self.db.execute("SELECT path FROM locations WHERE id = ? ORDER BY seen DESC",
                                               (identity,))]
        return Node(row[0], row[1], row[2], json.loads(row[3]) if row[3] else None, paths)

    def parents(self, identity: str) -> list[tuple[Node, list[str]]]:
        return self._linked("SELECT source, relation FROM edges WHERE target = ?", identity)

    def children(self, identity: str) -> list[tuple[Node, list[str]]]:
        return self._linked("SELECT target, relation FROM edges WHERE source = ?", identity)

    def _linked(self, query: str, identity: str) -> list[tuple[Node, list[str]]]:
        linked: dict[str, list[str]] = {}
        for other, relation in self.db.execute(query, (identity,)):
            linked.setdefault(other, []).append(relation)
        return [(self.node(other), sorted(rels)) for other, rels in linked.items()]

    def ancestors(self, identity: str) -> list[tuple[int, Node, list[str]]]:
        """(generation, node, relations to the one below it), nearest first, each node once."""
        found, frontier, seen = [], [identity], {identity}
        generation = 0
        while frontier:
            generation += 1
            next_frontier = []
            for current in frontier:
                for parent, rels in self.parents(current):
                    if parent.id not in seen:
                        seen.add(parent.id)
                        found.append((generation, parent, rels))
                        next_frontier.append(parent.id)
            frontier = next_frontier
        return found

    def descendants(self, identity: str, steps: bool = False, seen: set | None = None) -> list[dict]:
        """The tree below a node: [{node, relations, children}], step checkpoints left out unless
        `steps` (or something was made from them)."""
        seen = seen if seen is not None else {identity}
        tree = []
        for child, rels in self.children(identity):
            if child.id in seen:
                continue
            seen.add(child.id)
            below = self.descendants(child.id, steps, seen)
            if child.is_step and not below and not steps:
                continue
            tree.append({"node": child, "relations": rels, "children": below})
        return sorted(tree, key=lambda entry: entry["node"].path)

    # --- views --------------------------------------------------------------------------------

    def render(self, identity: str, steps: bool = False) -> str:
        node = self.node(identity)
        lines = []
        ancestors = self.ancestors(identity)
        if ancestors:
            lines.append("ancestors (nearest first):")
            lines += [f"  {'  ' * (generation - 1)}{', '.join(rels)}: {parent.line()}"
                      for generation, parent, rels in ancestors]
        lines.append(node.line())
        tree = self.descendants(identity, steps)

        def walk(entries, prefix):
            for index, entry in enumerate(entries):
                last = index == len(entries) - 1
                lines.append(f"{prefix}{'└── ' if last else '├── '}{', '.join(entry['relations'])}: {entry['node'].line()}")
                walk(entry["children"], prefix + ("    " if last else "│   "))
        walk(tree, "")
        return "\n".join(lines)

    def to_json(self, identity: str, steps: bool = False) -> dict:
        def tree(entries):
            return [{**entry["node"].summary(), "relations": entry["relations"], "children": tree(entry["children"])}
                    for entry in entries]
        return {"checkpoint": self.node(identity).summary(),
                "ancestors": [{**parent.summary(), "generation": generation, "relations": rels}
                              for generation, parent, rels in self.ancestors(identity)],
                "descendants": tree(self.descendants(identity, steps))}

    def cost(self, identity: str) -> dict:
        """The reuse ledger: what the checkpoint spent itself, what the checkpoints it was made from
        spent (each once), what it shared and with how many, and what it saved where that was
        measured (a from-scratch checkpoint of its architecture and data in the catalog that got no
        further than it did)."""
        node = self.node(identity)
        ancestors, shared = [], []
        frontier, seen = [identity], {identity}
        while frontier:
            current = frontier.pop(0)
            for parent, rels in self.parents(current):
                if parent.id in seen:
                    continue
                if parent.kind == "teacher-cache":
                    seen.add(parent.id)
                    readers = len([c for c, _ in self.children(parent.id) if not c.is_step])  # runs, not their steps
                    shared.append({"what": parent.name, "relation": "teacher cache reused by", "flops": parent.own_flops,
                                   "seconds": parent.own_seconds, "shared_by": readers,
                                   "share_flops": parent.own_flops / max(readers, 1)})
                elif set(rels) & set(MADE_FROM):
                    seen.add(parent.id)
                    frontier.append(parent.id)
                    ancestors.append({"name": parent.name, "stage": parent.stage, "path": parent.path,
                                      "relations": rels, "flops": parent.own_flops, "seconds": parent.own_seconds,
                                      "missing": parent.missing})
                    if current == identity:  # a direct parent: how many share it the same way
                        made = [c for c, r in self.children(parent.id) if set(r) & set(rels) and not c.is_step]
                        if len(made) > 1:
                            total = parent.own_flops + self._ancestors_flops(parent.id)
                            shared.append({"what": parent.name, "relation": ", ".join(rels), "flops": total,
                                           "seconds": None, "shared_by": len(made), "share_flops": total / len(made)})
        ancestors_flops = sum(a["flops"] for a in ancestors)
        return {"checkpoint": node.summary(), "own": {"flops": node.own_flops, "seconds": node.own_seconds,
                                                       "tokens": node.training.get("tokens")},
                "ancestors": ancestors, "ancestors_flops": ancestors_flops,
                "ancestors_seconds": sum(a["seconds"] for a in ancestors), "shared": shared,
                "total_flops": node.own_flops + ancestors_flops + sum(s["share_flops"] for s in shared
                                                                     if s["relation"] == "teacher cache reused by"),
                "saved": self._saved(node, node.own_flops + ancestors_flops)}

    def _ancestors_flops(self, identity: str) -> float:
        return sum(parent.own_flops for _, parent, rels in self.ancestors(identity) if set(rels) & set(MADE_FROM))

    def _saved(self, node: Node, spent: float) -> dict | None:
        """Against the cheapest-to-beat from-scratch run: a checkpoint with no parent, the same
        architecture and data, whose validation loss is no better than this one's."""
        record = node.record or {}
        loss = (record.get("metrics") or {}).get("val_loss")
        config = _architecture(node.path)
        if loss is None or config is None:
            return None
        best = None
        related = {ancestor.id for _, ancestor, _ in self.ancestors(node.id)}
        for (other_id, other_record) in self.db.execute("SELECT id, record FROM nodes WHERE kind = 'checkpoint' AND "
                                                        "record IS NOT NULL AND id != ?", (node.id,)):
            if other_id in related:
                continue
            other = json.loads(other_record)
            other_loss = (other.get("metrics") or {}).get("val_loss")
            if other.get("parent") or other_loss is None or other_loss < loss:
                continue
            if (other.get("data") or {}).get("fingerprint") != (record.get("data") or {}).get("fingerprint"):
                continue
            scratch = self.node(other_id)
            if _architecture(scratch.path) != config or scratch.own_flops <= 0:
                continue
            if best is None or scratch.own_flops < best.own_flops:
                best = scratch
        if best is None:
            return None
        return {"from_scratch": best.summary(), "flops": best.own_flops - spent,
                "fraction": (best.own_flops - spent) / best.own_flops}

    def diff(self, first: str, second: str) -> dict:
        """Recipe, data and metric differences: {section: {key: (first's, second's)}}."""
        a, b = self.node(first).record or {}, self.node(second).record or {}
        out = {}
        for section in ("stage", "recipe", "data", "parameters", "training", "metrics"):
            left, right = _flatten(a.get(section)), _flatten(b.get(section))
            changed = {k: (left.get(k), right.get(k)) for k in sorted(set(left) | set(right))
                       if left.get(k) != right.get(k) and k not in ("training.compiled_at_step",)}
            if changed:
                out[section] = changed
        return out


def _architecture(path: str) -> dict | None:
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    data = json.loads(config.read_text(encoding="utf-8"))
    return {k: data.get(k) for k in keys}


def _parameter_count(path: str) -> int | None:
    """Parameters of the model whose config.json is at `path` (records of pretraining runs do not
    repeat them)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return read_model_config(Path(path)).num_parameters()
    except (OrchardError, ValueError, KeyError):
        return None


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "value": value}


def _count(value) -> str:
    if not value:
        return "0"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def plot_family(family: Family, identity: str, png: Path, steps: bool = False) -> Path:
    """The family as a layered graph drawn with networkx (generations as columns, each node centred on
    what was made from it; Graphviz's `dot` where pygraphviz is installed), edges labelled with
    their relations, missing checkpoints greyed, the asked-for one outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    from ..files import atomic_file

    graph = nx.DiGraph()
    nodes = {identity: family.node(identity)}
    depth, rows = {identity: 0}, {}
    next_row = [0.0]

    def place(entries, level) -> list[float]:
        """A tidy tree: each leaf a row of its own, each node centred on its children."""
        placed = []
        for entry in entries:
            node = entry["node"]
            nodes[node.id], depth[node.id] = node, level
            below = place(entry["children"], level + 1)
            if below:
                rows[node.id] = sum(below) / len(below)
            else:
                rows[node.id], next_row[0] = next_row[0], next_row[0] + 1
            placed.append(rows[node.id])
        return placed

    below = place(family.descendants(identity, steps), 1)
    rows[identity] = sum(below) / len(below) if below else 0.0
    generations: dict[int, list] = {}
    for generation, parent, _ in family.ancestors(identity):
        generations.setdefault(generation, []).append(parent)
    for generation, parents in generations.items():
        for index, parent in enumerate(parents):
            nodes[parent.id], depth[parent.id] = parent, -generation
            rows[parent.id] = rows[identity] + index - (len(parents) - 1) / 2
    for node_id in nodes:
        graph.add_node(node_id)
    for source in nodes:
        for child, rels in family.children(source):
            if child.id in nodes:
                graph.add_edge(source, child.id, label=", ".join(rels))
    try:
        positions = nx.nx_agraph.graphviz_layout(graph, prog="dot", args="-Grankdir=LR")
    except ImportError:  # pygraphviz is optional: the tidy layered layout needs nothing
        positions = {node_id: (3.0 * depth[node_id], -rows[node_id]) for node_id in nodes}
    width = max(8.0, 2.6 * (max(depth.values()) - min(depth.values()) + 1))
    height = max(4.0, 0.9 * (max(rows.values()) - min(rows.values()) + 2))
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    stage_colours = {}
    colours = []
    for node_id in graph.nodes:
        node = nodes[node_id]
        key = (node.stage or node.kind or "?").split("-")[0]
        stage_colours.setdefault(key, f"C{len(stage_colours) % 10}")
        colours.append("lightgrey" if node.missing else stage_colours[key])
    nx.draw_networkx_edges(graph, positions, ax=ax, arrows=True, arrowsize=12, edge_color="#777777",
                           node_size=1800, connectionstyle="arc3,rad=0.05")
    nx.draw_networkx_nodes(graph, positions, ax=ax, node_color=colours, node_size=1800,
                           edgecolors=["black" if n == identity else "white" for n in graph.nodes], linewidths=2)
    labels = {n: f"{nodes[n].name}\n{nodes[n].summary()['stage']}" + ("\n(missing)" if nodes[n].missing else "")
              for n in graph.nodes}
    nx.draw_networkx_labels(graph, positions, labels, ax=ax, font_size=7)
    nx.draw_networkx_edge_labels(graph, positions, nx.get_edge_attributes(graph, "label"), ax=ax, font_size=6,
                                 font_color="#444444", label_pos=0.5)
    ax.set_title(f"family of {nodes[identity].name}: made from (left) and made from it (right)", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return png


def format_cost(ledger: dict) -> str:
    own = ledger["own"]
    lines = [f"{ledger['checkpoint']['name']}: its own training {own['flops']:.3g} FLOPs, {own['seconds']:.0f} s"
             + (f", {own['tokens']:,} tokens" if own.get("tokens") else "")]
    if ledger["ancestors"]:
        lines.append(f"made from (each counted once): {ledger['ancestors_flops']:.3g} FLOPs, "
                     f"{ledger['ancestors_seconds']:.0f} s")
        lines += [f"  {a['name']} ({', '.join(a['relations'])}): {a['flops']:.3g} FLOPs, {a['seconds']:.0f} s"
                  + ("  (missing)" if a["missing"] else "") for a in ledger["ancestors"]]
    for item in ledger["shared"]:
        lines.append(f"shared: {item['what']} ({item['relation']}) cost {item['flops']:.3g} FLOPs, shared by "
                     f"{item['shared_by']}: {item['share_flops']:.3g} FLOPs each")
    lines.append(f"total: {ledger['total_flops']:.3g} FLOPs (own + what it was made from + its share of caches)")
    saved = ledger["saved"]
    if saved is None:
        lines.append("saved: not measured (no from-scratch run of the same architecture and data that got no "
                     "further is in the catalog)")
    else:
        verdict = (f"saved {saved['flops']:.3g} FLOPs ({saved['fraction']:.0%})" if saved["flops"] >= 0 else
                   f"cost {-saved['flops']:.3g} FLOPs more ({-saved['fraction']:.0%})")
        lines.append(f"against {saved['from_scratch']['name']}, trained from scratch on the same data to a validation "
                     f"loss no better ({saved['from_scratch']['path']}): {verdict}, measured")
    return "\n".join(lines)
