"""Rebuild a trained model from a checkpoint file, a run directory or an MLflow run id; the model id."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqmed.networks import build_model
from vqmed.models_io.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

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
        from vqmed.tracking import download_artifact

        try:
            return download_artifact(str(ref), FINAL_ARTIFACT)
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


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_fingerprint(model: nn.Module, model_name: str, model_config: dict[str, Any]) -> str:
    """Model id: SHA-256 (first 16 hex digits) of the architecture and every weight and buffer.

    Two checkpoints with identical weights share an id wherever they live; any changed weight or
    codebook entry gives a new id, so a store never mixes codes of two models, and DDP ranks that
    ended with the same id hold bit-identical models.
    """
    h = hashlib.sha256()
    h.update(model_name.encode())
    h.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()[:16]
