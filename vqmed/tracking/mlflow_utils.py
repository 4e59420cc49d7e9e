"""MLflow helpers: where the store lives, experiment set-up, params/metrics/artifacts, dataset inputs.

Everything here talks to MLflow's fluent API (the active run), so the training, export and benchmark
rooms only need ``setup_mlflow`` + ``mlflow.start_run`` and then these one-liners.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import mlflow
import numpy as np
from PIL import Image

from vqmed.tracking.resilience import apply_http_defaults, guarded

__all__ = [
    "ARTIFACT_DIR_NAME",
    "DB_FILE_NAME",
    "default_tracking_uri",
    "local_artifact_root",
    "setup_mlflow",
    "flatten_params",
    "log_params",
    "log_metrics",
    "log_figure",
    "log_image_array",
    "log_dataset_input",
    "manifest_digest",
    "psnr",
    "to_display_image",
]

logger = logging.getLogger(__name__)

#: File name of the project's local MLflow database (sqlite), created in the working directory.
DB_FILE_NAME = "mlflow.db"
#: Folder beside the database that holds run artifacts (already git-ignored by the project).
ARTIFACT_DIR_NAME = "mlartifacts"
# MLflow's SQL schema stores param values in VARCHAR(500) on stores created by older MLflow versions
# (and remote servers may still run one); newer clients accept 6000. 500 is safe everywhere.
MAX_PARAM_VALUE_LENGTH = 500
MAX_PARAM_KEY_LENGTH = 250
_TRUNCATION_MARK = "...[truncated]"
# Manifest columns whose per-value counts are safe to publish (low-cardinality, no identifiers).
DEFAULT_COUNT_COLUMNS = ("split", "label", "modality", "spatial_dims")
# Dataset digests live in a VARCHAR(36) column of MLflow's SQL store.
_DIGEST_LENGTH = 32


# --------------------------------------------------------------------------------------------------
# store location
# --------------------------------------------------------------------------------------------------
def default_tracking_uri() -> str:
    """The tracking URI vqmed uses when the config does not name one.

    ``MLFLOW_TRACKING_URI`` if it is set (a team server, a Databricks workspace, ...); otherwise MLflow's own
    local store inside the project, so nothing needs a server: the sqlite database ``mlflow.db`` in the
    current working directory, as an *absolute* URI (``sqlite:////abs/path/mlflow.db``) so that the UI and
    subprocesses started elsewhere find the same store. Artifacts go to ``mlartifacts/`` beside it
    (see :func:`setup_mlflow`).

    Returns:
        the tracking URI string.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return "sqlite:///" + str(Path.cwd().resolve() / DB_FILE_NAME)


def _sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _normalise_uri(uri: str) -> str:
    """Make a relative ``sqlite:///rel.db`` absolute, so subprocesses with another cwd find the same store."""
    db = _sqlite_db_path(uri)
    if db is None or db.is_absolute():
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return "sqlite:///" + str(db.resolve()) + (f"?{query}" if query else "")


def local_artifact_root(tracking_uri: str | None = None) -> Path | None:
    """Where artifacts of a local sqlite store live: ``mlartifacts/`` beside the database file.

    Args:
        tracking_uri: the store; ``None`` = :func:`default_tracking_uri`.

    Returns:
        the absolute folder, or ``None`` when the store is not a local sqlite file (a server decides itself).
    """
    db = _sqlite_db_path(_normalise_uri(tracking_uri or default_tracking_uri()))
    return None if db is None else db.resolve().parent / ARTIFACT_DIR_NAME


# The tag MLflow 3's UI reads to choose an experiment's layout: "custom_model_development" opens it on
# its Training runs, where an untagged experiment opens on the GenAI view (an empty Traces overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def setup_mlflow(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and make ``experiment`` the active experiment (creating it if needed).

    For the local sqlite store a new experiment gets its artifact location inside the project
    (``<dir of mlflow.db>/mlartifacts/<experiment>``) rather than MLflow's cwd-relative ``./mlruns``,
    so artifacts stay beside the database whatever directory later runs start from. A deleted
    experiment of the same name is restored rather than failing.

    Args:
        tracking_uri: the store; ``None`` = :func:`default_tracking_uri`.
        experiment: experiment name.

    Returns:
        the experiment id.

    Raises:
        ValueError: when ``experiment`` is empty.
    """
    if not experiment or not experiment.strip():
        raise ValueError("setup_mlflow: the experiment name is empty")
    uri = _normalise_uri(tracking_uri or default_tracking_uri())
    db = _sqlite_db_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    apply_http_defaults()  # a server that dies mid-run costs seconds per call, not minutes of retries
    client = mlflow.MlflowClient(tracking_uri=uri)

    exp = client.get_experiment_by_name(experiment)
    kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if exp is None:
        root = local_artifact_root(uri)
        location = (root / _safe_dir_name(experiment)).as_uri() if root is not None else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location, tags=kind)
        except mlflow.exceptions.MlflowException:
            # another process (e.g. a second rank or a parallel job) created it between our two calls
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            logger.warning("MLflow experiment %r was deleted; restoring it", experiment)
            client.restore_experiment(exp_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            # an experiment made before vqmed tagged them (or by plain MLflow) would open on GenAI traces
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _require_active_run(what: str) -> None:
    # MLflow's fluent API would silently start an unnamed run; a helper called outside a run is a bug.
    if mlflow.active_run() is None:
        raise RuntimeError(f"{what}: no active MLflow run; call setup_mlflow(...) and mlflow.start_run() first")


# --------------------------------------------------------------------------------------------------
# params and metrics
# --------------------------------------------------------------------------------------------------
def _param_str(value: Any) -> str:
    if isinstance(value, (PurePath, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)  # keep "1.0" distinct from "1"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_param_str(v) for v in value) + "]"
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


def flatten_params(cfg: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``.

    Lists of scalars become one value (``"[1, 2, 3]"``); lists that contain mappings are flattened by index
    (``"stages.0.channels"``); an empty mapping becomes ``"{}"``. Values longer than MLflow's 500-character
    limit are cut and end with ``"...[truncated]"``; keys longer than 250 characters are shortened with a hash
    suffix so they stay unique. Dataclasses and objects with ``to_dict()`` are expanded.

    Args:
        cfg: nested mapping (e.g. the YAML config as dicts).
        sep: key separator.

    Returns:
        flat ``{key: value}`` with string values, in the config's order.
    """
    out: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, Mapping):
            value = value.to_dict()
        elif hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
            import dataclasses

            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            if not value and prefix:
                out[prefix] = "{}"
            for k, v in value.items():
                visit(f"{prefix}{sep}{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, v in enumerate(value):
                visit(f"{prefix}{sep}{i}" if prefix else str(i), v)
        else:
            out[prefix] = _param_str(value)

    visit("", cfg)
    fixed: dict[str, str] = {}
    for key, val in out.items():
        if len(key) > MAX_PARAM_KEY_LENGTH:
            digest = hashlib.sha1(key.encode()).hexdigest()[:8]
            key = key[: MAX_PARAM_KEY_LENGTH - 9] + "~" + digest
        if len(val) > MAX_PARAM_VALUE_LENGTH:
            val = val[: MAX_PARAM_VALUE_LENGTH - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
        fixed[key] = val
    return fixed


def log_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Log a nested config as flat params of the active run (see :func:`flatten_params`).

    MLflow accepts at most 100 params per request, so they are sent in batches. Log the full config as an
    artifact as well (``mlflow.log_dict(cfg, "config.yaml")``) if some values may exceed 500 characters.

    Args:
        cfg: nested mapping.

    Returns:
        the flat params that were logged.
    """
    _require_active_run("log_params")
    flat = flatten_params(cfg)
    items = list(flat.items())
    for i in range(0, len(items), 100):
        batch = dict(items[i : i + 100])
        guarded("log_params", lambda b=batch: mlflow.log_params(b), {"kind": "params", "values": batch})
    return flat


def metric_key(text: str) -> str:
    """``text`` as a valid MLflow metric name: letters, digits, ``_ - . /`` and spaces; ``%`` -> ``pct`` (budget
    names such as ``10%``), anything else -> ``_``."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "pct" if ch == "%" else "_" for ch in text)


def log_metrics(metrics: Mapping[str, Any], step: int) -> dict[str, float]:
    """Log scalar metrics of the active run at ``step``, skipping values that would spoil the charts.

    Values may be Python/NumPy numbers or 0-d tensors. ``None`` is skipped silently (not computed this step);
    NaN and +-inf are skipped with a warning, because MLflow would store +-inf as +-1.8e308 and flatten every
    chart of the run (a diverging loss shows as the series stopping, plus the warning in the log).

    Args:
        metrics: ``{name: value}``.
        step: global step (or epoch) of these values.

    Returns:
        the finite values that were logged.

    Raises:
        TypeError: when a value is not a number.
    """
    _require_active_run("log_metrics")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None:
            continue
        if hasattr(value, "detach"):  # a torch tensor, without importing torch
            value = value.detach().cpu()
        try:
            val = float(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"log_metrics: metric {key!r} is not a number: {value!r}") from err
        if not math.isfinite(val):
            logger.warning("log_metrics: %s=%s at step %d is not finite; not logged", key, val, step)
            continue
        clean[str(key)] = val
    if clean:
        guarded("log_metrics", lambda: mlflow.log_metrics(clean, step=int(step)),
                {"kind": "metrics", "values": clean, "step": int(step)})
    return clean


def psnr(mse: float, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error: ``10 log10(data_range^2 / mse)``.

    Args:
        mse: mean squared error (>= 0); a 0-d array/tensor is fine.
        data_range: peak-to-peak range of the signal (1.0 for images scaled to [0, 1]).

    Returns:
        PSNR in dB; ``inf`` for a perfect reconstruction (``mse == 0``).

    Raises:
        ValueError: for a negative or NaN ``mse`` or a non-positive ``data_range``.
    """
    if hasattr(mse, "detach"):
        mse = mse.detach().cpu()
    mse = float(mse)
    if math.isnan(mse) or mse < 0:
        raise ValueError(f"psnr: mse must be >= 0, got {mse}")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


# --------------------------------------------------------------------------------------------------
# images and figures
# --------------------------------------------------------------------------------------------------
def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (kept import-free)
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_display_image(img: Any) -> np.ndarray:
    """One image for display: ``[H, W]`` grey or ``[H, W, 3]`` RGB, float in [0, 1].

    Accepts channel-first ``[C, H, W]`` (MONAI), ``[H, W]``, channel-last ``[H, W, C]`` (when the first axis is
    not 1/3/4 channels), and 3D ``[C, H, W, D]`` volumes, shown as the middle slice of the last spatial axis
    (the axial slice of a RAS volume). One channel is grey, three are RGB, other counts show channel 0.
    ``uint8`` input is scaled by 1/255; floats are clipped to [0, 1].

    Args:
        img: array or tensor.

    Returns:
        float32 array ready for ``imshow`` / PIL.

    Raises:
        ValueError: for shapes that are not an image.
    """
    arr = _as_numpy(img)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 4:  # [C, H, W, D] -> middle slice of D
        arr = arr[..., arr.shape[-1] // 2]
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        elif arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"not an image: shape {tuple(_as_numpy(img).shape)} has no 1/3/4-channel axis")
        if arr.shape[-1] == 4:
            arr = arr[..., :3]  # drop alpha
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    elif arr.ndim != 2:
        raise ValueError(f"not an image: shape {tuple(_as_numpy(img).shape)} (expected [C,H,W], [H,W] or [C,H,W,D])")
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0)


def _to_uint8(img: Any) -> np.ndarray:
    return np.round(to_display_image(img) * 255.0).astype(np.uint8)


def log_figure(fig: Any, artifact_path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure as an artifact of the active run, then close it.

    Args:
        fig: a ``matplotlib.figure.Figure`` (e.g. from :func:`reconstruction_grid`).
        artifact_path: file name inside the run's artifacts, e.g. ``"reconstructions/epoch_003.png"``
            (``.png`` is appended when there is no extension).
        dpi: resolution of the saved image.
    """
    _require_active_run("log_figure")
    if not PurePath(artifact_path).suffix:
        artifact_path += ".png"
    try:
        with tempfile.TemporaryDirectory(prefix="vqmed-fig-") as tmp:
            local = Path(tmp) / PurePath(artifact_path).name
            fig.savefig(local, dpi=dpi, bbox_inches="tight", facecolor="white")
            _log_file(local, artifact_path)
    finally:
        _close_figure(fig)


def _close_figure(fig: Any) -> None:
    # Figures built by this room are plain Figure objects (no pyplot state to free); only a figure made
    # through pyplot is registered there and must be closed to release it.
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def _log_file(local: Path, artifact_path: str) -> None:
    parent = str(PurePath(artifact_path).parent)
    folder = None if parent in ("", ".") else parent
    guarded("log_artifact", lambda: mlflow.log_artifact(str(local), artifact_path=folder),
            {"kind": "artifact", "file": str(local), "artifact_path": folder})


def log_image_array(arr: Any, artifact_path: str) -> None:
    """Log one image array as a PNG artifact of the active run.

    Args:
        arr: ``[C, H, W]`` / ``[H, W]`` / ``[H, W, C]`` / ``[C, H, W, D]`` (middle slice), float in [0, 1] or
            uint8; see :func:`to_display_image`.
        artifact_path: file name inside the run's artifacts (``.png`` is appended when there is no extension).
    """
    _require_active_run("log_image_array")
    if not PurePath(artifact_path).suffix:
        artifact_path += ".png"
    img = Image.fromarray(_to_uint8(arr))
    with tempfile.TemporaryDirectory(prefix="vqmed-img-") as tmp:
        local = Path(tmp) / PurePath(artifact_path).name
        img.save(local)
        _log_file(local, artifact_path)


# --------------------------------------------------------------------------------------------------
# dataset inputs
# --------------------------------------------------------------------------------------------------
def _is_path_column(name: str) -> bool:
    n = str(name).lower()
    return n in ("file", "filename", "file_name", "image", "uri") or n.endswith("path") or n.endswith("_file")


def manifest_digest(manifest_df: Any, columns: Sequence[str] | None = None) -> str:
    """A content hash of a manifest table that does not depend on row order or where the data is mounted.

    Rows are serialised with sorted column names and then sorted, so shuffling a manifest keeps its digest.
    Path-like columns (``path``, ``*_path``, ``file``, ...) contribute only their file name, so the same data
    under another mount point hashes the same. Nothing but the hash leaves this function.

    Args:
        manifest_df: a pandas DataFrame.
        columns: columns to hash; ``None`` = all.

    Returns:
        32 hex characters (the first 128 bits of a SHA-256; MLflow keeps dataset digests in 36 characters).
    """
    cols = sorted(map(str, manifest_df.columns)) if columns is None else list(columns)
    missing = [c for c in cols if c not in manifest_df.columns]
    if missing:
        raise KeyError(f"manifest_digest: columns {missing} are not in the manifest (has {list(manifest_df.columns)})")
    series = []
    for c in cols:
        # map(str), not astype(str): pandas 3 keeps missing values as NaN floats under astype(str).
        values = manifest_df[c].map(str)
        if _is_path_column(c):
            values = values.map(lambda s: PurePath(s.replace("\\", "/")).name)
        series.append(values.tolist())
    rows = sorted("\x1f".join(vals) for vals in zip(*series)) if series else []
    h = hashlib.sha256()
    h.update(("\x1f".join(cols) + "\n").encode())
    for row in rows:
        h.update(row.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:_DIGEST_LENGTH]


def log_dataset_input(
    manifest_df: Any,
    name: str,
    context: str = "training",
    count_columns: Iterable[str] = DEFAULT_COUNT_COLUMNS,
) -> str:
    """Log a manifest as an input dataset of the active run, by hash and counts only (no patient data).

    The dataset MLflow records is a small de-identified table with one row per combination of the
    ``count_columns`` present in the manifest (e.g. split x label) and its number of studies; its digest is
    :func:`manifest_digest` of the full manifest. No path, patient id, study id or file name is logged, so
    the run shows *which* data it saw (by digest) and *how much* of each kind, and two runs on the same
    manifest share a dataset entry in the UI.

    Args:
        manifest_df: the manifest (pandas DataFrame, one row per image/study).
        name: dataset name shown in the UI (e.g. ``"kermany-train"``).
        context: MLflow input context tag (``"training"``, ``"validation"``, ``"export"``, ...).
        count_columns: low-cardinality columns whose value counts are published when present; columns that
            look like identifiers or paths are refused.

    Returns:
        the manifest digest.
    """
    import pandas as pd  # pandas comes with mlflow; imported here to keep the room's import light

    _require_active_run("log_dataset_input")
    present = [c for c in count_columns if c in manifest_df.columns]
    for c in present:
        lc = c.lower()
        if _is_path_column(c) or "patient" in lc or "study" in lc or lc.endswith("id") or "uid" in lc:
            raise ValueError(f"log_dataset_input: column {c!r} looks like an identifier or path; it is never published")
    digest = manifest_digest(manifest_df)
    if present:
        table = manifest_df[present].astype(str).value_counts(sort=False).rename("n").reset_index()
        table = table.sort_values(present, kind="stable").reset_index(drop=True)
    else:
        table = pd.DataFrame({"n": [len(manifest_df)]})
    table["n"] = table["n"].astype("int64")
    table.insert(0, "manifest_digest", digest)
    with warnings.catch_warnings():
        # MLflow's schema inference warns that int columns cannot hold missing values; counts never miss
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        dataset = mlflow.data.from_pandas(table, name=name, digest=digest)
        guarded("log_input", lambda: mlflow.log_input(dataset, context=context))
    return digest
