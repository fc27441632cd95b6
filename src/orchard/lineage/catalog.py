"""The catalog: every checkpoint orchard wrote or scanned, and how each was made from the others,
in one SQLite database (`$ORCHARD_HOME/catalog.sqlite`).

A checkpoint's identity is the hash of its weights (`weights_sha256` in its record), so a moved or
copied directory is the same checkpoint at another location; a location that no longer exists is
shown as missing, never dropped. An export's identity is its format and weights hash, so it is a
node of its own beside the checkpoint it copies. Other things checkpoints are made from (a
distillation teacher's cached top-k log-probabilities) are nodes too.

Edges run from what was used to what was made, with the relation read from the made one's record:

    trained from, adapter of, merged from, grown from, quantized from, distilled from,
    teacher cache reused by, reward model of, judge of, reference of, replayed data of,
    EWC Fisher of, exported as

Writes are one transaction each, in WAL mode with a busy timeout, so processes finishing at the same
time (ranks, parallel runs) wait for each other rather than lose an entry. A catalog that cannot be
written never fails the save that called it: the checkpoint on disk is what matters, and
`orchard lineage scan` adds it later.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from ..checkpoint.layout import RECORD_FILE
from ..errors import OrchardError
from ..files import read_json
from .stages import trains_adapters

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,      -- sha256:<weights>, export-<format>:<weights>, teacher-cache:<path>, record:<hash>
    kind TEXT NOT NULL,       -- checkpoint, export, teacher-cache
    stage TEXT,
    record TEXT               -- the orchard.json (or the cache's description) as JSON; NULL if never read
);
CREATE TABLE IF NOT EXISTS locations (
    path TEXT PRIMARY KEY,
    id TEXT NOT NULL REFERENCES nodes(id),
    seen TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edges (
    source TEXT NOT NULL REFERENCES nodes(id),
    target TEXT NOT NULL REFERENCES nodes(id),
    relation TEXT NOT NULL,
    PRIMARY KEY (source, target, relation)
);
CREATE INDEX IF NOT EXISTS edges_by_target ON edges(target);
CREATE INDEX IF NOT EXISTS locations_by_id ON locations(id);
"""

REWARD_SPEC = re.compile(r"^(?:[0-9.eE+-]+\*)?(model|judge):(.+)$")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")


def orchard_home() -> Path:
    """Where orchard keeps what outlives a run: `$ORCHARD_HOME`, else the user's data directory
    (`$XDG_DATA_HOME/orchard`, by default `~/.local/share/orchard`)."""
    if os.environ.get("ORCHARD_HOME"):
        return Path(os.environ["ORCHARD_HOME"]).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "orchard"


def catalog_file() -> Path:
    return orchard_home() / "catalog.sqlite"


def connect(path: Path | None = None) -> sqlite3.Connection:
    path = path or catalog_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=60, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA busy_timeout=60000")
    connection.executescript(SCHEMA)
    return connection


def node_id(record: dict, directory: Path) -> str:
    """A checkpoint's identity: its weights' hash (an export's: its format and weights' hash); a
    record without one (a sharded checkpoint not yet consolidated) is named by its record's hash."""
    sha = record.get("weights_sha256")
    if not sha:
        sha = "record:" + hashlib.sha256((directory / RECORD_FILE).read_bytes()).hexdigest()
    else:
        sha = f"sha256:{sha}"
    export = record.get("export")
    return f"export-{export.get('format', 'hf')}:{sha}" if isinstance(export, dict) else sha


def relations(record: dict) -> list[tuple[str, str, str, str]]:
    """(kind, identity, relation, path) of every node the record says it was made from: kind
    "checkpoint" (named by its weights' hash, at `path` when recorded), "path" (a checkpoint named
    by its path alone: a reward model, a judge; identity is the path) or "teacher-cache"."""
    found: list[tuple[str, str, str, str]] = []
    stage = str(record.get("stage", ""))
    recipe = record.get("recipe") or {}
    parent = record.get("parent") or {}
    export = record.get("export")
    if isinstance(export, dict) and (export.get("source") or {}).get("path"):
        source = export["source"]
        found.append(("checkpoint", _entry_id(source), "exported as", source["path"]))
        if record.get("merged_adapter"):
            found.append(("checkpoint", _entry_id(source), "merged from", source["path"]))
        return found
    if parent.get("path"):
        if trains_adapters(stage):
            relation = "adapter of"
        elif stage == "quantize":
            relation = "quantized from"
        elif stage == "grow":
            relation = "grown from"
        elif stage.startswith("distill"):
            relation = "distilled from"
        else:
            relation = "trained from"
        found.append(("checkpoint", _entry_id(parent), relation, parent["path"]))
        base = stage.split("-")[0]
        with_reference = ((base == "dpo" and recipe.get("loss", "dpo") not in REFERENCE_FREE_LOSSES) or base == "kto"
                          or (base == "grpo" and (recipe.get("beta") or 0) > 0)
                          or (base == "ppo" and (recipe.get("kl_coef") or 0) > 0))
        if with_reference:  # the init is the frozen reference of the KL term / the implicit reward
            found.append(("checkpoint", _entry_id(parent), "reference of", parent["path"]))
        if base == "continual":
            strategy = recipe.get("strategy")
            if strategy == "replay" and (record.get("data") or {}).get("replay_buffer"):
                found.append(("checkpoint", _entry_id(parent), "replayed data of", parent["path"]))
            elif strategy == "ewc":
                found.append(("checkpoint", _entry_id(parent), "EWC Fisher of", parent["path"]))
    cache = ((record.get("data") or {}).get("teacher_cache") or {}).get("path")
    if cache:
        found.append(("teacher-cache", f"teacher-cache:{cache}", "teacher cache reused by", cache))
    for spec in recipe.get("rewards") or []:
        match = REWARD_SPEC.match(str(spec).strip())
        if match:
            kind, path = match.groups()
            path = path.split(",")[0]
            found.append(("path", path, "reward model of" if kind == "model" else "judge of", path))
    return found


