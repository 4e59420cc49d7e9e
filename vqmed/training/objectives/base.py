"""What every pretraining objective is: a module that turns a batch of views into a loss and metrics."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Objective", "ObjectiveParams"]


@dataclasses.dataclass
class ObjectiveParams:
    """Base of every objective's parameters (the ``objective.params`` of a pretraining config)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter when a value is out of range."""


class Objective(nn.Module):
    """A pretraining objective: ``forward(model, views) -> (loss, metrics)``.

    An objective owns whatever it trains beside the model (projector heads, an EMA teacher, ...) as
    submodules, so the engine optimises, checkpoints and resumes them exactly like the model, and
    DistributedDataParallel syncs their gradients (the engine wraps model and objective together).
    It asks for ``views`` augmented views of every image (``augmentation`` names the chain, see
    :data:`vqmed.data.augment.AUGMENTATIONS`); the engine draws them for the whole batch on its device and
    hands them over as one tensor ``[B, views, C, *spatial]``.

    Args:
        model: the VQ model being pretrained (read for its shapes and stages; not stored twice).
        input_shape: ``(C, *spatial)`` of one view.
        params: the objective's validated parameters.
    """

    name: ClassVar[str]
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    views: int = 1

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], params: ObjectiveParams) -> None:
        super().__init__()
        self.params = params

    @classmethod
    def augmentation_of(cls, params: ObjectiveParams) -> str:
        """The augmentation chain these parameters ask for: known before the objective is built (a benchmark
        that times the data path has no model to build one with)."""
        return "mild"

    @property
    def augmentation(self) -> str:
        """The augmentation chain of this objective's views."""
        return self.augmentation_of(self.params)

    def forward(self, model: nn.Module, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` for a batch ``[B, views, C, *spatial]``; ``metrics`` are logged as
        ``train/NAME`` and include ``loss`` and ``recon_mse``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The parameters as a plain dict (stored in checkpoints, rebuilt with ``build_objective``)."""
        return dataclasses.asdict(self.params)
