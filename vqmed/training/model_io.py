"""Rebuild a trained model from a checkpoint file, a run directory or an MLflow run id."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqmed.networks import build_model
from vqmed.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

FINAL_ARTIFACT = "checkpoints/final.pt"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_checkpoint(ref: str | Path) -> Path:
    """Turn a model reference into a local checkpoint file.

    Args:
        ref: a checkpoint file (``.pt``), a pretraining output directory (its ``final.pt`` or
            ``checkpoints/last.pt``), or an MLflow run id (its ``checkpoints/final.pt`` artifact).
    """
    path = Path(ref)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "final.pt", path / "checkpoints" / "final.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: directory holds no final.pt or checkpoints/last.pt")
    if _RUN_ID.match(str(ref)):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=str(ref), artifact_path=FINAL_ARTIFACT))
        except Exception as exc:
            raise CheckpointError(f"MLflow run {ref}: cannot fetch {FINAL_ARTIFACT} ({exc})") from exc
    raise CheckpointError(f"{ref}: not a checkpoint file, a run directory or an MLflow run id")


def load_model(ref: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a pretrained model in eval mode plus its metadata.

    Returns:
        ``(model, meta)`` where ``meta`` has ``model_name``, ``model_config``, ``checkpoint`` (path),
        ``mlflow_run_id`` (if the run was tracked), ``step`` and ``config`` (the resolved pretraining config).
    """
    path = resolve_checkpoint(ref)
    if path.name == "last.pt":
        found = latest_checkpoint(path.parent, map_location)
        assert found is not None
        state, path = found
    else:
        state = load_checkpoint(path, map_location)
    model = build_model(state["model_name"], **state["model_config"])
    model.load_state_dict(state["model_state"])
    model.eval()
    meta = {
        "model_name": state["model_name"],
        "model_config": state["model_config"],
        "checkpoint": str(path),
        "mlflow_run_id": state.get("mlflow_run_id"),
        "step": state.get("step"),
        "config": state.get("config", {}),
    }
    return model, meta
