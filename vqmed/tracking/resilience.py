"""A tracking server that dies mid-run: the run goes on, and what could not be sent is kept and sent later.

Every logging helper of this room calls MLflow through :func:`guarded`. When a call fails and the server
(an ``http(s)://`` tracking URI) no longer answers its health check, tracking degrades for the rest of
the run: one warning on stderr, and every metric, param, tag and artifact that could not be sent is
appended to a local backlog (``<backlog dir>/backlog.jsonl`` plus copies of the artifact files). While
degraded, the server is probed again at most every ``PROBE_EVERY_S`` seconds; once it answers, the
backlog is sent (``MlflowClient.log_batch`` / ``log_artifact``, in the order it was logged) and logging
goes on as normal. :func:`flush_backlog` at the start of a run (``--resume``) and at its end sends what
is left; what still cannot be sent stays on disk, and the run ends with a warning, not an error.
Local stores (sqlite, file) are never degraded: their errors are real errors.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow

__all__ = ["BACKLOG_FILE", "apply_http_defaults", "backlog_size", "flush_backlog", "forget_active_run", "guarded", "keep_for_later",
           "set_backlog_dir", "tracking_degraded"]

BACKLOG_FILE = "backlog.jsonl"
PROBE_EVERY_S = 10.0
# A dead server must cost seconds per call, not MLflow's default of minutes of retries (7 retries, backoff 2).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

_STATE: dict[str, Any] = {"dir": None, "down": False, "warned": False, "last_probe": 0.0}


def set_backlog_dir(path: str | Path | None) -> None:
    """Where this process keeps what it cannot send (e.g. ``OUT/tracking_backlog``); resets the degraded state."""
    _STATE.update(dir=None if path is None else Path(path), down=False, warned=False, last_probe=0.0)


def apply_http_defaults() -> None:
    """MLflow's HTTP retry settings for a remote server, unless the environment sets them."""
    if _remote():
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


def tracking_degraded() -> bool:
    """Whether the server stopped answering in this run (and has not come back yet)."""
    return bool(_STATE["down"])


def _remote() -> bool:
    return str(mlflow.get_tracking_uri()).startswith(("http://", "https://"))


def _server_answers() -> bool:
    from vqmed.tracking.server import TrackingServerError, check_tracking_server

    try:
        check_tracking_server(mlflow.get_tracking_uri(), timeout=3.0)
    except TrackingServerError:
        return False
    return True


def _backlog() -> Path:
    """The backlog file's path; its folder is made by :func:`_keep`, the first time something is kept, so a run
    whose server never failed leaves no empty folder."""
    return (_STATE["dir"] or Path("tracking_backlog")) / BACKLOG_FILE


def _keep(record: dict[str, Any] | None) -> None:
    if record is None:
        return
    record = dict(record)
    _backlog().parent.mkdir(parents=True, exist_ok=True)
    if record.get("kind") == "artifact":  # the file is often a temporary one: keep a copy
        folder = _backlog().parent / "artifacts"
        folder.mkdir(exist_ok=True)
        copy = folder / f"{time.time_ns()}-{Path(record['file']).name}"
        shutil.copy2(record["file"], copy)
        record["file"] = str(copy)
    with open(_backlog(), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _warn_once(what: str, exc: BaseException | None) -> None:
    if _STATE["warned"]:
        return
    _STATE["warned"] = True
    cause = f" ({type(exc).__name__})" if exc is not None else ""
    print(f"vqmed: warning: MLflow tracking server {_public_uri()} stopped answering during {what}{cause}; the run "
          f"goes on and keeps what it cannot send in {_backlog().parent} (sent when the server is back, or by --resume)",
          file=sys.stderr, flush=True)


def _public_uri() -> str:
    """The tracking URI without credentials."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(mlflow.get_tracking_uri()))
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def _run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def guarded(what: str, call: Callable[[], Any], record: dict[str, Any] | None = None) -> Any:
    """``call()``; if the tracking server is down, keep ``record`` (a backlog entry) instead and return ``None``.

    Args:
        what: what is being logged (for the one warning).
        call: the MLflow call.
        record: what to send later: ``{"kind": "metrics", "values": {...}, "step": n}``, ``{"kind": "params",
            "values": {...}}``, ``{"kind": "tags", ...}``, ``{"kind": "artifact", "file": ..., "artifact_path": ...}``
            or ``None`` (not worth keeping, e.g. the MLflow model: the checkpoint is on disk). The active run's
            id and the time are added.
    """
    if record is not None:
        record = {**record, "run_id": _run_id(), "timestamp": int(time.time() * 1000)}
    if _STATE["down"]:
        if time.monotonic() - _STATE["last_probe"] < PROBE_EVERY_S or not _recover():
            _keep(record)
            return None
    try:
        return call()
    except Exception as exc:
        if not _remote() or _server_answers():
            raise
        _STATE.update(down=True, last_probe=time.monotonic())
        _warn_once(what, exc)
        _keep(record)
        return None


def keep_for_later(record: dict[str, Any]) -> None:
    """Put ``record`` (as in :func:`guarded`) in the backlog directly."""
    _keep({**record, "run_id": _run_id(), "timestamp": int(time.time() * 1000)})


def _recover() -> bool:
    _STATE["last_probe"] = time.monotonic()
    if not _server_answers():
        return False
    _STATE["down"] = False
    flush_backlog()
    return not _STATE["down"]


def backlog_size() -> int:
    """Entries kept locally and not sent yet."""
    path = _backlog() if _STATE["dir"] is not None else None
    if path is None or not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def flush_backlog() -> int:
    """Send what the backlog holds, in order; returns how many entries were sent. Stops (keeping the rest)
    at the first entry the server does not take."""
    if _STATE["dir"] is None:
        return 0
    path = _backlog()
    if not path.is_file():
        return 0
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    sent = 0
    try:
        for rec in records:
            kind, run_id = rec["kind"], rec["run_id"]
            if kind == "metrics":
                client.log_batch(run_id, metrics=[Metric(k, float(v), int(rec["timestamp"]), int(rec["step"]))
                                                  for k, v in rec["values"].items()])
            elif kind == "params":
                client.log_batch(run_id, params=[Param(k, str(v)) for k, v in rec["values"].items()])
            elif kind == "tags":
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in rec["values"].items()])
            elif kind == "artifact":
                client.log_artifact(run_id, rec["file"], artifact_path=rec.get("artifact_path"))
            elif kind == "end":
                client.set_terminated(run_id, rec.get("status", "FINISHED"))
            sent += 1
    except Exception as exc:
        if not _remote() or _server_answers():
            raise
        _STATE.update(down=True, last_probe=time.monotonic())
        _warn_once("sending the backlog", exc)
    rest = records[sent:]
    if rest:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rest), encoding="utf-8")
        os.replace(tmp, path)
    else:
        path.unlink()
        shutil.rmtree(path.parent / "artifacts", ignore_errors=True)
        if not any(path.parent.iterdir()):  # all sent: no empty folder left behind
            path.parent.rmdir()
    return sent


def forget_active_run(status: str = "FINISHED") -> None:
    """End the active run locally when the server cannot hear it (the end is kept for later)."""
    run_id = _run_id()
    if run_id is None:
        return
    from mlflow.tracking.fluent import _active_run_stack  # MLflow keeps the active runs here; no public way

    stack = _active_run_stack.get()
    if stack:
        stack.pop()
    _keep({"kind": "end", "run_id": run_id, "status": status, "timestamp": int(time.time() * 1000)})
