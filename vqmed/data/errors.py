"""Exceptions of the data room; each names the file (or manifest row) and the reason."""

from __future__ import annotations

import os
from pathlib import Path


class DataRootError(FileNotFoundError):
    """The data root could not be found; the message lists every place that was tried."""


class ManifestError(ValueError):
    """A manifest file is malformed; the message names the file, the row and the column."""


class UnreadableImageError(Exception):
    """An image file cannot be turned into a model input.

    Args:
        path: the offending file (as given, relative or absolute).
        reason: one short human-readable line saying why (no patient identifiers).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        # One line only: reasons end up as CSV cells in quarantine files.
        self.reason = _without_path(" ".join(str(reason).split()), self.path)
        super().__init__(f"{self.path}: {self.reason}")


def _without_path(reason: str, path: str) -> str:
    """``reason`` with the file's path and name replaced by ``<file>``: library messages (PIL's "cannot
    identify image file '/x/Doe_John/1.png'") would carry folder and file names, which may identify a patient."""
    if not path:
        return reason
    names = {path, os.path.abspath(path), os.path.realpath(path), os.path.basename(path)}
    for name in sorted((n for n in names if len(n) >= 4), key=len, reverse=True):
        reason = reason.replace(name, "<file>")
    return reason
