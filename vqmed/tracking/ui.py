"""Serve MLflow's UI on the project's store (``vqmed ui``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from vqmed.tracking.mlflow_utils import _normalise_uri, _sqlite_db_path, default_tracking_uri, local_artifact_root

__all__ = ["experiment_urls", "serve_ui", "stop_ui", "wait_for_ui", "free_port"]

# MLflow 3.17's UI picks an experiment's layout from the page address (``workflowType``) or the browser's saved
# choice, and starts new browsers on GenAI (an empty "Traces" overview); older 3.x UIs read the experiment's
# ``mlflow.experimentKind`` tag instead, which setup_mlflow sets. The addresses vqmed prints carry both.
TRAINING_VIEW = "workflowType=machine_learning"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ensure_port_free(host: str, port: int) -> None:
    # MLflow's server exits with status 0 when its worker cannot bind, after ~10 s of start-up; check first
    # so a taken port is a clear, immediate error. SO_REUSEADDR as the server itself uses: a port in
    # TIME_WAIT from a previous run is fine, one with a listener is not.
    bind_host = "0.0.0.0" if host in ("", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as err:
            raise RuntimeError(f"cannot serve the MLflow UI on {host}:{port}: {err.strerror} (pick another --port)") from err


def _log_tail(path: str | Path | None, n: int = 4000) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_for_ui(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Block until the MLflow server at ``url`` answers ``/health``.

    Args:
        url: base address, e.g. ``"http://127.0.0.1:5000"``.
        timeout: seconds to wait at most.
        proc: the server process; if it exits meanwhile the wait stops at once.

    Raises:
        RuntimeError: when the process exits or the server does not answer within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    health = url.rstrip("/") + "/health"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"MLflow server exited with code {proc.returncode} before answering at {url}\n"
                + _log_tail(getattr(proc, "log_path", None))
            )
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"MLflow server did not answer at {health} within {timeout:.0f} s\n"
                + _log_tail(getattr(proc, "log_path", None))
            )
        time.sleep(0.5)


def stop_ui(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server started by :func:`serve_ui` and its worker processes (its own process group).

    Args:
        proc: the ``Popen`` returned by ``serve_ui(block=False)``.
        timeout: seconds to wait after SIGTERM before SIGKILL.
    """
    if proc.poll() is not None:
        return
    # serve_ui starts the server in a new session, so its group id is its pid: this reaches exactly the
    # server and the uvicorn workers it forked, nothing else.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


