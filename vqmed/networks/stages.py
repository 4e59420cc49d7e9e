"""Catching the outputs of a model's stages on the way through one forward pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["stage_outputs"]


@contextmanager
def stage_outputs(
    modules: Sequence[nn.Module], transform: Callable[[torch.Tensor], Any] | None = None
) -> Iterator[list[Any]]:
    """Collect what ``modules`` output (in call order) during the ``with`` block, through forward hooks.

    Args:
        modules: e.g. ``model.feature_stages()``.
        transform: applied to each output as it is caught (e.g. pooling, so the full activation maps need not
            be kept); ``None`` keeps the outputs themselves, gradients included.

    Yields:
        the list the outputs are appended to. The hooks are removed when the block ends, also on an error.
    """
    caught: list[Any] = []
    keep = transform or (lambda out: out)
    hooks = [m.register_forward_hook(lambda _m, _i, out: caught.append(keep(out))) for m in modules]
    try:
        yield caught
    finally:
        for hook in hooks:
            hook.remove()
