"""Is the MLflow tracking server there? Checked once before a run writes anything."""

from __future__ import annotations

from vqmed.tracking.mlflow_utils import default_tracking_uri

__all__ = ["TrackingServerError", "check_tracking_server"]


class TrackingServerError(ConnectionError):
    """The configured MLflow tracking server does not answer; the message names the URI (no credentials)."""


def check_tracking_server(tracking_uri: str | None, timeout: float = 5.0) -> None:
    """Fail fast, with one line naming the URI, when an HTTP(S) MLflow tracking server does not answer.

    MLflow retries every request with exponential back-off, so a down server (``MLFLOW_TRACKING_URI``
    pointing at a closed port) would hang the run for many minutes before it died. Any HTTP answer,
    even 401 or 404, counts as reachable; local stores (sqlite, file) are not checked.

    Args:
        tracking_uri: ``tracking.tracking_uri``; ``None`` = ``MLFLOW_TRACKING_URI`` or the local store.
        timeout: seconds to wait for the server's ``/health`` answer.

    Raises:
        TrackingServerError: the server refused the connection, did not answer in time, or its host is unknown.
    """
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    uri = tracking_uri or default_tracking_uri()
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port
    except ValueError:
        raise TrackingServerError(f"MLflow tracking URI has an invalid port: {parts.scheme}://{parts.hostname}...") from None
    # Credentials in the URI are neither sent by urllib nor printed.
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host + (f":{port}" if port else "")
    shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        urllib.request.urlopen(health, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # it answered the handshake; its certificate is MLflow's business (MLFLOW_TRACKING_* TLS settings)
        raise TrackingServerError(
            f"MLflow tracking server {shown} is not reachable ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI / tracking.tracking_uri to track in the local store (mlflow.db)"
        ) from None
