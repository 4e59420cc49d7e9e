"""tqdm progress bars that stay quiet in CI (env ``CI`` set) or when asked to."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(enable: bool = True) -> bool:
    """True unless ``enable`` is False or the ``CI`` environment variable is set (non-empty)."""
    return bool(enable) and not os.environ.get("CI")


def progress_bar(iterable: Iterable, total: int | None = None, desc: str = "", enable: bool = True) -> Any:
    """Wrap ``iterable`` in a tqdm bar (a no-op pass-through when disabled)."""
    return tqdm(iterable, total=total, desc=desc, disable=not progress_enabled(enable), leave=False, dynamic_ncols=True)
