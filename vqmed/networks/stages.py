"""Catching the outputs of a model's stages on the way through one forward pass, and pooling them on a grid."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["grid_mean_std", "grid_pool", "stage_outputs"]


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


def grid_pool(x: torch.Tensor, cells: int) -> torch.Tensor:
    """Mean of ``[B, D, *spatial]`` (2D or 3D) over a ``cells`` x ... x ``cells`` partition -> ``[B, D, cells, ...]``."""
    pool = nn.functional.adaptive_avg_pool3d if x.dim() == 5 else nn.functional.adaptive_avg_pool2d
    return pool(x, cells)


def grid_mean_std(x: torch.Tensor, cells: int, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell mean and standard deviation of ``[B, D, *spatial]`` on the :func:`grid_pool` partition, each
    flattened to ``[B, D * cells**n]``. The spread says how much a feature varies inside a cell (texture:
    a hazy opacity against the clear lung), which the mean alone averages away. ``eps`` is added to the
    variance before the square root: a loss that backpropagates through the spread needs it > 0 (the
    gradient of the root of a constant cell's zero variance is infinite)."""
    mean = grid_pool(x, cells)
    var = (grid_pool(x * x, cells) - mean * mean).clamp_min(0.0)
    return mean.flatten(1), (var + eps).sqrt().flatten(1)
