"""Reading files of records: the one reader behind text corpora, conversations, preference pairs and prompts.

Files: ``.txt`` (text corpora only), ``.jsonl`` (one JSON value per line), ``.json`` (JSONL, or one
JSON list such as Alpaca), ``.parquet`` (a row is a record); all but Parquet may be gzipped
(``.gz``). A config names them as a path, a glob, a directory or a list of those (`resolve_paths`).

`records` yields ``(source, record)`` for every record of a file, the source being ``path:line``,
``path: item N`` or ``path: row N``, which every error quotes. `read_records` adds what readers of
structured records share: a parser per record, and a bad record either an ``OrchardError`` naming it
or a skip counted by reason in `ReadStats`. Problems with a file itself (unreadable, invalid UTF-8,
a broken JSON list, no records) always raise.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OrchardError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_GZIP_OK = (".txt", ".jsonl", ".json")
BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH_ROWS = 256
T = TypeVar("T")


# --- files ---------------------------------------------------------------------------------------


def file_kind(path: Path) -> str:
    """The format of ``path`` from its name: one of SUFFIXES, without ``.gz``."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[: -len(".gz")]
    for suffix in SUFFIXES:
        if name.endswith(suffix) and (not gzipped or suffix in _GZIP_OK):
            return suffix
    raise OrchardError(
        f"{path}: unsupported file type (expected .txt, .jsonl, .json or .parquet; "
        "the first three may be .gz)"
    )


def _is_supported(path: Path) -> bool:
    try:
        file_kind(path)
    except OrchardError:
        return False
    return True


def resolve_paths(spec, key: str = "data.path") -> list[Path]:
    """The files ``spec`` names: a path, a glob pattern, a directory (its supported files,
    recursively, skipping hidden ones), or a list of those.

    Each entry expands in sorted order; a list keeps its own order (it may be deliberate), and a
    file named twice is read once. ``key`` is the config key quoted in errors.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise OrchardError(f"{key}: no files given")
    paths: list[Path] = []
    for entry in specs:
        paths.extend(_expand(entry, key))
    return list(dict.fromkeys(paths))


def _expand(entry, key: str) -> list[Path]:
    if not isinstance(entry, (str, os.PathLike)):
        raise OrchardError(f"{key}: expected a path or a list of paths, got {entry!r}")
    text = os.path.expanduser(os.fspath(entry))
    if any(c in text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        if not matches:
            raise OrchardError(f"{key}: no file matches '{entry}'")
        for path in matches:
            file_kind(path)  # a pattern that catches a stray README should fail loudly, not be skipped
        return matches
    path = Path(text)
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and _is_supported(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise OrchardError(f"{key}: no .txt, .jsonl, .json or .parquet file in directory '{entry}'")
        return found
    if not path.is_file():
        raise OrchardError(f"{key}: no such file '{entry}'")
    file_kind(path)
    return [path]


def as_paths(paths) -> list[Path]:
    """One path or an iterable of paths, as a list of Paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


