"""Atomic file writes, the one way every room writes a file that must never be seen half-written.

A file is written under a temporary name in the target's own directory (``.tmp-PID-RANDOM-NAME``, so
one rename on the same file system publishes it), flushed and fsynced, renamed over the target, and the
directory is fsynced so the rename itself survives a power cut. A crash at any moment leaves the old
file or the new one, plus at worst a ``.tmp-*`` file that :func:`remove_stale_temporaries` cleans up.
Floor 0: imports nothing from vqmed, so data, models_io, training and export can all use it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_PREFIX",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "commit_temporary",
    "fsync_dir",
    "remove_stale_temporaries",
    "temporary_path",
]

TMP_PREFIX = ".tmp-"


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename inside it is durable (a no-op where the OS refuses)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_temporary(tmp: Path, path: Path) -> None:
    """fsync the finished temporary file ``tmp``, rename it over ``path`` and fsync the directory.

    For writers that fill the temporary file themselves (a memory-mapped array, a library's own save).
    """
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(handle)`` on a temporary binary file beside ``path``, fsync it, rename it over ``path``.

    Raises:
        OSError: naming ``path`` when the write fails (disk full, no permission, ...); ``path`` is then
            untouched and no temporary file is left behind.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is not None:
            raise
        # A failed write() (disk full, ...) does not say which file; name the one being written.
        raise OSError(exc.errno, f"cannot write {path.name}: {exc.strerror or exc}", str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def remove_stale_temporaries(directory: Path, names: tuple[str, ...] | None = None, suffix: str = "") -> int:
    """Delete temporary files that a writer killed mid-write left in ``directory``; returns the count.

    Args:
        directory: where to look (not recursive).
        names: only the temporaries of these target file names; ``None`` = every temporary.
        suffix: only temporaries whose name ends with this (e.g. ``".npy"``).

    Call it only where no other process is writing into ``directory`` (rank 0 at the start of a run,
    or under the directory's lock).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for tmp in directory.glob(f"{TMP_PREFIX}*{suffix}"):
        if not tmp.is_file():
            continue
        if names is not None and not any(tmp.name.endswith(f"-{name}") for name in names):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
