"""A text corpus as training and distillation read it: where it is, and how it is cut into windows.

`TextDataConfig` is the `data` section of `orchard pretrain` and `orchard distill`; `corpus_paths`
resolves it to files, writing the built-in synthetic world into orchard's cache when no path is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .records import resolve_paths
from .synthetic import write_corpus
from .tokens import default_cache_root


@dataclass
class TextDataConfig:
    path: str | list[str] | None = None
    """Corpus: a file, a glob or a list of them (.txt, .jsonl, .json, .parquet, optionally .gz).
    None means the built-in synthetic world."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json/.parquet records."""
    val_fraction: float = 0.1
    """The last this fraction of the token stream is validation."""
    seq_len: int = 256
    """Tokens per training sequence (the context length trained)."""
    synthetic_documents: int = 20000
    """Documents of the built-in world to generate when data.path is None."""
    synthetic_seed: int = 0
    """Seed of the built-in world's document stream."""

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive, got {self.seq_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.synthetic_documents <= 0:
            raise ValueError(f"data.synthetic_documents must be positive, got {self.synthetic_documents}")


def corpus_paths(data: TextDataConfig) -> list[Path]:
    """The corpus files; the built-in world is written once into the cache and reused."""
    if data.path is not None:
        return resolve_paths(data.path)
    target = default_cache_root() / "synthetic" / f"world-seed{data.synthetic_seed}-{data.synthetic_documents}.jsonl"
    if not target.is_file():
        write_corpus(target, data.synthetic_documents, seed=data.synthetic_seed)
    return [target]