def _entry_id(entry: dict) -> str:
    """The identity of a checkpoint a record names by {path, weights_sha256}."""
    return f"sha256:{entry['weights_sha256']}" if entry.get("weights_sha256") else f"path:{entry['path']}"


def register(directory: str | Path, connection: sqlite3.Connection | None = None) -> str:
    """Add (or refresh) the checkpoint at `directory` and its relations; returns its identity."""
    directory = Path(directory).resolve()
    record = read_json(directory / RECORD_FILE)
    own = connection is None
    connection = connection or connect()
    try:
        identity = node_id(record, directory)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        kind = "export" if isinstance(record.get("export"), dict) else "checkpoint"
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute("INSERT INTO nodes (id, kind, stage, record) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO "
                               "UPDATE SET kind = excluded.kind, stage = excluded.stage, record = excluded.record",
                               (identity, kind, record.get("stage"), json.dumps(record)))
            connection.execute("INSERT INTO locations (path, id, seen) VALUES (?, ?, ?) ON CONFLICT(path) DO UPDATE "
                               "SET id = excluded.id, seen = excluded.seen", (str(directory), identity, now))
            for source_kind, source, relation, path in relations(record):
                source = _source_node(connection, source_kind, source, path, record, now)
                connection.execute("INSERT OR IGNORE INTO edges (source, target, relation) VALUES (?, ?, ?)",
                                   (source, identity, relation))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return identity
    finally:
        if own:
            connection.close()


def _source_node(connection, kind: str, source: str, path: str, record: dict, now: str) -> str:
    """The identity of a node an edge starts from, added (without its record, at its recorded
    location) if it is new."""
    if kind == "teacher-cache":
        cache = dict((record.get("data") or {}).get("teacher_cache") or {})
        cache.pop("built_now", None)
        connection.execute("INSERT INTO nodes (id, kind, stage, record) VALUES (?, 'teacher-cache', "
                           "'teacher cache', ?) ON CONFLICT(id) DO NOTHING", (source, json.dumps(cache)))
        connection.execute("INSERT OR IGNORE INTO locations (path, id, seen) VALUES (?, ?, ?)", (path, source, now))
        return source
    if kind == "path":  # a checkpoint named by its path (a reward model, a judge): known or read now
        path = str(_resolved(path))
        row = connection.execute("SELECT id FROM locations WHERE path = ?", (path,)).fetchone()
        if row:
            return row[0]
        record_file = Path(path) / RECORD_FILE
        if not record_file.is_file():
            final = Path(path) / "final" / RECORD_FILE  # a run directory
            record_file = final if final.is_file() else record_file
        source = node_id(read_json(record_file), record_file.parent) if record_file.is_file() else f"path:{path}"
        path = str(record_file.parent) if record_file.is_file() else path
    connection.execute("INSERT INTO nodes (id, kind) VALUES (?, 'checkpoint') ON CONFLICT(id) DO NOTHING", (source,))
    connection.execute("INSERT OR IGNORE INTO locations (path, id, seen) VALUES (?, ?, ?)", (path, source, now))
    return source


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve()


def record_written(directory: Path) -> None:
    """What every checkpoint writer calls once its directory is in place: register it, and say so
    rather than fail if the catalog cannot take it."""
    try:
        register(directory)
    except (sqlite3.Error, OSError, OrchardError, ValueError) as error:
        print(f"orchard: warning: the catalog ({catalog_file()}) did not take {directory}: {error}; "
              f"`orchard lineage scan` adds it later", file=sys.stderr)


def scan(directories: list[str | Path]) -> list[str]:
    """Register every checkpoint (a directory with orchard.json) under `directories`; returns their
    identities. Hidden folders are skipped."""
    found = []
    with closing(connect()) as connection:
        for root in directories:
            root = Path(root)
            if not root.is_dir():
                raise OrchardError(f"lineage scan: {root} is not a directory")
            for record_file in sorted(root.rglob(RECORD_FILE)):
                if any(part.startswith(".") for part in record_file.relative_to(root).parts[:-1]):
                    continue
                found.append(register(record_file.parent, connection))
    return found
