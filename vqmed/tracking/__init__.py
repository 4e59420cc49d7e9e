"""vqmed.tracking: MLflow helpers and run figures; imports no other vqmed room.

Owns where runs are stored (the project's local sqlite store ``mlflow.db`` with ``mlartifacts/`` beside it,
unless ``MLFLOW_TRACKING_URI`` says otherwise), experiment set-up, logging of flattened configs, NaN-safe
metrics, figures and images, de-identified dataset inputs (digest + counts, never patient data), the
figures every stage logs (reconstruction grid and per-epoch GIF, loss curves, codebook usage, label
efficiency; the prior's sample rows, likelihood heat maps and QA AUROC bars), the run lifecycle and artifacts (``runs``: start/end, tags,
files, models), the reachability check of a tracking server, a server that dies mid-run (``resilience``: logging degrades with
one warning, a local backlog sent when it is back), and serving MLflow's UI (``vqmed ui``).
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
    metric_key,
    psnr,
    setup_mlflow,
)
from vqmed.tracking.prior_figures import image_rows, likelihood_heatmap, qa_auroc_plot
from vqmed.tracking.runs import (
    download_artifact,
    end_run,
    log_artifact,
    log_dict,
    log_torch_model,
    set_tags,
    start_run,
)
from vqmed.tracking.resilience import backlog_size, flush_backlog, set_backlog_dir, tracking_degraded
from vqmed.tracking.server import TrackingServerError, check_tracking_server
from vqmed.tracking.ui import serve_ui, stop_ui, wait_for_ui

# sorted, one name a line: the public names of the room (run lifecycle, logging, figures, UI)
__all__ = [
    "backlog_size",
    "flush_backlog",
    "set_backlog_dir",
    "tracking_degraded",
    "check_tracking_server",
    "compute_curve_plot",
    "default_tracking_uri",
    "download_artifact",
    "end_run",
    "flatten_params",
    "image_rows",
    "label_efficiency_plot",
    "likelihood_heatmap",
    "local_artifact_root",
    "log_artifact",
    "log_compute_curve",
    "log_dataset_input",
    "log_dict",
    "log_figure",
    "log_image_array",
    "log_metrics",
    "log_params",
    "log_torch_model",
    "loss_curves",
    "manifest_digest",
    "metric_key",
    "psnr",
    "qa_auroc_plot",
    "reconstruction_gif",
    "reconstruction_grid",
    "serve_ui",
    "set_tags",
    "setup_mlflow",
    "start_run",
    "stop_ui",
    "TrackingServerError",
    "usage_histogram",
    "wait_for_ui",
]
