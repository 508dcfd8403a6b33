"""Atomic, durable writes: build into a temporary path next to the target, fsync, then ``os.replace``."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_file(path: str | Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (so a rename into it survives a crash); a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and directory below ``root``."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on normal exit fsync it and rename it to ``path`` (replacing
    an existing one), on an exception delete it. ``path`` is therefore always absent, old or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write one file to; on normal exit fsync it and rename it to
    ``path`` (replacing an existing file), on an exception delete it. Readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_into_place(tmp: str | Path, path: str | Path) -> None:
    """The last step of every atomic file write: fsync the finished file ``tmp``, rename it to ``path`` (same
    file system; replaces an existing file) and fsync the directory so that the rename survives a crash."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (:func:`atomic_file`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def is_leftover(name: str) -> bool:
    """True for the names :func:`atomic_directory` gives its temporary and superseded directories."""
    return ".tmp-" in name or ".old-" in name


def remove_leftovers(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete what interrupted :func:`atomic_directory` writes left directly in ``directory`` (``NAME.tmp-*``,
    ``NAME.old-*``; only those of ``name`` when given); returns what was removed."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            if is_leftover(p.name) and (name is None or p.name.startswith((f"{name}.tmp-", f"{name}.old-"))):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed
