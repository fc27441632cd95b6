"""Reading text corpora: finding the files a config names, and streaming documents out of them.

Supported files: ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object per line),
``.json`` (JSONL, or one JSON list of objects such as Alpaca), ``.parquet``; ``.txt``, ``.jsonl``
and ``.json`` may be gzipped (``.gz``). Nothing is loaded whole except a ``.json`` list: corpora
may be larger than memory. Every problem with a file is an ``OrchardError`` naming the file and,
where there is one, the line.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchard.errors import OrchardError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_GZIP_OK = (".txt", ".jsonl", ".json")
# .txt files stream in chunks of whole lines of about this many bytes: small, so that a batch of
# many chunks keeps every tokenizer thread busy without holding much text in memory.
TXT_CHUNK_BYTES = 1 << 16
_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH_ROWS = 1024


def _kind(path: Path) -> str:
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
        _kind(path)
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
            _kind(path)  # a pattern that catches a stray README should fail loudly, not be skipped
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
    _kind(path)
    return [path]


def as_paths(paths) -> list[Path]:
    """One path or an iterable of paths, as a list of Paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def iter_text_chunks(paths, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield ``(text, end_of_document)`` for every document of every file, in order.

    A document arrives in one piece except a ``.txt`` file, which streams as chunks of whole lines
    (about TXT_CHUNK_BYTES each); the flag is True on a document's last piece, which is where a
    consumer puts its end-of-text token. Documents with no non-whitespace text are skipped.
    ``text_field`` is the field (JSON) or column (Parquet) holding the text.
    """
    for path in as_paths(paths):
        if not path.is_file():
            raise OrchardError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
        kind = _kind(path)
        found = False
        with _read_errors(path):
            if kind == ".txt":
                reader = _txt_chunks(path)
            elif kind == ".parquet":
                reader = ((text, True) for text in _parquet_texts(path, text_field))
            elif kind == ".json" and _starts_with_list(path):
                reader = ((text, True) for text in _json_list_texts(path, text_field))
            else:
                reader = ((text, True) for text in _jsonl_texts(path, text_field))
            for chunk in reader:
                found = True
                yield chunk
        if not found:
            raise OrchardError(f"{path}: file is empty")


def iter_documents(paths, text_field: str = "text") -> Iterator[str]:
    """Yield each document whole (a ``.txt`` file's chunks joined): for tokenizer training and
    other consumers of modest corpora."""
    parts: list[str] = []
    for text, end in iter_text_chunks(paths, text_field):
        parts.append(text)
        if end:
            yield "".join(parts)
            parts = []


@contextlib.contextmanager
def _read_errors(path: Path):
    """Turn I/O failures (unreadable file, corrupt gzip) into one-line OrchardErrors."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise OrchardError(f"{path}: cannot read ({reason})") from None


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(data: bytes, path: Path, first_lineno: int) -> str:
    """Decode UTF-8, reporting the line (counted from ``first_lineno``) of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = first_lineno + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise OrchardError(
            f"{path}:{lineno}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        ) from None


def _txt_chunks(path: Path) -> Iterator[tuple[str, bool]]:
    # Reads fixed-size blocks and cuts each after its last newline: a newline byte never occurs
    # inside a multi-byte UTF-8 character, so every chunk decodes on its own, and "\r\n" never
    # straddles two chunks.
    lineno = 1
    pending: str | None = None  # held back one step so the last chunk can be flagged as the end
    has_text = False
    carry = b""
    with _open_binary(path) as f:
        at_start = True
        while True:
            block = f.read(TXT_CHUNK_BYTES)
            data = carry + block
            if at_start:
                data = data.removeprefix(_BOM)
                at_start = False
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading until it ends
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            text = _decode(data, path, lineno).replace("\r\n", "\n")
            lineno += data.count(b"\n")
            if text:
                has_text = has_text or not text.isspace()
                if pending is not None:
                    yield pending, False
                pending = text
            if not block:
                break
    if not has_text:
        raise OrchardError(f"{path}: file is empty")
    yield pending, True


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of each non-blank line of a JSONL file (gzip or not, BOM
    stripped); invalid UTF-8 is an OrchardError naming the line."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            if raw.strip():
                yield lineno, _decode(raw, path, lineno)


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise OrchardError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        text = _field(record, text_field, f"{path}:{lineno}")
        if text.strip():
            yield text


def _starts_with_list(path: Path) -> bool:
    """Whether a .json file is one JSON list (rather than JSONL), from its first non-blank byte."""
    with _open_binary(path) as f:
        head = f.read(4096).removeprefix(_BOM)
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip()[:1] == b"["


def _json_list_texts(path: Path, text_field: str) -> Iterator[str]:
    with _open_binary(path) as f:
        data = f.read().removeprefix(_BOM)
    text = _decode(data, path, 1)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise OrchardError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    for index, record in enumerate(records, start=1):
        value = _field(record, text_field, f"{path}: item {index}")
        if value.strip():
            yield value


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise OrchardError(f"{where}: expected a JSON object, got {_json_type(record)}")
    if text_field not in record:
        raise OrchardError(f"{where}: no field '{text_field}'")
    value = record[text_field]
    if not isinstance(value, str):
        raise OrchardError(f"{where}: field '{text_field}' is {_json_type(value)}, expected a string")
    return value


_JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _json_type(value) -> str:
    return "null" if value is None else _JSON_TYPE_NAMES[type(value)]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise OrchardError(f"{path}: not a valid Parquet file ({str(e).splitlines()[0]})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise OrchardError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)})")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise OrchardError(f"{path}: column '{text_field}' is {column_type}, expected a string")
    row = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                raise OrchardError(f"{path}: row {row}: column '{text_field}' is null")
            if value.strip():
                yield value
