"""Run control of the pretraining engine: seeding, the learning-rate schedule, signals, metric history."""

from __future__ import annotations

import inspect
import math
import random
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vqmed.config import ConfigError, PretrainConfig
from vqmed.networks import MODELS

__all__ = ["History", "StopRequest", "leave_stop_signals_to_main", "lr_at", "model_arguments", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_arguments(cfg: PretrainConfig) -> dict[str, Any]:
    """The model's constructor arguments: the config's ``model.params`` plus what the data section fixes
    (dimensions, channels, and the image size for models that take ``img_size``)."""
    params = dict(cfg.model.params)
    fixed = {"spatial_dims": cfg.data.spatial_dims, "in_channels": cfg.data.channels, "out_channels": cfg.data.channels}
    if "img_size" in inspect.signature(MODELS[cfg.model.name].__init__).parameters:
        # a model with per-patch position embeddings (vit_vqvae) is built for the data's image size
        fixed["img_size"] = cfg.data.image_size
    for key, value in fixed.items():
        if key in params and params[key] != value:
            raise ConfigError(f"model.params.{key}={params[key]} contradicts the data section ({value}); remove it")
        params[key] = value
    return params


def lr_at(step: int, total_steps: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate."""
    peak, warmup = cfg.train.lr, cfg.train.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks once per step (checkpoint, then exit)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def leave_stop_signals_to_main(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGINT and SIGTERM, so the main process alone stops the run.

    A batch scheduler (or Ctrl-C in a terminal) signals the whole process group. Left to torch's worker
    handlers, a worker dies of that SIGTERM, and the main process fails with "DataLoader worker ... is killed
    by signal" before its own handler can checkpoint. Ignoring the signal here keeps the workers alive until
    the main process, after its checkpoint, shuts them down as at any epoch end. An orphaned worker still
    exits: torch's worker loop watches its parent.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class History:
    """Metric series kept in the checkpoint so curves survive interruptions: name -> [(step, value)]."""

    series: dict[str, list[list[float]]] = field(default_factory=dict)

    def add(self, name: str, step: int, value: float) -> None:
        self.series.setdefault(name, []).append([float(step), float(value)])

    def as_dict(self) -> dict[str, list[list[float]]]:
        return self.series