@contextlib.contextmanager
def read_errors(path: Path):
    """Turn I/O failures (unreadable file, corrupt gzip) into one-line OrchardErrors."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise OrchardError(f"{path}: cannot read ({reason})") from None


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def decode(data: bytes, path: Path, first_lineno: int) -> str:
    """Decode UTF-8, reporting the line (counted from ``first_lineno``) of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = first_lineno + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise OrchardError(
            f"{path}:{lineno}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        ) from None


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of each non-blank line of a JSONL file (gzip or not, BOM
    stripped); invalid UTF-8 is an OrchardError naming the line."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            if raw.strip():
                yield lineno, decode(raw, path, lineno)


def starts_with_list(path: Path) -> bool:
    """Whether a .json file is one JSON list (rather than JSONL), from its first non-blank byte."""
    with open_binary(path) as f:
        head = f.read(4096).removeprefix(BOM)
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip()[:1] == b"["


_JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def json_type(value) -> str:
    """How an error names a value's JSON type ("a string", "null", ...)."""
    return "null" if value is None else _JSON_TYPE_NAMES.get(type(value), type(value).__name__)



# --- records -------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What `read_conversations` (and `tokenize_conversations`, and the readers of
    `orchard.data.preferences`) kept and skipped; pass one in and read it after the iterator is
    exhausted."""

    read: int = 0
    """Records seen (kept or skipped)."""
    kept: int = 0
    """Conversations yielded (by `tokenize_conversations`: tokenized examples returned)."""
    reasons: Counter = field(default_factory=Counter)
    """Skipped records by reason: "unknown role", "missing field", "non-string content",
    "no assistant turn", "empty assistant turn", "unrecognised record", "not an object",
    "invalid JSON", "too long"; preference pairs and prompts add "identical responses", "no user turn",
    "no final assistant turn" and "no final answer"."""
    truncated: int = 0
    """Conversations whose oldest turns were dropped to fit ``max_length``."""

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, reason: str) -> None:
        self.reasons[reason] += 1

    def describe(self) -> str:
        """``"3 unknown role, 1 empty assistant turn"`` (most frequent first), or ``"none"``."""
        if not self.reasons:
            return "none"
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items(), key=lambda r: (-r[1], r[0])))


class BadRecord(Exception):
    """A record a parser rejects: ``reason`` counts it in `ReadStats`, ``message`` explains it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def records(path: Path) -> Iterator[tuple[str, object]]:
    """(source, record) for each record of a file; a JSONL line that is not JSON comes as a `BadRecord`."""
    kind = file_kind(path)
    if kind == ".parquet":
        yield from _parquet_records(path)
    elif kind == ".json" and starts_with_list(path):
        with open_binary(path) as f:
            data = f.read().removeprefix(BOM)
        try:
            values = json.loads(decode(data, path, 1))
        except json.JSONDecodeError as e:
            raise OrchardError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for index, record in enumerate(values, start=1):
            yield f"{path}: item {index}", record
    else:
        for lineno, line in jsonl_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = BadRecord("invalid JSON", f"invalid JSON ({e.msg})")
            yield f"{path}:{lineno}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise OrchardError(f"{path}: not a valid Parquet file ({str(e).splitlines()[0]})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def read_records(paths, parse: Callable[[object], T], on_error: str = "error", stats: ReadStats | None = None,
                 key: str = "data.path", what: str = "records") -> Iterator[tuple[str, T]]:
    """``(source, parse(record))`` for every record of the files ``paths`` names: the reading and
    error handling shared by every reader of JSON records (conversations, preference pairs, prompts).

    ``parse`` raises `BadRecord` for a record it rejects; ``on_error`` "error" turns that into an
    OrchardError naming the record's source, "skip" counts it in ``stats.reasons``. Problems with a
    file itself (a .txt file, unreadable, invalid UTF-8, a broken JSON list, no records) always
    raise; ``what`` names the records in the .txt error.
    """
    if on_error not in ("error", "skip"):
        raise OrchardError(f"data.on_error: expected 'error' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    files = resolve_paths(paths, key)
    for path in files:
        kind = file_kind(path)
        if kind == ".txt":
            raise OrchardError(f"{path}: {what} must be .jsonl, .json or .parquet files, not .txt")
    for path in files:
        found = False
        with read_errors(path):
            for source, record in records(path):
                found = True
                stats.read += 1
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    parsed = parse(record)
                except BadRecord as bad:
                    if on_error == "error":
                        raise OrchardError(f"{source}: {bad.message}") from None
                    stats.skip(bad.reason)
                    continue
                stats.kept += 1
                yield source, parsed
        if not found:
            raise OrchardError(f"{path}: file is empty")


def string_field(record: dict, name: str, where: str = "", required: bool = True) -> str | None:
    """``record[name]`` if it is a string; missing (or null) is a `BadRecord` unless not ``required``."""
    if name not in record or record[name] is None:
        if required:
            raise BadRecord("missing field", f"{where}missing field '{name}'")
        return None
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord("non-string content", f"{where}field '{name}' is {json_type(value)}, expected a string")
    return value


