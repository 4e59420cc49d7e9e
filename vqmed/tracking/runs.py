"""MLflow run lifecycle and artifacts: the only place outside ``mlflow_utils`` that calls ``mlflow.*``.

The rooms above (training, export, downstream) start, tag and finish their runs through these thin
helpers instead of importing MLflow themselves, so the tracking backend, its quirks (e.g. the fluent
API starting an unnamed run when nothing is active) and its version live in one room.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

from vqmed.tracking.mlflow_utils import _require_active_run

__all__ = [
    "download_artifact",
    "end_run",
    "log_artifact",
    "log_dict",
    "log_torch_model",
    "set_tags",
    "start_run",
]


def start_run(run_name: str | None = None, run_id: str | None = None, nested: bool = False) -> Any:
    """Start (or, with ``run_id``, resume) a run of the experiment chosen by ``setup_mlflow``.

    Returns MLflow's ``ActiveRun``: use it as a context manager (``with start_run(...) as run``) or end
    it with :func:`end_run`; ``run.info.run_id`` is the run's id.
    """
    return mlflow.start_run(run_name=run_name, run_id=run_id, nested=nested)


def end_run() -> None:
    """End the active run (a no-op when none is active)."""
    mlflow.end_run()


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags of the active run (values become strings)."""
    _require_active_run("set_tags")
    mlflow.set_tags({str(k): str(v) for k, v in tags.items()})


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a local file into the active run's artifacts (under ``artifact_path`` when given)."""
    _require_active_run("log_artifact")
    mlflow.log_artifact(str(local_path), artifact_path=artifact_path)


def log_dict(obj: Mapping[str, Any] | list[Any], artifact_file: str) -> None:
    """Write a JSON/YAML-serialisable object as an artifact file of the active run."""
    _require_active_run("log_dict")
    mlflow.log_dict(obj, artifact_file)


def log_torch_model(model: Any, name: str, **kwargs: Any) -> None:
    """Log a torch module as an MLflow model of the active run (``mlflow.pytorch.log_model``)."""
    _require_active_run("log_torch_model")
    import mlflow.pytorch  # imports torch: only when a model is actually logged

    mlflow.pytorch.log_model(model, name=name, **kwargs)


def download_artifact(run_id: str, artifact_path: str) -> Path:
    """Download one artifact of a run to a local temporary folder and return its path."""
    return Path(mlflow.artifacts.download_artifacts(run_id=str(run_id), artifact_path=artifact_path))
