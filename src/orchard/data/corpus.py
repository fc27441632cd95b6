"""Reading text corpora: streaming documents out of the files a config names (`records.resolve_paths`).

Supported files: ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object per line),
``.json`` (JSONL, or one JSON list of objects such as Alpaca), ``.parquet``; ``.txt``, ``.jsonl``
and ``.json`` may be gzipped (``.gz``). JSON records are read by `orchard.data.records`, the reader
conversations and preference pairs share; this module adds ``.txt`` streaming, Parquet's text
column and the text field. Nothing is loaded whole except a ``.json`` list: corpora may be larger
than memory. Every problem with a file is an ``OrchardError`` naming the file and,
where there is one, the line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OrchardError
from .records import BOM, BadRecord, as_paths, decode, file_kind, json_type, open_binary, read_errors, records

# .txt files stream in chunks of whole lines of about this many bytes: small, so that a batch of
# many chunks keeps every tokenizer thread busy without holding much text in memory.
TXT_CHUNK_BYTES = 1 << 16
_PARQUET_BATCH_ROWS = 1024


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
        kind = file_kind(path)
        found = False
        with read_errors(path):
            if kind == ".txt":
                reader = _txt_chunks(path)
            elif kind == ".parquet":
                reader = ((text, True) for text in _parquet_texts(path, text_field))
            else:
                reader = ((text, True) for text in _record_texts(path, text_field))
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


def _txt_chunks(path: Path) -> Iterator[tuple[str, bool]]:
    # Reads fixed-size blocks and cuts each after its last newline: a newline byte never occurs
    # inside a multi-byte UTF-8 character, so every chunk decodes on its own, and "\r\n" never
    # straddles two chunks.
    lineno = 1
    pending: str | None = None  # held back one step so the last chunk can be flagged as the end
    has_text = False
    carry = b""
    with open_binary(path) as f:
        at_start = True
        while True:
            block = f.read(TXT_CHUNK_BYTES)
            data = carry + block
            if at_start:
                data = data.removeprefix(BOM)
                at_start = False
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading until it ends
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            text = decode(data, path, lineno).replace("\r\n", "\n")
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


def _record_texts(path: Path, text_field: str) -> Iterator[str]:
    """The non-blank text of each record of a .jsonl or .json file."""
    for source, record in records(path):
        if isinstance(record, BadRecord):
            raise OrchardError(f"{source}: {record.message}")
        text = _field(record, text_field, source)
        if text.strip():
            yield text


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise OrchardError(f"{where}: expected a JSON object, got {json_type(record)}")
    if text_field not in record:
        raise OrchardError(f"{where}: no field '{text_field}'")
    value = record[text_field]
    if not isinstance(value, str):
        raise OrchardError(f"{where}: field '{text_field}' is {json_type(value)}, expected a string")
    return value


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
