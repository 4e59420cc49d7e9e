"""vqmed.tracking: MLflow helpers and run figures; imports no other vqmed room.

Owns where runs are stored (the project's local sqlite store ``mlflow.db`` with ``mlartifacts/`` beside it,
unless ``MLFLOW_TRACKING_URI`` says otherwise), experiment set-up, logging of flattened configs, NaN-safe
metrics, figures and images, de-identified dataset inputs (digest + counts, never patient data), the
figures every stage logs (reconstruction grid and per-epoch GIF, loss curves, codebook usage, label
efficiency), the reachability check of a tracking server, and serving MLflow's UI (``vqmed ui``).
"""

from vqmed.tracking.curves import compute_curve_plot, log_compute_curve
from vqmed.tracking.figures import (
    label_efficiency_plot,
    loss_curves,
    reconstruction_gif,
    reconstruction_grid,
    usage_histogram,
)
from vqmed.tracking.mlflow_utils import (
    default_tracking_uri,
    flatten_params,
    local_artifact_root,
    log_dataset_input,
    log_figure,
    log_image_array,
    log_metrics,
    log_params,
    manifest_digest,
    psnr,
    setup_mlflow,
)
from vqmed.tracking.server import TrackingServerError, check_tracking_server
from vqmed.tracking.ui import serve_ui, stop_ui, wait_for_ui

__all__ = [
    "compute_curve_plot",
    "log_compute_curve",
    "TrackingServerError",
    "check_tracking_server",
    "default_tracking_uri",
    "setup_mlflow",
    "local_artifact_root",
    "flatten_params",
    "log_params",
    "log_metrics",
    "log_figure",
    "log_image_array",
    "log_dataset_input",
    "manifest_digest",
    "psnr",
    "reconstruction_grid",
    "reconstruction_gif",
    "loss_curves",
    "usage_histogram",
    "label_efficiency_plot",
    "serve_ui",
    "stop_ui",
    "wait_for_ui",
]
