"""Tracking server down: with ``MLFLOW_TRACKING_URI`` pointing at a server that does not answer,
``vqmed pretrain`` fails at start, within seconds, with one line naming the URI (exit 2), before it
decodes an image or writes a file. Without the check MLflow retried each request for minutes
(measured: still hanging after 100 s on a closed port).

Documented behaviour (for the README): the tracking server is checked once at start (``GET /health``,
5 s timeout; any HTTP answer counts as up); local stores (sqlite, file) are not checked.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from vqmed.tracking import TrackingServerError, check_tracking_server

KERMANY = Path(__file__).resolve().parents[2] / "data_manifests" / "chest_xray.csv"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pretrain_fails_fast_when_the_server_is_down(tmp_path, data_root, make_config, run_cli):
    port = _closed_port()
    config = make_config(tmp_path, [KERMANY], data_root, tracking={"experiment": "down", "tracking_uri": None})
    uri = f"http://127.0.0.1:{port}"
    result = run_cli("pretrain", "--config", config, env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7"},
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    expected = (f"vqmed pretrain: error: MLflow tracking server {uri} is not reachable ([Errno 111] Connection "
                "refused); start it, or unset MLFLOW_TRACKING_URI / tracking.tracking_uri to track in the local "
                "store (mlflow.db)")
    assert lines == [expected], result.stderr
    assert result.seconds < 60  # the interpreter start-up; the check itself is immediate here
    # Nothing was decoded or written: no cache, no checkpoint, no run file, no local store.
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()
    assert not any((tmp_path / "run").rglob("*")) if (tmp_path / "run").exists() else True


def test_server_that_accepts_but_never_answers_times_out(tmp_path):
    """A hung server (accepts the connection, never replies): refused after the timeout, not minutes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://user:secret@127.0.0.1:{listener.getsockname()[1]}/mlflow"
        start = time.monotonic()
        with pytest.raises(TrackingServerError, match="not reachable") as info:
            check_tracking_server(uri, timeout=1.0)
        assert time.monotonic() - start < 10
    assert "secret" not in str(info.value) and "http://127.0.0.1:" in str(info.value)  # no credentials printed


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):  # keep the test output clean
        pass


def test_a_running_server_passes_and_local_stores_are_not_checked(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}")
        check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}/prefix/")  # 404 still means "up"
    finally:
        server.shutdown()
        server.server_close()
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_tracking_server(None)  # the local default store (no MLFLOW_TRACKING_URI in the test env) or the env's
