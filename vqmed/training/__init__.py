"""Training room: the pretraining loop (single process or DDP via torchrun) and atomic checkpoints.

Owns ``pretrain`` (config -> trained model, checkpoints, MLflow run, ``summary.json``), the checkpoint
format (``weights_only``-safe, written atomically) and ``load_model`` (checkpoint / run dir / MLflow run id
-> model in eval mode).
"""

from vqmed.training.checkpoint import CheckpointError
from vqmed.training.model_io import load_model, resolve_checkpoint

__all__ = ["CheckpointError", "load_model", "resolve_checkpoint"]
