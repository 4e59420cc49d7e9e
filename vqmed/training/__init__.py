"""Training room (floor 3): the pretraining engine and the pretraining objectives.

Owns ``pretrain`` (config -> trained model, checkpoints, MLflow run, ``summary.json``): the engine
(``engine``: data loading, steps, DDP, AMP, checkpoints, resume, signals, tracking calls; ``control``:
seeding, schedule, signals, history) and the objectives it minimises (``objectives``: a registry by
name). The checkpoint format and ``load_model`` live one floor down, in :mod:`vqmed.models_io`.
"""

from vqmed.training.engine import DivergedError, pretrain
from vqmed.training.objectives import OBJECTIVES, build_objective

__all__ = ["OBJECTIVES", "DivergedError", "build_objective", "pretrain"]
