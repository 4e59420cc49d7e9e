"""Atomic, safely-loadable checkpoints.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(..., weights_only=True)``: a file carrying a pickled object that would run code is
refused. Files are written with :func:`vqmed.atomic.atomic_write` (temporary name in the same directory, fsync,
rename), so a crash at any moment leaves either the previous good checkpoint or the new one, never a torn
file. The previous checkpoint is kept as ``last.prev.pt``; a truncated ``last.pt`` is detected on load and
the previous one is used instead.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqmed.atomic import atomic_write

FORMAT = "vqmed-checkpoint-v1"
LAST = "last.pt"
PREVIOUS = "last.prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, unsafe or not a vqmed checkpoint."""


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`vqmed.atomic.atomic_write`).

    Raises:
        CheckpointError: the file cannot be written (disk full, no permission, ...), naming the path;
            ``path`` itself is then untouched and no temporary file is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda handle: torch.save(obj, handle))
    except OSError as exc:
        # Disk full (ENOSPC) and the like: say which file, so the CLI prints one clear line.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointError(f"{path}: cannot write checkpoint ({reason})") from exc


def save_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Write ``state`` as ``directory/last.pt``, keeping the previous good one as ``last.prev.pt``."""
    directory = Path(directory)
    target = directory / LAST
    state = {"format": FORMAT, **state}
    if target.exists():
        if zipfile.is_zipfile(target):
            # Keep the last good checkpoint until the new one is safely on disk.
            os.replace(target, directory / PREVIOUS)
        else:
            # A torn last.pt (the run resumed from last.prev.pt because of it) must not replace the
            # good previous one: if this write failed too, no loadable checkpoint would be left.
            target.unlink()
    atomic_save(state, target)
    return target


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file safely (``weights_only=True``), with a clear error when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, unpickling refused, ...
        raise CheckpointError(f"{path}: cannot load checkpoint safely ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vqmed checkpoint (missing format tag {FORMAT!r})")
    return state


def latest_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint in ``directory``: ``last.pt``, else ``last.prev.pt`` if the former is bad.

    Returns ``None`` when the directory holds no checkpoint at all; raises :class:`CheckpointError` when
    checkpoints exist but none loads.
    """
    directory = Path(directory)
    candidates = [directory / LAST, directory / PREVIOUS]
    errors = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            return load_checkpoint(candidate, map_location), candidate
        except CheckpointError as exc:
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))
    return None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors/lists (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python_version": py_version,
        "python": list(py_internal),
        "python_gauss": [py_gauss is not None, 0.0 if py_gauss is None else float(py_gauss)],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    has_py_gauss, py_gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]), py_gauss if has_py_gauss else None))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
