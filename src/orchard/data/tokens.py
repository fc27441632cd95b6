"""Token cache: a corpus tokenized once into a memory-mapped file, reused while neither the corpus
nor the tokenizer changes.

Tokenizing is the slow part of reading a corpus, and training reads it many times (every epoch,
every run of a sweep). The cache lives under ``<cache_root>/tokens/<fingerprint>/`` as
``tokens.bin`` (raw token ids, documents separated by the end-of-text id) and ``meta.json``.
It is built in a temporary directory and renamed into place when complete, so a crashed build
never looks finished and concurrent builders don't corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OrchardError
from ..files import cached_directory, fingerprint, write_json
from .corpus import iter_text_chunks
from .records import as_paths

# Bump when the cache layout or how text becomes tokens changes, so stale caches are not reused.
CACHE_VERSION = 1
# A batch handed to the tokenizer: large enough to keep its threads busy, small enough for RAM.
_BATCH_CHARS = 2 << 20
_BATCH_CHUNKS = 8192
_HASH_BLOCK = 1 << 20


def default_cache_root() -> Path:
    return Path(os.environ.get("ORCHARD_CACHE") or Path.home() / ".cache" / "orchard")


def corpus_fingerprint(paths, text_field: str) -> str:
    """sha256 over each file's name, size and content, in order, and ``text_field``.

    The file's name, not its full path, so moving the corpus directory keeps the cache valid.
    """
    h = hashlib.sha256()
    h.update(f"text_field={text_field}\n".encode())
    for path in as_paths(paths):
        if not path.is_file():
            raise OrchardError(f"{path}: no such file")
        size = path.stat().st_size
        # Name and size are length-delimited so no two different corpora hash the same bytes.
        h.update(f"{len(path.name.encode())}:{path.name}:{size}\n".encode())
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class TokenCache:
    """A tokenized corpus: ``tokens`` is every document's ids, each followed by the eos id."""

    directory: Path
    tokens: np.memmap
    num_documents: int
    fingerprint: str

    def __len__(self) -> int:
        return len(self.tokens)


def build_token_cache(
    paths, tokenizer, text_field: str = "text", cache_root=None, show_progress: bool = False
) -> TokenCache:
    """The token cache for ``paths`` under ``tokenizer``: loaded if it exists, built otherwise.

    ``cache_root`` defaults to $ORCHARD_CACHE, else ~/.cache/orchard.
    """
    paths = as_paths(paths)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = fingerprint(CACHE_VERSION, corpus_fingerprint(paths, text_field), tokenizer.fingerprint())
    final = root / "tokens" / key
    if (final / "meta.json").is_file():
        return _load(final)

    def build(building: Path) -> None:
        num_tokens, num_documents = _tokenize(paths, tokenizer, text_field, building / "tokens.bin", show_progress)
        write_json(building / "meta.json", {
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "fingerprint": key,
            "files": [str(p) for p in paths],
            "text_field": text_field,
            "version": CACHE_VERSION,
        })

    return _load(cached_directory(final, build))


def _tokenize(paths, tokenizer, text_field: str, out_path: Path, show_progress: bool) -> tuple[int, int]:
    """Stream the corpus through the tokenizer into ``out_path``; return (tokens, documents)."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    num_tokens = num_documents = 0
    progress = None
    if show_progress:
        from tqdm import tqdm

        progress = tqdm(desc="tokenizing", unit="doc")
    try:
        with open(out_path, "ab") as out:
            for batch in _batches(iter_text_chunks(paths, text_field)):
                encoded = tokenizer.encode_batch([text for text, _ in batch])
                parts = []
                for ids, (_, end) in zip(encoded, batch):
                    parts.append(np.asarray(ids, dtype=dtype))
                    if end:
                        parts.append(eos)
                array = np.concatenate(parts)
                array.tofile(out)
                ended = sum(end for _, end in batch)
                num_tokens += len(array)
                num_documents += ended
                if progress is not None:
                    progress.update(ended)
                    progress.set_postfix(tokens=f"{num_tokens:,}", refresh=False)
    finally:
        if progress is not None:
            progress.close()
    return num_tokens, num_documents


def _batches(chunks: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    batch_chars = 0
    for chunk in chunks:
        batch.append(chunk)
        batch_chars += len(chunk[0])
        if batch_chars >= _BATCH_CHARS or len(batch) >= _BATCH_CHUNKS:
            yield batch
            batch, batch_chars = [], 0
    if batch:
        yield batch


def _load(directory: Path) -> TokenCache:
    meta_path = directory / "meta.json"
    tokens_path = directory / "tokens.bin"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        num_tokens = int(meta["num_tokens"])
        num_documents = int(meta["num_documents"])
        key = meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OrchardError(f"{meta_path}: corrupt token cache ({e}); delete {directory} to rebuild it") from None
    if not tokens_path.is_file() or tokens_path.stat().st_size != num_tokens * dtype.itemsize:
        raise OrchardError(f"{tokens_path}: token cache has the wrong size; delete {directory} to rebuild it")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(num_tokens,))
    return TokenCache(directory=directory, tokens=tokens, num_documents=num_documents, fingerprint=key)
