"""The pretraining-compute curve: its figure (probe AUC against pretraining steps, one line per objective)
and its MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from vqmed.tracking.figures import OKABE_ITO, _new_figure
from vqmed.tracking.mlflow_utils import log_figure, log_metrics, log_params, metric_key, setup_mlflow
from vqmed.tracking.runs import end_run, log_artifact, start_run

__all__ = ["compute_curve_plot", "log_compute_curve"]

# distinct markers as well as colours: objectives stay apart in grey print too
_MARKERS = ["o", "s", "D", "^", "v", "P"]


def compute_curve_plot(df: Any, title: str = "Pretraining compute vs frozen-feature AUC") -> Figure:
    """One panel per label budget: mean AUC (with its CI as a band) against pretraining steps.

    Args:
        df: a pandas DataFrame with columns ``objective``, ``steps``, ``budget``, ``auc_mean``, ``auc_low``,
            ``auc_high`` (one row per objective, pretraining length and budget). Step 0 is the random
            initialisation, shared by every objective.
        title: figure title.

    Raises:
        KeyError: when a column is missing.
    """
    need = ["objective", "steps", "budget", "auc_mean", "auc_low", "auc_high"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise KeyError(f"compute_curve_plot: columns {missing} missing (has {list(df.columns)})")
    budgets = list(dict.fromkeys(df["budget"].astype(str)))
    fig = _new_figure(3.2 * len(budgets), 3.4)
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    objectives = list(dict.fromkeys(df["objective"].astype(str)))
    steps = sorted(set(df["steps"].astype(int)))
    for ax, budget in zip(axes, budgets):
        for i, objective in enumerate(objectives):
            sub = df[(df["budget"].astype(str) == budget) & (df["objective"].astype(str) == objective)].sort_values("steps")
            # steps on a symlog axis: 0 (random init) and 16x the demo both readable
            x = sub["steps"].to_numpy(float)
            colour = OKABE_ITO[i % (len(OKABE_ITO) - 1)]  # black is for reference lines
            ax.fill_between(x, sub["auc_low"].to_numpy(float), sub["auc_high"].to_numpy(float), color=colour,
                            alpha=0.15, linewidth=0)
            ax.plot(x, sub["auc_mean"].to_numpy(float), color=colour, marker=_MARKERS[i % len(_MARKERS)],
                    markersize=5, label=objective)
        ax.set_xscale("symlog", linthresh=max(1, min([s for s in steps if s > 0], default=1)))
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps], rotation=45, fontsize=7)
        ax.set_title(f"{budget} labels", fontsize=10)
        ax.set_xlabel("pretraining steps (0 = random init)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test ROC AUC (band: CI)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def log_compute_curve(table: Any, table_csv: Path, figure: Figure, params: dict[str, Any], tracking_uri: str | None,
                      experiment: str, run_name: str) -> str:
    """One MLflow run holding a compute curve: its params, ``auc/BUDGET/OBJECTIVE`` metrics at each step
    (MLflow's step axis is the pretraining length), the table (``table_csv``, written by the caller) and the
    figure. Returns the run id."""
    setup_mlflow(tracking_uri, experiment)
    run = start_run(run_name=run_name)
    try:
        log_params(params)
        for row in table.itertuples():
            log_metrics({metric_key(f"auc/{row.budget}/{row.objective}"): row.auc_mean}, step=int(row.steps))
        log_artifact(table_csv)
        log_figure(figure, "compute_curve.png")
    finally:
        end_run()
    return run.info.run_id
