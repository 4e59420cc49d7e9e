"""Argument checks shared by the networks; every error names the offending argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.layers.utils import get_act_layer, get_norm_layer


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_channels(name: str, value: Any) -> list[int]:
    """A non-empty sequence of positive integers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {value!r}")
    return [check_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value)]


def per_level(name: str, value: Any, levels: int, minimum: int, default: Sequence[int] | None = None) -> list[int]:
    """An int (same for every level), a sequence with one int per level, or ``None`` (``default``)."""
    if value is None and default is not None:
        return list(default)
    if isinstance(value, int) and not isinstance(value, bool):
        return [check_int(name, value, minimum)] * levels
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != levels:
            raise ValueError(f"{name} must have one entry per level ({levels}), got {value!r}")
        return [check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value)]
    raise ValueError(f"{name} must be an integer or a sequence of {levels} integers, got {value!r}")


def check_layer(name: str, value: Any, kind: str, spatial_dims: int = 2) -> None:
    """Check that a MONAI activation / normalization spec can be built."""
    if value is None:
        return
    try:
        if kind == "act":
            get_act_layer(value)
        else:
            get_norm_layer(value, spatial_dims=spatial_dims, channels=8)
    except Exception as exc:  # MONAI raises KeyError/TypeError/ValueError for bad specs
        raise ValueError(f"{name}: not a valid MONAI {kind} spec {value!r} ({exc})") from None


def check_downsample(name: str, value: Any, allowed: Sequence[int] = (4, 8, 16)) -> int:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return int(value)


def check_input(model: str, x: torch.Tensor, spatial_dims: int, in_channels: int, factor: int) -> None:
    """Clear error for an input the model cannot take (wrong rank, channels or size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: expected a tensor, got {type(x).__name__}")
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"{model}: expected input [B, C, {', '.join('HWD'[:spatial_dims])}] for spatial_dims={spatial_dims}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"{model}: expected {in_channels} input channel(s), got shape {tuple(x.shape)}")
    bad = [s for s in x.shape[2:] if s % factor]
    if bad:
        raise ValueError(
            f"{model}: spatial sizes {tuple(x.shape[2:])} must be divisible by the total downsampling {factor}"
        )


def latent_size(input_size: int | Sequence[int], spatial_dims: int, factor: int) -> tuple[int, ...]:
    sizes = [input_size] * spatial_dims if isinstance(input_size, int) else list(input_size)
    if len(sizes) != spatial_dims:
        raise ValueError(f"input_size must have {spatial_dims} entries, got {input_size!r}")
    for s in sizes:
        if check_int("input_size", s, 1) % factor:
            raise ValueError(f"input_size {tuple(sizes)} must be divisible by the downsampling factor {factor}")
    return tuple(s // factor for s in sizes)


def config_from_locals(values: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs as a plain, YAML/JSON-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(i) for i in v]
        if isinstance(v, dict):
            return {k: plain(i) for k, i in v.items()}
        return v

    return {k: plain(v) for k, v in values.items() if k not in ("self", "__class__")}
