"""Model I/O room (floor 2): what training, export and the models trained on the store share.

Owns the checkpoint format (``weights_only``-safe, written atomically, the previous one kept), ``load_model``
(checkpoint file / run directory / MLflow run id -> model in eval mode), the model id (``model_fingerprint``)
and the process placement of one-process and torchrun runs (``runtime``). Imports networks and floor 0 only.
"""

from vqmed.models_io.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from vqmed.models_io.loading import load_model, model_fingerprint, resolve_checkpoint

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_fingerprint",
    "resolve_checkpoint",
    "save_checkpoint",
]
