"""The offline teacher cache: the teacher's top-k log-probabilities of every window, stored once
beside the tokenized corpus and reused by later students without loading the teacher."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.packing import PackedSequences
from ...errors import OrchardError
from ...files import cached_directory, fingerprint, read_json, write_json
from ...losses.distillation import SparseTeacher, top_k_teacher
from ...training.runtime import Runtime
from .config import CACHE_PREFIX
from .models import Teacher


@dataclass
class TeacherCache:
    """The teacher's top-k (ids, log-probabilities) for every position of every window of a split,
    memory-mapped: `ids[split]` and `log_probs[split]` are (windows, seq_len, k)."""

    directory: Path
    ids: dict[str, np.ndarray]
    log_probs: dict[str, np.ndarray]
    meta: dict

    def teacher(self, split: str, windows) -> SparseTeacher:
        index = np.asarray(list(windows))
        return SparseTeacher(ids=torch.from_numpy(self.ids[split][index].astype(np.int64)),
                             log_probs=torch.from_numpy(self.log_probs[split][index].astype(np.float32)))


def cache_directory(token_cache_dir: Path, teacher_sha: str, k: int, seq_len: int, windows: dict[str, int],
                    precision: str) -> Path:
    """Beside the tokenized corpus, named by what its content depends on."""
    return token_cache_dir / f"{CACHE_PREFIX}{fingerprint(teacher_sha, k, seq_len, windows, precision)}"


def open_teacher_cache(directory: Path) -> TeacherCache | None:
    """The cache in `directory`, or None when there is none. One that cannot be read as what
    `build_teacher_cache` writes (plain .npy arrays, never pickled objects) is removed, to be built
    again: it is orchard's own, in orchard's cache."""
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = read_json(meta_file)
        ids = {split: np.load(directory / f"{split}.ids.npy", mmap_mode="r", allow_pickle=False)
               for split in meta["windows"]}
        log_probs = {split: np.load(directory / f"{split}.log_probs.npy", mmap_mode="r", allow_pickle=False)
                     for split in meta["windows"]}
    except (OrchardError, OSError, ValueError, KeyError, TypeError) as problem:
        print(f"{directory}: unreadable teacher cache ({problem}); building it again", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return TeacherCache(directory, ids, log_probs, meta)


@torch.no_grad()
def build_teacher_cache(directory: Path, teacher: Teacher, splits: dict[str, PackedSequences],
                        windows: dict[str, int], k: int, batch_size: int, runtime: Runtime) -> TeacherCache:
    """Run the teacher once over `windows[split]` windows of each split and store its top-k
    (`cached_directory`: a killed build is never mistaken for a cache)."""
    from tqdm import tqdm

    model = teacher.model.to(runtime.device).eval()
    id_dtype = np.uint16 if teacher.config.vocab_size <= 65535 else np.int32
    seq_len = next(iter(splits.values())).seq_len
    total = sum(windows.values())

    def build(tmp: Path) -> None:
        started, tokens = time.perf_counter(), 0
        bar = tqdm(total=total * seq_len, unit="tok", unit_scale=True, desc="teacher top-k cache", file=sys.stderr,
                   disable=not sys.stderr.isatty())
        for split, sequences in splits.items():
            count = windows[split]
            ids = np.lib.format.open_memmap(tmp / f"{split}.ids.npy", "w+", id_dtype, (count, seq_len, k))
            log_probs = np.lib.format.open_memmap(tmp / f"{split}.log_probs.npy", "w+", np.float16, (count, seq_len, k))
            for start in range(0, count, batch_size):
                batch = sequences.batch(range(start, min(start + batch_size, count)))
                with runtime.autocast():
                    logits = model(batch["input_ids"].to(runtime.device)).logits
                top = top_k_teacher(logits.float(), k)
                ids[start:start + len(top.ids)] = top.ids.cpu().numpy().astype(id_dtype)
                log_probs[start:start + len(top.ids)] = top.log_probs.cpu().numpy().astype(np.float16)
                tokens += batch["input_ids"].numel()
                bar.update(batch["input_ids"].numel())
            ids.flush()
            log_probs.flush()
        bar.close()
        seconds = time.perf_counter() - started
        stored = sum(f.stat().st_size for f in tmp.glob("*.npy"))
        write_json(tmp / "meta.json", {
            "teacher": str(teacher.path), "teacher_weights_sha256": teacher.weights_sha256,
            "k": k, "seq_len": seq_len, "windows": windows, "tokens": tokens, "precision": runtime.precision,
            "bytes": stored, "bytes_per_token": stored / max(tokens, 1),
            "build_seconds": round(seconds, 2), "build_flops": teacher.forward_flops_per_token() * tokens})

    cached_directory(directory, build)
    return open_teacher_cache(directory)
