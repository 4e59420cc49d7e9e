"""Pretraining objectives: the registry the ``objective:`` config section names.

Owns what a pretraining step minimises. Each objective is one class (an ``nn.Module`` whose own
parameters, e.g. a projector, train and checkpoint with the model) plus its parameter dataclass;
a new objective is one entry in :data:`OBJECTIVES` and its tests.

- ``reconstruction``: the VQ-VAE loss on one mildly augmented view.
- ``vicreg``: the VQ-VAE loss on two views plus VICReg between their pooled encoder stages.
- ``masked``: the VQ-VAE loss of reconstructing the whole image from a patch-masked copy.
- ``teacher``: the VQ-VAE loss on two views plus BYOL against an EMA teacher's pooled encoder stages.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vqmed.config import ConfigError, from_dict
from vqmed.training.objectives.base import Objective, ObjectiveParams
from vqmed.training.objectives.masked import MaskedReconstruction
from vqmed.training.objectives.reconstruction import Reconstruction
from vqmed.training.objectives.teacher import MomentumTeacher
from vqmed.training.objectives.vicreg import VICReg

__all__ = ["OBJECTIVES", "Objective", "ObjectiveParams", "build_objective", "objective_params"]

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Reconstruction, VICReg, MaskedReconstruction, MomentumTeacher)}


def objective_params(name: str, params: dict[str, Any] | None) -> ObjectiveParams:
    """The validated parameters of objective ``name``.

    Raises:
        ConfigError: unknown objective, unknown parameter, wrong type or value out of range, naming
            ``objective.name`` / ``objective.params.KEY``.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: must be one of {sorted(OBJECTIVES)}, got {name!r}")
    parsed = from_dict(OBJECTIVES[name].Params, params or {}, "objective.params")
    try:
        parsed.validate()
    except ValueError as exc:
        raise ConfigError(f"objective.params.{exc}") from None
    return parsed


def build_objective(name: str, params: dict[str, Any] | None, model: nn.Module, input_shape: tuple[int, ...]) -> Objective:
    """Build objective ``name`` for ``model`` and inputs of shape ``(C, *spatial)``."""
    try:
        return OBJECTIVES[name](model, tuple(input_shape), objective_params(name, params))
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"objective {name!r}: {exc}") from None  # the objective's own errors do not repeat its name
