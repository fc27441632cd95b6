"""Files on disk, written so that nothing is ever half-written or taken from someone else.

The ground floor every writer in orchard uses (it imports nothing of orchard but `errors`):

- `write_json`, `atomic_file`, `atomic_directory` and `cached_directory` (a cache named by its
  `fingerprint`) write into a temporary beside the target,
  named `.NAME.tmp-PID`, and rename it into place: a reader sees the old content or the new, never
  half of it. `remove_stale_temporaries` deletes such leftovers of processes that died (a run killed
  with kill -9 cleans up after itself the next time it runs).
- `check_output` is the one rule for every `--out` and `out=`: orchard writes into a path that does
  not exist, an empty directory, or its own earlier output for the same input; anything else is a
  one-line error unless the user passes `--force`. Nothing is ever written over an input.
- `read_json` and `copy_regular_file` read what a user was given: JSON only (never a pickle), and
  files inside the directory they were given (a symbolic link to `/etc/passwd` is not followed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import OrchardError
from .hub import snapshot_repo_id

# `.NAME.tmp-PID` and `.NAME.old-PID`: what the writers below leave behind when a process dies.
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")


def temporary_path(target: Path, kind: str = "tmp") -> Path:
    """Where a write of `target` goes until it is complete: beside it, so the rename is atomic."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temporaries(directory: Path, name: str | None = None) -> list[Path]:
    """Delete the temporaries in `directory` (of the target `name` only, when given) that a process
    which no longer runs left behind; returns what was removed. A live writer's are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        if name is not None and not (entry.name.startswith(f".{name}.tmp-") or entry.name.startswith(f".{name}.old-")):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_file(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` to make a file at a temporary path, then rename it to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically (a temporary file renamed into place), creating the folder."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_file(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fresh_temporary_directory(target: Path) -> Path:
    """An empty `.NAME.tmp-PID` directory beside `target`, after removing dead writers' leftovers."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = temporary_path(target)
    _remove(tmp)
    tmp.mkdir()
    return tmp


def atomic_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` into a fresh temporary directory, then move it to `target` in one rename.

    Whatever is at `target` is replaced: callers decide first, with `check_output`, that it may be."""
    target = Path(target)
    tmp = _fresh_temporary_directory(target)
    try:
        write(tmp)
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync(child)
        if target.exists() or target.is_symlink():
            # Two renames: a crash between them leaves the old copy under `.old-PID`, which nothing
            # takes for a checkpoint and the next writer of `target` removes.
            old = temporary_path(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def cached_directory(target: Path, build: Callable[[Path], None]) -> Path:
    """A cache directory: `build(tmp)` into a temporary beside `target`, then renamed into place, so
    a killed build is never taken for a cache (its temporary is removed by the next builder). When
    another process finished the same cache first, theirs is kept: a cache's name is the fingerprint
    of what its content depends on, so both hold the same."""
    target = Path(target)
    tmp = _fresh_temporary_directory(target)
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        _remove(tmp)
    return target


def fingerprint(*parts: Any) -> str:
    """A short name for what a cache's content depends on: 16 hex digits of the SHA-256 of `parts`
    (JSON data) written as JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, missing: str = "no such file") -> dict:
    """A JSON object from a file; a missing, unreadable or non-object file is a one-line error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrchardError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise OrchardError(f"{path}: is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OrchardError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise OrchardError(f"{path}: expected a JSON object")
    return data


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a log such as metrics.jsonl, one per line; a line that is not one (cut
    short when a process was killed mid-write) is skipped."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


# --- what may be read -----------------------------------------------------------------------


def contained_file(directory: Path, name: str) -> Path:
    """`directory / name`, refused when a link leads it out of `directory` (or, for a Hugging Face
    cache snapshot, out of its repository's folder, where the snapshot's links point): a checkpoint
    whose chat_template.jinja links to ~/.ssh/id_rsa must not carry that file into what orchard writes."""
    path = Path(directory) / name
    root = Path(directory).resolve()
    if snapshot_repo_id(root):
        root = root.parent.parent
    if not path.resolve().is_relative_to(root):
        raise OrchardError(f"{path}: a symbolic link to a file outside {directory}; orchard does not follow it")
    return path


def copy_regular_file(source_dir: Path, name: str, target_dir: Path) -> None:
    """Copy `source_dir/name` into `target_dir` as a plain file, never through a link that leaves
    the source directory (which could carry any file of this machine into the copy)."""
    source = contained_file(source_dir, name)
    shutil.copyfile(source, Path(target_dir) / name)


# --- what may be written --------------------------------------------------------------------


def _holds(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or inner.is_relative_to(outer)


def check_writable(path: Path, key: str) -> None:
    """Fail now, with a line naming `key`, if `path` cannot be created: a file in the way of one of
    its folders, or a folder orchard may not write into."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(path, "tmp")
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise OrchardError(f"{key}: cannot create {path}: a file is in the way of its folder") from None
    except OSError as error:
        raise OrchardError(f"{key}: cannot write to {parent} ({error.strerror or error})") from None


def _owned(owned: Callable[[Path], bool], target: Path) -> bool:
    try:
        return owned(target)
    except (OrchardError, OSError, ValueError):
        return False  # unreadable: not recognisably orchard's


def check_output(target: Path, key: str, command: str, owned: Callable[[Path], bool],
                 inputs: tuple[Path, ...] = (), force: bool = False) -> None:
    """Refuse to write `target` unless that destroys nothing: it does not exist, is an empty
    directory, or `owned(target)` says it is this command's own earlier output for the same input.
    `force` allows replacing anything else, but never a path that holds one of the `inputs`.
    `key` names the option in the error (`--out`, `out`)."""
    target = Path(target)
    for source in inputs:
        if _holds(target, Path(source)):
            raise OrchardError(f"{key}: {target} holds {source}, which `orchard {command}` reads; "
                               f"choose another path")
    if target.is_symlink() and not force:
        raise OrchardError(f"{key}: {target} is a symbolic link; choose another path (or --force to replace the link)")
    if target.is_dir() and not target.is_symlink():
        if not any(target.iterdir()) or force or _owned(owned, target):
            check_writable(target / ".probe", key)
            return
    elif target.exists() or target.is_symlink():
        if force or (target.is_file() and _owned(owned, target)):
            check_writable(target, key)
            return
    else:
        check_writable(target, key)
        return
    kind = "directory" if target.is_dir() else "file"
    raise OrchardError(f"{key}: {target} is an existing {kind} that `orchard {command}` did not write from this "
                       f"input; choose another path, or pass --force to replace it")


def disk_error(error: OSError) -> str:
    """An OSError (disk full, permission denied, ...) as the one line the CLI prints."""
    reason = error.strerror or errno.errorcode.get(error.errno or 0, "") or str(error)
    where = error.filename or ""
    if error.filename2:
        where = f"{where} -> {error.filename2}"
    return f"{where}: {reason}" if where else reason
