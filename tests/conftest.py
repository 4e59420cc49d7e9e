"""Fixtures shared by every test folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch


@contextlib.contextmanager
def _pinned(salt: str) -> Iterator[None]:
    """A fixed id salt (tests never write the per-user salt file) and one torch thread (shared CPU)."""
    saved = os.environ.get("VQMED_ID_SALT"), torch.get_num_threads()
    os.environ["VQMED_ID_SALT"] = salt
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("VQMED_ID_SALT", None)
        else:
            os.environ["VQMED_ID_SALT"] = saved[0]
        torch.set_num_threads(saved[1])


@pytest.fixture(scope="session")
def pinned_salt_and_threads() -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """``with pinned_salt_and_threads(salt): ...`` pins the id salt and torch to one thread, then restores both."""
    return _pinned
