"""A real local ``mlflow server`` killed in the middle of a pretraining run: the training goes on and ends
with exit 0 and one warning; what the server could not take is kept in ``OUT/tracking_backlog``; once the
server is back, ``vqmed pretrain --resume`` sends it, and the store then holds every metric value the run
logged (compared with the run's own history in its final checkpoint)."""

from __future__ import annotations

import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vqmed.models_io.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
KERMANY = Path(__file__).resolve().parents[2] / "data_manifests" / "chest_xray.csv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(store: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'server.db'}", "--default-artifact-root", (store / "art").as_uri()]
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}")


def _metrics(store: Path) -> set[tuple[str, int]]:
    with sqlite3.connect(store / "server.db") as db:
        return {(k, int(s)) for k, s in db.execute("SELECT key, step FROM metrics")}


def test_server_killed_mid_run_loses_no_metric(tmp_path, data_root, make_config, env_for_child):
    store = tmp_path / "server"
    store.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _server(store, port, tmp_path / "server.log")
    config = make_config(tmp_path, [KERMANY], data_root, tracking={"experiment": "dies", "tracking_uri": uri},
                         train={"epochs": 3, "max_steps": 40, "log_every": 1, "checkpoint_every": 20})
    env = env_for_child()
    pretrain = subprocess.Popen([sys.executable, "-m", "vqmed", "pretrain", "--config", str(config)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and pretrain.poll() is None:
            if (store / "server.db").exists() and len(_metrics(store)) >= 10:
                break
            time.sleep(0.5)
        assert pretrain.poll() is None, "the run ended before the server could be killed"
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait()
        out, err = pretrain.communicate(timeout=900)
    finally:
        if pretrain.poll() is None:
            pretrain.kill()
    assert pretrain.returncode == 0, err[-3000:]
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert any("stopped answering" in ln for ln in warnings) and any("could not be sent" in ln for ln in warnings), err
    backlog = tmp_path / "run" / "tracking_backlog" / "backlog.jsonl"
    assert backlog.is_file() and backlog.stat().st_size > 0

    history = load_checkpoint(tmp_path / "run" / "final.pt")["history"]
    logged = {(name, int(step)) for name, points in history.items() for step, value in points if math.isfinite(value)}
    assert not logged <= _metrics(store)  # some values are missing from the server: they are in the backlog

    server = _server(store, port, tmp_path / "server.log")  # the server is back
    try:
        resumed = subprocess.run([sys.executable, "-m", "vqmed", "pretrain", "--config", str(config), "--resume"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert logged <= _metrics(store), sorted(logged - _metrics(store))[:20]
        assert not backlog.parent.exists()  # all sent: no backlog folder left behind
    finally:
        os.killpg(server.pid, signal.SIGKILL)
