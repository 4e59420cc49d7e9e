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
from vqmed.tracking.resilience import forget_active_run, guarded, keep_for_later, tracking_degraded

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
    return _ActiveRun(mlflow.start_run(run_name=run_name, run_id=run_id, nested=nested))


class _ActiveRun(mlflow.ActiveRun):
    """MLflow's ``ActiveRun`` whose ``with`` block ends through :func:`end_run` (survives a dead server)."""

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.info.run_id:
            end_run("FINISHED" if exc_type is None else "FAILED")
        return exc_type is None


def end_run(status: str = "FINISHED") -> None:
    """End the active run (a no-op when none is active). With the tracking server down, the run ends
    locally and its end is kept with the backlog (:mod:`vqmed.tracking.resilience`)."""
    if mlflow.active_run() is None:
        return
    if tracking_degraded() or guarded("end_run", lambda: mlflow.end_run(status) or True) is None:
        forget_active_run(status)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags of the active run (values become strings)."""
    _require_active_run("set_tags")
    values = {str(k): str(v) for k, v in tags.items()}
    guarded("set_tags", lambda: mlflow.set_tags(values), {"kind": "tags", "values": values})


def log_artifact(local_path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a local file into the active run's artifacts (under ``artifact_path`` when given)."""
    _require_active_run("log_artifact")
    guarded("log_artifact", lambda: mlflow.log_artifact(str(local_path), artifact_path=artifact_path),
            {"kind": "artifact", "file": str(local_path), "artifact_path": artifact_path})


def log_dict(obj: Mapping[str, Any] | list[Any], artifact_file: str) -> None:
    """Write a JSON/YAML-serialisable object as an artifact file of the active run."""
    _require_active_run("log_dict")
    import json
    import tempfile

    def keep() -> dict[str, Any]:  # only when the server is down: the dict as a file for later
        folder = Path(tempfile.mkdtemp(prefix="vqmed-dict-"))
        local = folder / Path(artifact_file).name
        local.write_text(json.dumps(obj, indent=1, default=str))
        parent = str(Path(artifact_file).parent)
        return {"kind": "artifact", "file": str(local), "artifact_path": None if parent in ("", ".") else parent}

    if guarded("log_dict", lambda: mlflow.log_dict(obj, artifact_file) or True) is None:
        keep_for_later(keep())


def log_torch_model(model: Any, name: str, **kwargs: Any) -> None:
    """Log a torch module as an MLflow model of the active run (``mlflow.pytorch.log_model``)."""
    _require_active_run("log_torch_model")
    import mlflow.pytorch  # imports torch: only when a model is actually logged

    # Not kept when the server is down (the checkpoint it is made from is on disk).
    guarded("log_model", lambda: mlflow.pytorch.log_model(model, name=name, **kwargs))


def download_artifact(run_id: str, artifact_path: str) -> Path:
    """Download one artifact of a run to a local temporary folder and return its path."""
    return Path(mlflow.artifacts.download_artifacts(run_id=str(run_id), artifact_path=artifact_path))
