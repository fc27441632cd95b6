"""A run directory (`out=`): claimed, checked and locked before any long work starts.

Every training command opens its `out` with `open_run` first, before it trains a tokenizer or
tokenizes a corpus, so that a mistake costs a second, not an hour:

- `out` must be creatable and writable, and must not be a file;
- an existing `out` must be orchard's own run directory (it holds `run.json`, or, from orchard
  versions before `run.json`, checkpoints with a lineage record): a folder of the user's is never
  written into;
- `run.json` records the command and its recipe; a second invocation must be the same run (only
  limits and bookkeeping, `RESUMABLE_CHANGES`, may differ), else one line names the first key that
  differs;
- one process at a time: `.lock` is held with `flock` for as long as the run is open (the kernel
  releases it when the process dies, even by kill -9), and a second process stops at once with the
  holder's pid;
- temporaries that a killed process left behind (`.step-000100.tmp-PID`, ...) are removed.

Under `torchrun` rank 0 does all of this; the other ranks write nothing into `out` but what the
engine tells them to.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from ..config import to_dict
from ..errors import OrchardError
from ..files import check_writable, read_json, remove_stale_temporaries, write_json

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
SETUP_ENTRIES = {RUN_FILE, "tokenizer"}
"""What a run writes before it trains; a failure with nothing more there removes the run directory."""

RESUMABLE_CHANGES = {"out", "train.max_steps", "train.max_tokens", "train.max_time", "train.eval_every",
                     "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.log_every",
                     "train.progress", "train.device", "train.compile", "train.activation_checkpointing",
                     "train.activation_checkpointing_every", "train.parallel", "train.batch_size",
                     "train.grad_accum", "train.global_batch", "train.report_to"}
"""Recipe keys that may differ when a run directory is resumed."""

_open: dict[Path, list] = {}
"""Run directories this process holds: resolved path -> [lock file descriptor, nesting depth]."""


def first_difference(old, new, ignore: set[str] = RESUMABLE_CHANGES,
                     prefix: str = "") -> tuple[str, object, object] | None:
    """The first dotted key whose value differs between two recipes, as (key, old, new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        # A key the old record lacks was added by a later orchard version: nothing to compare.
        for key in sorted(set(old) & set(new)):
            dotted = f"{prefix}.{key}" if prefix else key
            if dotted in ignore:
                continue
            found = first_difference(old.get(key), new.get(key), ignore, dotted)
            if found:
                return found
        return None
    return None if old == new else (prefix, old, new)


def recipe_change(old, new) -> str | None:
    """How a run directory whose recipe is `old` differs from the recipe `new` it is asked to run
    ("holds a run with KEY=OLD, not NEW"), or None when it is the same run."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    changed = first_difference(old, new)
    if changed is None:
        return None
    key, before, after = changed
    return f"holds a run with {key}={before!r}, not {after!r}"


def _is_orchard_entry(name: str) -> bool:
    return name == LOCK_FILE or (name.startswith(".") and (".tmp-" in name or ".old-" in name))


def _is_legacy_run(out: Path) -> bool:
    """A run directory written before run.json existed: its checkpoints carry lineage records."""
    candidates = [out / "final", *sorted(out.glob("step-*"))]
    return any((path / "orchard.json").is_file() and ((path / "config.json").is_file() or
                                                      (path / "adapters.json").is_file()) for path in candidates)


def _check_claimable(out: Path) -> None:
    if out.is_symlink() and not out.is_dir():
        raise OrchardError(f"out: {out} is a broken symbolic link")
    if out.exists() and not out.is_dir():
        raise OrchardError(f"out: {out} is a file, not a run directory; choose another out=")
    if not out.is_dir():
        check_writable(out, "out")
        return
    if (out / RUN_FILE).is_file() or _is_legacy_run(out):
        check_writable(out / RUN_FILE, "out")
        return
    foreign = [entry.name for entry in out.iterdir() if not _is_orchard_entry(entry.name)]
    if foreign:
        raise OrchardError(f"out: {out} already holds files that orchard did not write (e.g. {sorted(foreign)[0]}); "
                           f"choose another out=")
    check_writable(out / RUN_FILE, "out")


def _lock(out: Path) -> int:
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OrchardError(f"out: {out} is in use by another orchard process (pid {holder}); wait for it to finish "
                           f"or choose another out=") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _has_checkpoints(out: Path) -> bool:
    return (out / "final").is_dir() or any(out.glob("step-*"))


def _check_run_file(out: Path, stage: str, recipe: dict | None) -> None:
    """Write run.json for a new run; for an existing one, refuse another command or recipe once the
    run has checkpoints to lose (before that, a corrected command simply starts the run afresh)."""
    run_file = out / RUN_FILE
    fresh = {"stage": stage, "recipe": recipe}
    if not run_file.is_file():
        if not _is_legacy_run(out):
            write_json(run_file, fresh)
        return
    saved = read_json(run_file)
    if saved.get("stage") != stage:
        problem = f"holds a `{saved.get('stage')}` run, not `{stage}`"
    else:
        problem = recipe_change(saved.get("recipe"), recipe)
    if problem is None:
        return
    if _has_checkpoints(out):
        raise OrchardError(f"out: {out} {problem}; use another out= for a new run")
    write_json(run_file, fresh)


def record_in_run_file(out: Path, **entries) -> None:
    """Add facts about the run (a tokenizer's fingerprint, say) to its run.json."""
    run_file = Path(out) / RUN_FILE
    if run_file.is_file():
        write_json(run_file, {**read_json(run_file), **entries})


def read_run_file(out: Path) -> dict:
    run_file = Path(out) / RUN_FILE
    return read_json(run_file) if run_file.is_file() else {}


@contextmanager
def open_run(out: str | Path, stage: str, recipe: dict | None = None) -> Iterator[Path]:
    """Claim `out` for the command `stage` with `recipe` for the duration of the block (see the
    module's docstring); opening a directory this process already holds nests."""
    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        yield out
        return
    key = out.resolve()
    if key in _open:
        _open[key][1] += 1
        try:
            yield out
        finally:
            _open[key][1] -= 1
        return
    _check_claimable(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = _lock(out)
    _open[key] = [fd, 1]
    try:
        _check_run_file(out, stage, recipe)
        for directory in [out, *(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())]:
            remove_stale_temporaries(directory)
        yield out
    except BaseException:
        if created and all(_is_orchard_entry(entry.name) or entry.name in SETUP_ENTRIES for entry in out.iterdir()):
            # This command made the directory and failed before training began (bad data, say):
            # what it set up there (run.json, a tokenizer) must not look like a run later.
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        del _open[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


Config = TypeVar("Config")
Result = TypeVar("Result")


def in_run_directory(stage: str) -> Callable[[Callable[[Config], Result]], Callable[[Config], Result]]:
    """Make a method's `run(config)` run inside its run directory: `open_run(config.out, stage,
    the recipe)` before anything else, closed (and unlocked) when it returns or fails."""

    def decorate(run: Callable[[Config], Result]) -> Callable[[Config], Result]:
        @functools.wraps(run)
        def run_in_directory(config: Config) -> Result:
            with open_run(config.out, stage, to_dict(config)):
                return run(config)
        return run_in_directory

    return decorate
