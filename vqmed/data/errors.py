"""Exceptions of the data room; each names the file (or manifest row) and the reason."""

from __future__ import annotations

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
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")