def experiment_urls(url: str, tracking_uri: str) -> dict[str, str]:
    """``{experiment name: address of its Training runs in the UI at url}`` for every active experiment of the store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return {e.name: f"{url}/#/experiments/{e.experiment_id}?{TRAINING_VIEW}" for e in client.search_experiments()
            if e.name != "Default" or client.search_runs([e.experiment_id], max_results=1)}


def _print_ready(url: str, uri: str) -> None:
    print(f"MLflow UI ready: {url}/#/experiments?{TRAINING_VIEW}", flush=True)
    try:
        for name, address in experiment_urls(url, uri).items():
            print(f"  {name}: {address}", flush=True)
    except Exception as err:  # the addresses are a convenience; the UI is up whatever the store says
        print(f"  (cannot list experiments: {err})", flush=True)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve_ui(
    host: str = "127.0.0.1",
    port: int = 5000,
    tracking_uri: str | None = None,
    block: bool = True,
    *,
    workers: int = 1,
    wait_timeout: float | None = 90.0,
    log_path: str | Path | None = None,
) -> subprocess.Popen | None:
    """Start MLflow's tracking UI on the project's store and print its address.

    Runs ``python -m mlflow server`` with the store as backend and, for the local sqlite store, the
    ``mlartifacts/`` folder beside it as artifact root, so experiments created by ``setup_mlflow`` and any
    made in the UI keep their artifacts in the project. One worker by default: the UI is for one person
    and the machine may be small. When ``tracking_uri`` is already an ``http(s)://`` server there is
    nothing to start: its address is printed and ``None`` returned.

    Args:
        host: interface to bind; ``127.0.0.1`` keeps the UI local (``0.0.0.0`` exposes it).
        port: TCP port; ``0`` picks a free one.
        tracking_uri: the store; ``None`` = :func:`default_tracking_uri`.
        block: ``True`` (the CLI): run in the foreground until the server exits or Ctrl+C, return ``None``.
            ``False``: return the running process (with attributes ``url`` and ``log_path``, server output
            going to that log file); stop it with :func:`stop_ui`.
        workers: server worker processes.
        wait_timeout: with ``block=False``, wait up to this many seconds until the UI answers (``None``: do
            not wait); it typically needs 10-20 s to start.
        log_path: with ``block=False``, file for the server's output (default: a temporary file).

    Returns:
        the server process when ``block=False``, else ``None``.

    Raises:
        RuntimeError: when the port is taken or the server fails; with ``block=False`` also when it does not
            answer within ``wait_timeout``.
        ValueError: for an invalid port.
    """
    uri = _normalise_uri(tracking_uri or default_tracking_uri())
    if uri.startswith(("http://", "https://")):
        print(f"MLflow tracking server already at {uri}; nothing to start", flush=True)
        return None
    if port == 0:
        port = free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    if not 0 < int(port) < 65536:
        raise ValueError(f"serve_ui: invalid port {port}")
    _ensure_port_free(host, int(port))
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--host", host,
        "--port", str(int(port)),
        "--workers", str(int(workers)),
    ]  # fmt: skip
    db = _sqlite_db_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    root = local_artifact_root(uri)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", root.as_uri(), "--artifacts-destination", root.as_uri()]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown}:{int(port)}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)

    if block:
        _serve_in_foreground(cmd, env, url, uri, host, int(port), wait_timeout)
        return None
    return _start_in_background(cmd, env, url, uri, log_path, wait_timeout)


def _serve_in_foreground(cmd: list[str], env: dict[str, str], url: str, uri: str, host: str, port: int,
                         wait_timeout: float | None) -> None:
    """Run the server until it exits or Ctrl+C / SIGTERM / SIGHUP, then stop its whole process group."""
    print(f"MLflow UI: {url}  (store: {uri}; starting, Ctrl+C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    # The server runs in its own session (so stop_ui can end its workers as a group); it therefore does
    # not get the terminal's signals itself: turn SIGTERM/SIGHUP to this process into a clean stop too.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise_exit)
    interrupted = False
    try:
        try:
            wait_for_ui(url, timeout=wait_timeout or 120.0, proc=proc)
            _print_ready(url, uri)
        except RuntimeError as err:
            if proc.poll() is None:  # only slow to start: keep serving, and say where once it answers
                print(f"warning: {err}", file=sys.stderr, flush=True)
                try:
                    wait_for_ui(url, timeout=3600.0, proc=proc)
                    _print_ready(url, uri)
                except RuntimeError:
                    pass
        proc.wait()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop_ui(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not interrupted and proc.returncode not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise RuntimeError(
            f"MLflow server for {uri} stopped with exit code {proc.returncode} (its output is above; "
            f"e.g. port {port} already in use on {host}?)"
        )


def _start_in_background(cmd: list[str], env: dict[str, str], url: str, uri: str, log_path: str | Path | None,
                         wait_timeout: float | None) -> subprocess.Popen:
    """Start the server with its output in ``log_path`` and return it once it answers (see :func:`serve_ui`)."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="vqmed-ui-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.url = url  # type: ignore[attr-defined]
    proc.log_path = log_path  # type: ignore[attr-defined]
    print(f"MLflow UI: {url}  (store: {uri}; log: {log_path})", flush=True)
    if wait_timeout:
        try:
            wait_for_ui(url, timeout=wait_timeout, proc=proc)
        except BaseException:
            stop_ui(proc)
            raise
        _print_ready(url, uri)
    return proc


