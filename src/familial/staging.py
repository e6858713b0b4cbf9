"""Writing a directory all at once: stage it beside the target, then rename it into place.

A writer killed at any moment leaves either no target or a complete one, plus at most a
hidden staging directory named after its target and its process id:

    OUT/../.OUT.tmp-<pid>-<random>     the output being written
    OUT/../.OUT.old-<pid>-<random>     the previous OUT, moved aside by an overwrite

(single files, such as family.json updated in place, are staged the same way).

The next writer of the same target removes those of writers that are no longer running (or
puts a moved-aside OUT back if the kill fell between the two renames of an overwrite).
Everything is created with the process's umask, as `open` and `mkdir` do, so a checkpoint
written for a serving group stays readable by it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written: a file where a directory is needed, or the like."""


def file_mode() -> int:
    """The mode `open` gives a new file under the current umask (0o644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _check_parents(target: Path) -> None:
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{target}: cannot be created, because {parent} is a file, "
                                      f"not a directory")
            return


def check_output_directory(target: Path, overwrite: bool) -> None:
    """Refuse, in one line, a target that is a file, lies under a file, or is not empty."""
    _check_parents(target)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target}: is a file, not a directory (choose another output path)")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise OutputPathError(f"{target}: already exists and is not empty (choose another output "
                              f"directory, or pass overwrite)")


def check_output_file(target: Path) -> None:
    """Refuse, in one line, a file path that is a directory or lies under a file."""
    _check_parents(target)
    if target.is_dir():
        raise OutputPathError(f"{target}: is a directory, expected a file path")


def _leftover(path: Path, target: Path) -> tuple[str, int | None] | None:
    """('tmp' | 'old', writer pid or None) if `path` is a staging directory of `target`."""
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-"
        if path.name.startswith(prefix):
            pid = path.name[len(prefix):].split("-", 1)[0]
            return kind, int(pid) if pid.isdigit() else None
    return None


def _running(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale(target: Path) -> None:
    """Delete staging directories of `target` left by writers that died (never a live one's)."""
    if not target.parent.is_dir():
        return
    found = [(path, _leftover(path, target)) for path in target.parent.iterdir()]
    for path, leftover in sorted((p for p in found if p[1]), key=lambda p: p[1][0] != "old"):
        kind, pid = leftover
        if _running(pid):
            continue
        if kind == "old" and not target.exists():
            os.replace(path, target)  # killed between an overwrite's two renames: undo the first
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that becomes `target` only if the block succeeds."""
    target = Path(target)
    check_output_directory(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    check_output_directory(target, overwrite)  # a moved-aside target may just have come back
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = target.with_name(f".{target.name}.tmp-{tag}")
    staging.mkdir()
    try:
        yield staging
        # Contents reach the disk before the rename that publishes them, deepest first.
        for path in sorted(staging.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            _fsync(path)
        _fsync(staging)
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{tag}")
            os.replace(target, trash)
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_text_atomically(target: str | Path, text: str) -> Path:
    """Replace one file in a single rename (a reader sees the old text or the new, never half)."""
    return write_bytes_atomically(target, text.encode("utf-8"))


def write_bytes_atomically(target: str | Path, data: bytes) -> Path:
    """Replace one file in a single rename (a reader sees the old bytes or the new, never half)."""
    target = Path(target)
    remove_stale(target)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
        _fsync(target.parent)
    finally:
        staging.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def atomic_file(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging path beside `target` (a file written in pieces) that becomes `target`
    in one rename only if the block succeeds."""
    target = Path(target)
    check_output_file(target)
    if target.exists() and not overwrite:
        raise OutputPathError(f"{target}: already exists (choose another output file, or pass overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield staging
        _fsync(staging)
        os.replace(staging, target)
        _fsync(target.parent)
    finally:
        staging.unlink(missing_ok=True)
